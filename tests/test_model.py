"""model.py as a specification: our encoder equals Hugging Face BERT on the same weights, both attention
paths agree, padding never makes NaN, and the HF-layout reader/writer is exact and strict."""
import json

import pytest
import torch
import torch.nn.functional as F

import model as M
from conftest import minilm_dir

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
    base.update(kw)
    return transformers.BertConfig(**base)


def padded_batch(vocab=300, B=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    return ids, mask, types


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_matches_hf_bert_for_masked_lm_with_padding(tmp_path, attention):
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(hf_config()).eval()
    hf.save_pretrained(tmp_path)
    ours = M.from_hf_bert(str(tmp_path), head="mlm", attention=attention).eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours.encoder(ids, mask, types)
        logits = ours(ids, mask, types)
    real = mask.bool()
    assert (hidden - ref.hidden_states[-1])[real].abs().max() < 1e-5
    assert (logits - ref.logits)[real].abs().max() < 1e-5


def test_matches_hf_bert_model_hidden_states_and_pooler(tmp_path):
    torch.manual_seed(1)
    hf = transformers.BertModel(hf_config()).eval()
    hf.save_pretrained(tmp_path)
    ours = M.from_hf_bert(str(tmp_path), head="classifier", num_labels=3).eval()
    ids, mask, types = padded_batch(seed=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours.encoder(ids, mask, types)
        pooled = ours.pool(hidden)
    assert (hidden - ref.last_hidden_state)[mask.bool()].abs().max() < 1e-5
    assert (pooled - ref.pooler_output).abs().max() < 1e-5


def test_save_hf_bert_loads_back_into_transformers(tmp_path):
    torch.manual_seed(2)
    ours = M.LanguageModel(M.EncoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                           max_position=64)).eval()
    M.save_hf_bert(ours, str(tmp_path / "out"))
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        diff = (ours(ids, mask, types) - hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits)
    assert diff[mask.bool()].abs().max() < 1e-5
    # and it reads back into ours unchanged
    again = M.from_hf_bert(str(tmp_path / "out"), head="mlm")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_minilm_from_pypi_package_matches_transformers():
    path = minilm_dir()
    ours = M.from_hf_bert(str(path), head=None).eval()
    hf = transformers.BertModel.from_pretrained(str(path)).eval()
    ids, mask, types = padded_batch(vocab=30522, B=4, T=20, seed=3)
    ids[:, 0] = 101
    with torch.no_grad():
        a = ours(ids, mask, types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def test_layer_norm_and_gelu_match_their_equations():
    x = torch.randn(4, 7, 32)
    ln = M.LayerNorm(32, eps=1e-12)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    assert torch.allclose(ln(x), M.layer_norm_reference(x, ln.weight, ln.bias, 1e-12), atol=1e-5)
    assert torch.allclose(F.gelu(x), M.gelu_reference(x), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_equals_sdpa(causal):
    torch.manual_seed(0)
    cfg = M.EncoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, causal=causal, attention="math")
    math_model = M.LanguageModel(cfg).eval()
    sdpa_model = M.LanguageModel(M.EncoderConfig(**{**cfg.to_dict(), "attention": "sdpa"})).eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    ids, mask, types = padded_batch()
    with torch.no_grad():
        a, b = math_model(ids, mask, types), sdpa_model(ids, mask, types)
    assert (a - b).abs().max() < 1e-6 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_fully_padded_rows_give_no_nan(dtype, attention):
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                            attention=attention, causal=False)).to(dtype)
    ids = torch.randint(5, 100, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1] = 0                 # a row of nothing but padding
    mask[2, 1:] = 0
    logits = model(ids, mask)
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_causal_mask_hides_the_future():
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                            causal=True)).eval()
    ids = torch.randint(5, 100, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = 7
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert not torch.allclose(a[0, 6:], b[0, 6:])


def test_lm_head_on_selected_positions_equals_full_head():
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig.preset("tiny", vocab_size=200)).eval()
    ids, mask, types = padded_batch(vocab=200)
    positions = torch.tensor([0, 5, 13, 30])
    with torch.no_grad():
        full = model(ids, mask, types).reshape(-1, 200)
        sparse = model(ids, mask, types, positions=positions)
    assert torch.allclose(full[positions], sparse, atol=1e-6)


def test_language_model_with_targets_returns_the_summed_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    for causal in (False, True):
        model = M.LanguageModel(M.EncoderConfig.preset("tiny", vocab_size=200, causal=causal)).eval()
        ids, mask, types = padded_batch(vocab=200)
        positions = None if causal else torch.tensor([0, 5, 13, 30])
        targets = torch.randint(0, 200, (ids.numel() if causal else 4,))
        targets[1] = -100                                                  # an ignored row adds nothing
        logits, loss = model(ids, mask, types, positions=positions, targets=targets)
        assert torch.equal(logits, model(ids, mask, types, positions=positions))
        rows = logits.reshape(targets.numel(), -1)
        expected = F.cross_entropy(rows, targets, ignore_index=-100, reduction="sum")
        assert torch.allclose(loss, expected, atol=1e-5), (causal, loss, expected)


