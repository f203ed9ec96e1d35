"""Every fast path computes what the plain path computes. Read beside docs/performance.md.

Two fast paths are specified in tests/test_model.py and not repeated here:
- SDPA attention equals the written-out equation: test_math_attention_equals_sdpa;
- the LM head on selected positions equals the full head: test_lm_head_on_selected_positions_equals_full_head.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import model as M
import trainer
from conftest import ROOT
from losses import cross_entropy

TINY = dict(vocab_size=120, hidden_size=32, num_layers=2, num_heads=2, max_position=64)


def twin(cfg, **changes):
    """Two models of one config but for `changes`, with the same weights."""
    torch.manual_seed(0)
    a = M.LanguageModel(cfg)
    b = M.LanguageModel(M.EncoderConfig(**{**cfg.to_dict(), **changes}))
    b.load_state_dict(a.state_dict())
    return a, b


def ragged_batch(B=4, T=11, vocab=120, seed=0):
    """Sequences of lengths T, 6, 1 and 9, padded with 0 to T; types 1 on the second half of each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, 6, 1, 9])[:B]
    mask = (torch.arange(T) < lengths[:, None]).long()
    types = (torch.arange(T) >= lengths[:, None] // 2).long() * mask
    return ids * mask, mask, types


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -----------------------------------------------------------------------------------------------------
# the MLM loss on masked positions only


def test_mlm_loss_on_masked_positions_equals_loss_over_all_positions():
    """The sparse path (head and loss on the M masked rows) gives the loss and every gradient of the plain
    path (head on all B*T rows, cross-entropy with ignore_index)."""
    pretrain = pytest.importorskip("pretrain")
    a, b = twin(M.EncoderConfig(**TINY, dropout=0.0, attention_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 120, (3, 16), generator=g)
    ids, labels = pretrain.mask_tokens(tokens, g, 120, {0, 1, 2, 3, 4}, 4, rate=0.3)
    assert (labels != -100).any()
    full = cross_entropy(a(ids).reshape(-1, 120), labels.reshape(-1), reduction="sum")
    sparse = pretrain.lm_loss(b, {"input_ids": ids, "labels": labels})
    full.backward()
    sparse.backward()
    assert torch.allclose(full, sparse, rtol=1e-6)
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6), name


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("unpad", [False, True])
def test_last_block_on_selected_rows_equals_the_full_encoder_there(norm, unpad):
    """Encoder(rows=...) runs the last block's position-wise half on the selected rows only."""
    plain, sparse = twin(M.EncoderConfig(**TINY, norm=norm), unpad=unpad)
    plain.eval(), sparse.eval()
    ids, mask, types = ragged_batch()
    rows = mask.flatten().nonzero().squeeze(1)[torch.tensor([0, 3, 11, 12, 20, 25])]   # real tokens only
    with torch.no_grad():
        full = plain.encoder(ids, mask, types).reshape(-1, TINY["hidden_size"])[rows]
        picked = sparse.encoder(ids, mask, types, rows=rows)
    assert picked.shape == (6, TINY["hidden_size"])
    assert (full - picked).abs().max() < 1e-5


@pytest.mark.parametrize("unpad", [False, True])
def test_classifier_equals_pooling_the_full_encoder_output(unpad):
    """SequenceClassifier runs its last block on the [CLS] rows only; the logits are those of the whole
    encoder output pooled at [CLS]."""
    torch.manual_seed(0)
    model = M.SequenceClassifier(M.EncoderConfig(**TINY, unpad=unpad), num_labels=3).eval()
    ids, mask, types = ragged_batch()
    with torch.no_grad():
        full = model.classifier(model.pool(model.encoder(ids, mask, types)))
        assert (model(ids, mask, types) - full).abs().max() < 1e-5
        embeddings = model.encoder.embed(ids, types)
        assert (model(ids, mask, types, embeddings=embeddings) - full).abs().max() < 1e-5


# -----------------------------------------------------------------------------------------------------
# unpadded (packed) fine-tuning batches


@pytest.mark.parametrize("causal", [False, True])
def test_unpadded_encoder_equals_padded_on_real_tokens(causal):
    plain, packed = twin(M.EncoderConfig(**TINY, causal=causal), unpad=True)
    plain.eval(), packed.eval()
    ids, mask, types = ragged_batch()
    with torch.no_grad():
        a = plain.encoder(ids, mask, types)
        b = packed.encoder(ids, mask, types)
    real = mask.bool()
    assert (a - b)[real].abs().max() < 1e-5
    assert (b[~real] == 0).all()                    # padding rows come back as zeros, never NaN


def test_unpadded_classifier_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    cfg = M.EncoderConfig(**TINY, dropout=0.0, attention_dropout=0.0)
    plain = M.SequenceClassifier(cfg, num_labels=3)
    packed = M.SequenceClassifier(M.EncoderConfig(**{**cfg.to_dict(), "unpad": True}), num_labels=3)
    packed.load_state_dict(plain.state_dict())
    ids, mask, types = ragged_batch()
    labels = torch.tensor([0, 2, 1, 2])
    losses = [cross_entropy(m(ids, mask, types), labels) for m in (plain, packed)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    ga, gb = grads(plain), grads(packed)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5), name


def test_unpad_without_a_mask_or_with_prefixes_is_the_plain_path():
    plain, packed = twin(M.EncoderConfig(**TINY), unpad=True)
    plain.eval(), packed.eval()
    ids, mask, types = ragged_batch()
    with torch.no_grad():
        assert torch.equal(plain(ids), packed(ids))                      # no mask: nothing to remove

        class Prefix(torch.nn.Module):                                   # 3 learned key/value slots
            def __init__(self):
                super().__init__()
                self.kv = torch.nn.Parameter(torch.randn(2, 2, 3, 16))

            def forward(self):
                return self.kv[0], self.kv[1]

        for m in (plain, packed):
            torch.manual_seed(5)
            for block in m.encoder.blocks:
                block.attn.prefix = Prefix()
        a, b = plain.encoder(ids, mask, types), packed.encoder(ids, mask, types)
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def test_no_mask_equals_an_all_ones_mask():
    """Without padding, attention_mask=None skips building a mask and lets SDPA pick its fastest kernel."""
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig(**TINY)).eval()
    ids = ragged_batch()[0]
    with torch.no_grad():
        assert (model(ids) - model(ids, torch.ones_like(ids))).abs().max() < 1e-5


