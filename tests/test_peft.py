"""peft.py as a specification: each method trains exactly the parameters it claims (by name and by count),
LoRA is a small fraction of an encoder and merges into plain Linears without changing the outputs, adapters
and LoRA start at the pre-trained model, prefixes change attention and stay finite with padding, and a
saved PEFT model loads back to the same outputs."""
import pytest
import torch
import torch.nn as nn

import peft
from model import Encoder, EncoderConfig, SequenceClassifier, from_hf_bert, save_hf_bert

C, L, NH, LABELS = 32, 2, 2, 3
HEAD = {"pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"}
HEAD_COUNT = C * C + C + C * LABELS + LABELS


def tiny(norm="post", attention="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=50, hidden_size=C, num_layers=L, num_heads=NH, norm=norm, attention=attention,
                        dropout=0.0, attention_dropout=0.0, **overrides)
    return SequenceClassifier(cfg, LABELS).eval()


def batch(B=3, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0                                       # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(B, T, dtype=torch.long)}


def run(model, b):
    return model(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def perturb_trainable(model, seed=2):
    """Stand-in for training: move every trainable parameter (LoRA's B and the adapters' up leave zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# -----------------------------------------------------------------------------------------------------
# what each method trains


def test_full_trains_everything():
    model = tiny()
    peft.apply_peft(model, "full")
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert peft.trainable_summary(model)["encoder_percent"] == 100.0


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_top_k_trains_only_the_top_blocks_and_the_head(norm):
    model = tiny(norm)
    peft.apply_peft(model, "top", train_layers=1)
    top = {f"encoder.{n}" for n, _ in model.encoder.named_parameters() if n.startswith(f"blocks.{L - 1}.")}
    final = {"encoder.final_norm.weight", "encoder.final_norm.bias"} if norm == "pre" else set()
    assert trainable(model) == top | final | HEAD
    block = sum(p.numel() for p in model.encoder.blocks[L - 1].parameters())
    assert count(model) == block + (2 * C if norm == "pre" else 0) + HEAD_COUNT


def test_top_zero_is_a_linear_probe():
    model = tiny()
    peft.apply_peft(model, "top", train_layers=0)
    assert trainable(model) == HEAD


def test_bitfit_trains_exactly_the_biases_and_the_head():
    model = tiny()
    peft.apply_peft(model, "bitfit")
    biases = {n for n, _ in model.named_parameters() if n.startswith("encoder.") and n.endswith(".bias")}
    assert biases and trainable(model) == biases | HEAD
    # per block: qkv 3C, proj C, fc1 4C, fc2 C, two LayerNorm betas 2C; plus the embedding LayerNorm's C
    assert count(model) == L * (3 * C + C + 4 * C + C + 2 * C) + C + HEAD_COUNT


def test_adapter_trains_adapters_layernorms_and_head():
    model, m = tiny(), 8
    peft.apply_peft(model, "adapter", adapter_size=m)
    names = trainable(model)
    adapters = {n for n in names if ".adapter." in n}
    norms = {n for n in names if "norm" in n}
    assert names == adapters | norms | HEAD
    assert len(adapters) == L * 2 * 4                     # 2 adapters a block, down/up weight and bias
    assert all(".attn.proj.adapter." in n or ".ffn.fc2.adapter." in n for n in adapters)
    per_adapter = C * m + m + m * C + C
    assert count(model) == L * 2 * per_adapter + (1 + 2 * L) * 2 * C + HEAD_COUNT


def test_lora_trains_only_A_and_B_with_r_times_in_plus_out_each():
    model, r = tiny(), 4
    peft.apply_peft(model, "lora", lora_r=r, lora_targets=("qkv", "proj"))
    lora = {n for n in trainable(model) if ".lora_" in n}
    assert trainable(model) == lora | HEAD
    assert lora == {f"encoder.blocks.{i}.attn.{t}.lora_{ab}" for i in range(L) for t in ("qkv", "proj") for ab in "AB"}
    per_block = r * (C + 3 * C) + r * (C + C)             # qkv: in C, out 3C (Q, K and V together); proj: C -> C
    assert count(model) == L * per_block + HEAD_COUNT
    assert peft.peft_state_dict(model).keys() == lora | HEAD


def test_lora_is_under_one_percent_of_a_minilm_size_encoder():
    """all-MiniLM-L6-v2's shape: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522."""
    cfg = EncoderConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)
    for targets, per_layer in ((("qkv",), 8 * (384 + 3 * 384)), (("qkv", "proj"), 8 * (384 + 3 * 384) + 8 * (384 + 384))):
        model = Encoder(cfg)
        peft.apply_peft(model, "lora", lora_r=8, lora_targets=targets)
        s = peft.trainable_summary(model)
        assert s["encoder_trainable"] == s["trainable"] == 6 * per_layer       # 73,728 for qkv alone
        assert s["encoder_total"] == sum(p.numel() for p in Encoder(cfg).parameters())
        assert s["encoder_percent"] <= 1.0, s["encoder_percent"]


def test_prefix_trains_only_the_prefixes_and_the_head():
    model, P = tiny(), 5
    peft.apply_peft(model, "prefix", prefix_len=P)
    assert trainable(model) == {f"encoder.blocks.{i}.attn.prefix.{kv}" for i in range(L) for kv in "kv"} | HEAD
    assert count(model) == L * 2 * NH * P * (C // NH) + HEAD_COUNT


@pytest.mark.parametrize("method", peft.METHODS)
def test_gradients_reach_exactly_the_trainable_parameters(method):
    model = tiny()
    peft.apply_peft(model, method, train_layers=1, lora_r=2, adapter_size=4, prefix_len=3)
    run(model, batch()).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable(model)
    s = peft.trainable_summary(model)
    assert s["names"] == [n for n, p in model.named_parameters() if p.requires_grad]
    assert s["trainable"] == count(model) and abs(s["percent"] - 100 * s["trainable"] / s["total"]) < 1e-9


# -----------------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapters_start_at_the_pretrained_model(method):
    model, b = tiny(), batch()
    before = run(model, b)
    peft.apply_peft(model, method)
    assert torch.equal(run(model, b), before)


def test_lora_linear_is_its_equation():
    torch.manual_seed(0)
    base = nn.Linear(6, 10)
    lora = peft.LoRALinear(base, r=3, alpha=12)
    nn.init.normal_(lora.lora_B)
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (12 / 3) * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert torch.allclose(lora(x), expected, atol=1e-6)
    assert lora.weight is base.weight and not any(n in ("weight", "bias") for n, _ in lora.named_children())


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lora_merge_gives_identical_outputs_and_plain_linears(norm):
    model, b = tiny(norm), batch()
    peft.apply_peft(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_targets=("qkv", "proj", "fc1"))
    perturb_trainable(model)
    model.eval()
    before = run(model, b)
    assert peft.merge_lora(model) is model
    assert torch.allclose(run(model, b), before, atol=1e-5)
    for block in model.encoder.blocks:
        for lin in (block.attn.qkv, block.attn.proj, block.ffn.fc1):
            assert type(lin) is nn.Linear and not lin.weight.requires_grad
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(tiny(norm).state_dict())


@pytest.mark.parametrize("attention,unpad", [("sdpa", False), ("math", False), ("sdpa", True)])
def test_prefix_changes_attention_output_and_stays_finite_with_padding(attention, unpad):
    model, b = tiny(attention=attention, unpad=unpad), batch()
    b["attention_mask"][2] = 0                            # a row of nothing but padding
    before = model.encoder(b["input_ids"], b["attention_mask"])
    peft.apply_peft(model, "prefix", prefix_len=4)
    after = model.encoder(b["input_ids"], b["attention_mask"])
    assert torch.isfinite(after).all()
    assert not torch.allclose(after[0], before[0], atol=1e-4)
    after.sum().backward()
    grads = [model.encoder.blocks[i].attn.prefix.k.grad for i in range(L)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# -----------------------------------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("method", peft.METHODS)
def test_save_and_load_restore_exact_outputs(method, tmp_path):
    """The base + head in the BERT layout (inside without_peft) plus peft.safetensors give the same model;
    peft.safetensors alone on the original pre-trained checkpoint does too (it holds all that trained)."""
    pretrained, out, b = tmp_path / "pretrained", tmp_path / "finetuned", batch()
    save_hf_bert(tiny(), str(pretrained))
    options = {"train_layers": 1, "lora_r": 2, "lora_targets": ("qkv", "fc2"), "adapter_size": 4, "prefix_len": 3}
    model = from_hf_bert(str(pretrained), head="classifier", num_labels=LABELS).eval()
    peft.apply_peft(model, method, **options)
    perturb_trainable(model)
    expected = run(model, b)
    with peft.without_peft(model):
        save_hf_bert(model, str(out))
    peft.save_peft(model, str(out), method, options)
    for base in (out, pretrained):
        restored = from_hf_bert(str(base), head="classifier", num_labels=LABELS).eval()
        cfg = peft.load_peft(restored, str(out))
        assert cfg["method"] == method
        assert torch.equal(run(restored, b), expected)
        assert trainable(restored) == trainable(model)


def test_without_peft_shows_the_base_model_and_puts_everything_back():
    b, plain_keys = batch(), set(tiny().state_dict())
    for method in ("lora", "adapter", "prefix"):
        model = tiny()
        peft.apply_peft(model, method, lora_r=2, adapter_size=4, prefix_len=2)
        perturb_trainable(model)
        expected = run(model, b)
        with peft.without_peft(model):
            assert set(model.state_dict()) == plain_keys
            assert not any(isinstance(m, peft.PEFT_MODULES) for m in model.modules())
        assert torch.equal(run(model, b), expected)
        assert any(isinstance(m, peft.PEFT_MODULES) for m in model.modules())


# -----------------------------------------------------------------------------------------------------
# errors


def test_bad_options_are_one_line_errors():
    for method, kw, msg in [("loRA", {}, "PEFT method must be one of"),
                            ("lora", {"lora_targets": ("qkv", "query")}, "lora target 'query' matches no Linear"),
                            ("lora", {"lora_r": 0}, "lora_r must be"),
                            ("top", {"train_layers": L + 1}, "train_layers must be in 0..2"),
                            ("adapter", {"adapter_size": 0}, "adapter_size must be"),
                            ("prefix", {"prefix_len": 0}, "prefix_len must be")]:
        model = tiny()
        with pytest.raises(peft.PeftError, match=msg):
            peft.apply_peft(model, method, **kw)
        assert len(trainable(model)) == len(list(model.parameters()))       # left as it was
        assert not any(isinstance(m, peft.PEFT_MODULES) for m in model.modules())
    model = tiny()
    peft.apply_peft(model, "lora")
    with pytest.raises(peft.PeftError, match="already has PEFT modules"):
        peft.apply_peft(model, "adapter")


def test_loading_into_the_wrong_model_names_the_file(tmp_path):
    with pytest.raises(peft.PeftError, match="peft.json: not found"):
        peft.load_peft(tiny(), str(tmp_path))
    model = tiny()
    peft.apply_peft(model, "lora")
    peft.save_peft(model, str(tmp_path), "lora", {})
    (tmp_path / "peft.json").write_text('{"method": "adapter", "options": {}}')
    with pytest.raises(peft.PeftError, match=r"peft.safetensors: .*(not in the model|missing)"):
        peft.load_peft(tiny(), str(tmp_path))
    (tmp_path / "peft.json").write_text('{"method": "lora", "options": {"lora_rank": 4}}')
    with pytest.raises(peft.PeftError, match="peft.json: .*lora_rank"):
        peft.load_peft(tiny(), str(tmp_path))
    with pytest.raises(peft.PeftError, match="unknown PEFT options"):
        peft.save_peft(model, str(tmp_path), "lora", {"rank": 4})


# -----------------------------------------------------------------------------------------------------
# a new method is one function and one row of peft.METHODS


class GainedLinear(peft.PeftModule):
    """A toy method: a frozen Linear whose output is scaled per channel by a learned gain (IA3-like)."""

    def __init__(self, base: nn.Linear, init: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.gain = nn.Parameter(torch.full((base.out_features,), init))

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) * self.gain

    def plain(self):
        return peft.linear_like(self.weight, self.bias)


def gain(encoder, gain_init):
    if gain_init <= 0:
        raise peft.PeftError(f"gain_init must be > 0, got {gain_init}")
    for block in encoder.blocks:
        block.ffn.fc2 = GainedLinear(block.ffn.fc2, gain_init)
    return []


def test_a_toy_method_added_as_one_row_and_its_options_trains_saves_loads_and_gets_its_flags(monkeypatch, tmp_path):
    import config
    import finetune
    options = {"gain_init": (1.0, float, "gain: start")}
    monkeypatch.setitem(config.PEFT_OPTIONS, "gain", options)          # the flags: torch-free, for --help
    monkeypatch.setitem(peft.METHODS, "gain", peft.Method(gain, 1e-2, config.PEFT_OPTIONS["gain"]))
    pretrained, out, b = tmp_path / "pretrained", tmp_path / "finetuned", batch()
    save_hf_bert(tiny(), str(pretrained))
    model = from_hf_bert(str(pretrained), head="classifier", num_labels=LABELS).eval()
    expected_before = run(model, b)
    peft.apply_peft(model, "gain", gain_init=1.0, lora_r=4)          # other methods' options are ignored
    assert torch.equal(run(model, b), expected_before)                 # a gain of 1 starts at the pre-trained model
    assert trainable(model) == {f"encoder.blocks.{i}.ffn.fc2.gain" for i in range(L)} | HEAD
    assert peft.trainable_summary(model)["encoder_trainable"] == L * C
    perturb_trainable(model)
    expected = run(model, b)
    with peft.without_peft(model):
        save_hf_bert(model, str(out))
    peft.save_peft(model, str(out), "gain", {"gain_init": 1.0})
    restored = from_hf_bert(str(out), head="classifier", num_labels=LABELS).eval()
    peft.load_peft(restored, str(out))
    assert torch.equal(run(restored, b), expected)
    with pytest.raises(peft.PeftError, match="gain_init must be > 0"):
        peft.apply_peft(tiny(), "gain", gain_init=0.0)
    args = finetune.build_parser().parse_args(["--method", "gain", "--gain-init", "0.5"])
    assert (args.method, args.gain_init) == ("gain", 0.5)