def test_presets_follow_bert_miniatures():
    assert [(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) for c in
            map(M.EncoderConfig.preset, ["tiny", "mini", "small", "medium", "base"])] == [
        (2, 128, 2, 512), (4, 256, 4, 1024), (4, 512, 8, 2048), (8, 512, 8, 2048), (12, 768, 12, 3072)]
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        M.EncoderConfig.preset("huge")


def test_hf_loader_rejects_unknown_missing_and_misshapen_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = transformers.BertForMaskedLM(hf_config())
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")

    bad = dict(weights, **{"bert.encoder.layer.0.extra.weight": torch.zeros(1)})
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(M.CheckpointError, match="unexpected keys.*extra"):
        M.from_hf_bert(str(tmp_path))

    bad = {k: v for k, v in weights.items() if "layer.1.output.dense.weight" not in k}
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(M.CheckpointError, match="lacks encoder.layer.1.output.dense.weight"):
        M.from_hf_bert(str(tmp_path))

    bad = dict(weights)
    bad["bert.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(5)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(M.CheckpointError, match=r"fc1.bias has shape \(5,\)"):
        M.from_hf_bert(str(tmp_path))

    with pytest.raises(M.CheckpointError, match="no config.json"):
        M.from_hf_bert(str(tmp_path / "nowhere"))

    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(M.CheckpointError, match="cannot read weights"):
        M.from_hf_bert(str(tmp_path))


def test_bare_encoder_checkpoint_has_no_mlm_head(tmp_path):
    transformers.BertModel(hf_config()).save_pretrained(tmp_path)
    with pytest.raises(M.CheckpointError, match="no MLM head"):
        M.from_hf_bert(str(tmp_path), head="mlm")


def test_pytorch_model_bin_is_read_with_weights_only(tmp_path):
    hf = transformers.BertModel(hf_config())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    enc = M.from_hf_bert(str(tmp_path), head=None)
    assert torch.equal(enc.embed.tok.weight, hf.embeddings.word_embeddings.weight)
    # a pickle carrying an arbitrary object is refused, not executed
    torch.save({"x": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(M.CheckpointError, match="cannot read weights"):
        M.from_hf_bert(str(tmp_path), head=None)


def test_pre_ln_embedding_norm_is_a_saved_switch_and_old_pre_ln_folders_load_without_it(tmp_path):
    ids, mask, _ = padded_batch()
    base = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_position=64, dropout=0.0,
                attention_dropout=0.0, norm="pre")
    torch.manual_seed(0)
    with_ln = M.LanguageModel(M.EncoderConfig(**base, embedding_norm=True)).eval()
    assert isinstance(with_ln.encoder.embed.norm, M.LayerNorm)
    with torch.no_grad():                         # a trained-looking LN, so that loading it back is visible
        with_ln.encoder.embed.norm.weight.uniform_(0.5, 1.5)
        with_ln.encoder.embed.norm.bias.normal_(0, 0.1)
    M.save_hf_bert(with_ln, str(tmp_path / "ln"))
    assert json.loads((tmp_path / "ln" / "config.json").read_text())["plainbert_embedding_norm"] is True
    back = M.from_hf_bert(str(tmp_path / "ln"), head="mlm").eval()
    assert back.config.embedding_norm is True
    torch.testing.assert_close(back(ids, mask), with_ln(ids, mask), rtol=0, atol=0)

    # a pre-LN folder written before the switch existed has no such field: it loads as it was, without the LN
    without = M.LanguageModel(M.EncoderConfig(**base)).eval()
    assert isinstance(without.encoder.embed.norm, torch.nn.Identity)
    without.load_state_dict({k: v for k, v in with_ln.state_dict().items() if not k.startswith("encoder.embed.norm.")})
    M.save_hf_bert(without, str(tmp_path / "old"))
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["plainbert_embedding_norm"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    old = M.from_hf_bert(str(tmp_path / "old"), head="mlm", strict=True).eval()
    assert old.config.embedding_norm is False
    torch.testing.assert_close(old(ids, mask), without(ids, mask), rtol=0, atol=0)
    # the LN changes the function: the same weights with and without it differ
    assert not torch.allclose(with_ln(ids, mask), without(ids, mask))


def test_post_ln_always_normalises_its_embeddings():
    assert M.EncoderConfig(norm="post").embedding_norm is True
    assert M.EncoderConfig(norm="pre").embedding_norm is False
    with pytest.raises(ValueError, match="embedding_norm=False needs norm='pre'"):
        M.EncoderConfig(norm="post", embedding_norm=False)