# -----------------------------------------------------------------------------------------------------
# the optimizer, torch.compile, bf16


def test_fused_foreach_and_plain_adamw_give_the_same_parameters():
    models = [M.LanguageModel(M.EncoderConfig(**TINY)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    start = {n: t.clone() for n, t in models[0].state_dict().items()}
    opts = [trainer.build_optimizer(m, 1e-2, impl=impl) for m, impl in zip(models, ["fused", "foreach", "plain"])]
    torch.manual_seed(3)
    ids = torch.randint(5, 120, (2, 8))
    for _ in range(3):
        for m, opt in zip(models, opts):
            torch.manual_seed(4)                                         # the same dropout masks
            m(ids).float().logsumexp(-1).sum().backward()
            opt.step()
            opt.zero_grad()
    ref = models[0].state_dict()
    assert (ref["encoder.blocks.0.ffn.fc1.weight"] - start["encoder.blocks.0.ffn.fc1.weight"]).abs().max() > 1e-3
    for m in models[1:]:
        for name, t in m.state_dict().items():
            assert torch.allclose(ref[name], t, atol=1e-6), name


def test_compiled_model_equals_eager():
    """The pre-training path (no padding mask) of a one-layer model: compiling takes about a minute on CPU."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("torch.compile on CPU needs a C compiler (cc/gcc/clang) and none is on PATH")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig(**{**TINY, "num_layers": 1})).eval()
    compiled = torch.compile(model)
    ids = ragged_batch()[0]
    with torch.no_grad():
        assert torch.allclose(compiled(ids), model(ids), atol=1e-5)


def test_bf16_autocast_training_step_runs_and_loss_is_close_to_fp32():
    torch.manual_seed(0)
    model = M.LanguageModel(M.EncoderConfig(**TINY, dropout=0.0, attention_dropout=0.0))
    ids, mask, types = ragged_batch()
    targets = ids.masked_fill(mask == 0, -100).reshape(-1)
    fp32 = cross_entropy(model(ids, mask, types).reshape(-1, 120), targets)
    opt = trainer.build_optimizer(model, 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, mask, types)
        bf16 = cross_entropy(logits.reshape(-1, 120), targets)
    assert logits.dtype == torch.bfloat16 and bf16.dtype == torch.float32   # the loss is taken in fp32
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()


# -----------------------------------------------------------------------------------------------------
# bench.py compares like with like


def test_bench_builds_models_of_identical_size_and_shape():
    pytest.importorskip("transformers")
    pytest.importorskip("pretrain")
    import bench
    for task in ("mlm", "cls"):
        ours, _, _ = bench.build("ours", task, bench.CONFIGS["mini"], "cpu")
        hf, _, _ = bench.build("hf", task, bench.CONFIGS["mini"], "cpu")
        assert M.count_parameters(ours) == M.count_parameters(hf), task
        assert ours.training and hf.training
        assert hf.config._attn_implementation == "sdpa"
        assert hf.config.hidden_dropout_prob == ours.config.dropout == 0.1


def test_bench_masks_fifteen_percent_and_never_special_tokens():
    pytest.importorskip("pretrain")
    import bench
    batches = bench.mlm_batches(bench.CONFIGS["mini"], 128, 32, n=2)
    for b in batches:
        masked = b["labels"] != -100
        assert 0.13 < masked.float().mean() < 0.17
        assert not masked[:, 0].any() and not masked[:, -1].any()         # [CLS] and [SEP]
        assert b["num_targets"] == int(masked.sum())


def test_bench_prints_one_json_object_and_rejects_bad_flags():
    pytest.importorskip("transformers")
    pytest.importorskip("pretrain")
    run = [sys.executable, str(ROOT / "bench.py"), "--config", "mini", "--task", "cls", "--steps", "1",
           "--warmup", "0", "--seq-len", "16", "8", "--batch-size", "2", "3", "--threads", "1", "--dropout", "0"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = json.loads(out.stdout)
    assert printed["env"]["dropout"] == 0.0
    assert [(r["seq_len"], r["batch_size"]) for r in printed["results"]] == [(16, 2), (8, 3)]   # paired
    result = printed["results"][0]
    assert result["task"] == "cls" and result["ours"]["tokens_per_s"] > 0 and result["hf"]["peak_mib"] > 0
    for flags, named in [(["--seq-len", "600"], "--seq-len"), (["--seq-len", "16", "32", "--batch-size", "1", "2", "3"],
                         "--batch-size"), (["--dropout", "1.5"], "--dropout")]:
        bad = subprocess.run(run[:2] + flags, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().startswith("error: " + named), bad.stderr
        assert "Traceback" not in bad.stderr
