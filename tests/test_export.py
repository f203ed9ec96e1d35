"""export.py: int8 quantization, magnitude pruning, head pruning and LoRA merging each write a folder that
reloads and predicts; the math of each step holds on its own; --report measures every stage."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export
import int8
import predict
from export import choose_heads, magnitude_prune, remove_heads, sparsity
from int8 import Int8Embedding, Int8Linear, dequantize_rows, quantize_rows
from finetuned import load_finetuned, predict_proba, save_finetuned
from model import EncoderConfig, SequenceClassifier
from predict import load_model
from test_predict import toy_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model(tmp_path_factory.getbasetemp())


def run_export(capsys, *argv):
    export.main([str(a) for a in argv])
    return capsys.readouterr().out


def probs_of(folder, texts):
    model, tok, info = load_model(folder)
    return predict_proba(model, tok, texts, info=info)


# -----------------------------------------------------------------------------------------------------
# int8


def test_int8_rounding_error_is_at_most_half_a_step_and_zero_stays_exact():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]      # rows on very different scales
    w[3] = 0.0                                                         # an all-zero row (a pruned channel)
    w[5] = w[5].abs() + 0.1                                            # all positive: the range is [0, max]
    w[7, ::2] = 0.0                                                    # pruned weights inside a row
    q, scale, zero = quantize_rows(w)
    assert q.dtype == torch.int8 and zero.dtype == torch.int8 and scale.shape == (64,)
    w_hat = dequantize_rows(q, scale, zero)
    assert ((w - w_hat).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (w_hat[w == 0] == 0).all()
    assert zero[5] == -128 and q[5].max() == 127                       # [0, max]: code -128 is 0, 127 is max


@pytest.mark.parametrize("kernel", ["fbgemm", "float"])
def test_int8_linear_computes_x_times_the_dequantized_weight(kernel, monkeypatch):
    if kernel == "float":
        monkeypatch.setattr(int8, "_fbgemm_pack", lambda *a: None)
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    q, s, z = quantize_rows(lin.weight)
    layer = Int8Linear(q, s, z, lin.bias.detach().clone())
    if kernel == "fbgemm" and layer.packed is None:
        pytest.skip("this torch build has no fbgemm int8 kernels")
    x = torch.randn(2, 7, 48)
    expected = F.linear(x, dequantize_rows(q, s, z), lin.bias)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 7, 40)
    if kernel == "float":
        torch.testing.assert_close(y, expected)
    else:    # fbgemm also rounds the activations to 7 bits: a small error, relative to the outputs' size
        assert (y - expected).abs().max() < 0.05 * expected.abs().max()


def test_int8_embedding_returns_the_dequantized_rows():
    table = torch.randn(30, 16)
    q, s, z = quantize_rows(table)
    ids = torch.tensor([[1, 5, 5], [29, 0, 2]])
    torch.testing.assert_close(Int8Embedding(q, s, z)(ids), dequantize_rows(q, s, z)[ids])


def test_int8_folder_reloads_smaller_and_agrees_with_float(toy, tmp_path, capsys):
    out = tmp_path / "int8"
    run_export(capsys, toy["dir"], "--out", out, "--quantize", "int8")
    model, _, info = load_model(str(out))
    assert isinstance(model.encoder.blocks[0].attn.qkv, Int8Linear) and isinstance(model.encoder.embed.tok, Int8Embedding)
    assert not (out / "model.safetensors").exists() and info["export"]["quantize"].startswith("int8")
    float_bytes = os.path.getsize(os.path.join(toy["dir"], "model.safetensors"))
    assert os.path.getsize(out / export.INT8_WEIGHTS) < 0.4 * float_bytes
    p_float, p_int8 = probs_of(toy["dir"], toy["texts"]), probs_of(str(out), toy["texts"])
    assert (p_float.argmax(1) == p_int8.argmax(1)).mean() >= 0.95
    assert np.abs(p_float - p_int8).max() < 0.1


def test_a_damaged_int8_folder_is_a_checkpoint_error(toy, tmp_path, capsys):
    out = tmp_path / "int8"
    run_export(capsys, toy["dir"], "--out", out, "--quantize", "int8")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 2 * cfg["intermediate_size"]}))
    with pytest.raises(ValueError, match="does not fit config.json"):
        load_model(str(out))


# -----------------------------------------------------------------------------------------------------
# pruning


def test_magnitude_pruning_zeroes_the_smallest_weights_over_all_layers():
    torch.manual_seed(0)
    model = SequenceClassifier(EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2), 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    magnitude_prune(model, 0.6)
    assert sparsity(model) == pytest.approx(0.6, abs=1e-3)
    pruned, kept = [], []
    for name, p in model.named_parameters():
        if name.startswith("encoder.blocks") and name.endswith("weight") and p.dim() == 2:
            pruned.append(before[name][p == 0].abs())
            kept.append(p[p != 0].abs())
        else:                                  # embeddings, LayerNorms, biases, pooler, classifier: untouched
            assert torch.equal(p, before[name]), name
    assert torch.cat(pruned).max() <= torch.cat(kept).min()           # one global threshold


def test_pruned_folder_has_the_stated_sparsity_and_still_predicts(toy, tmp_path, capsys):
    out = tmp_path / "pruned"
    run_export(capsys, toy["dir"], "--out", out, "--prune", "0.4")
    model, _, info = load_finetuned(str(out))                         # a plain BERT-layout folder
    assert sparsity(model) == pytest.approx(0.4, abs=1e-3) and info["export"]["sparsity"] == pytest.approx(0.4, abs=1e-3)
    p = probs_of(str(out), toy["texts"])
    assert (p.argmax(1) == np.array(toy["labels"])).mean() > 0.8


def test_sparse_encoding_round_trips_bit_for_bit_and_stores_only_what_shrinks():
    from sparse import encode, load_sparse, pack_bits, save_sparse, unpack_bits
    keep = torch.rand(77) < 0.3
    assert torch.equal(pack_bits(keep), torch.from_numpy(np.packbits(keep.numpy())))   # numpy's bit order
    assert torch.equal(unpack_bits(pack_bits(keep), 77), keep)
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    w[torch.rand(40, 24) < 0.7] = 0
    tensors = {"w": w, "dense": torch.randn(8, 8), "ids": torch.arange(6), "half": w.half()}
    out, shapes = encode(tensors)
    assert shapes == {"w": [40, 24], "half": [40, 24]} and "dense" in out and "ids" in out   # no zeros: stays dense
    assert out["w.values"].numel() == int((w != 0).sum()) and out["w.mask"].numel() == 40 * 24 // 8
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_sparse(tensors, os.path.join(d, "s.safetensors"))
        back = load_sparse(os.path.join(d, "s.safetensors"))
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]), k


def test_pruned_folder_is_stored_sparsely_smaller_with_sparsity_and_predicts_identically(toy, tmp_path, capsys):
    sizes, texts = {}, toy["texts"][:64]
    for s in (0.3, 0.7):
        out = tmp_path / f"p{s}"
        dense = tmp_path / f"p{s}-dense"
        run_export(capsys, toy["dir"], "--out", out, "--prune", str(s))
        run_export(capsys, toy["dir"], "--out", dense, "--prune", str(s), "--dense")
        assert (out / "model.sparse.safetensors").is_file() and not (out / "model.safetensors").exists()
        assert (dense / "model.safetensors").is_file() and not (dense / "model.sparse.safetensors").exists()
        a, b = load_finetuned(str(out))[0], load_finetuned(str(dense))[0]
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name                           # the same weights, bit for bit
        assert np.array_equal(probs_of(str(out), texts), probs_of(str(dense), texts))
        sizes[s] = (os.path.getsize(out / "model.sparse.safetensors"), os.path.getsize(dense / "model.safetensors"))
    assert sizes[0.7][0] < sizes[0.3][0] < sizes[0.3][1] == sizes[0.7][1]


def test_removing_a_head_equals_gating_its_output_to_zero():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, dropout=0.0, attention_dropout=0.0)
    model = SequenceClassifier(cfg, 3).eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    gate = torch.ones(32)
    gate[8:16] = 0.0                                                   # head 1 of 4 (head_dim 8) in layer 0
    hook = model.encoder.blocks[0].attn.proj.register_forward_pre_hook(lambda m, args: (args[0] * gate,))
    with torch.no_grad():
        expected = model(ids, mask)
    hook.remove()
    remove_heads(model, {0: [1]})
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), expected)
    assert model.encoder.blocks[0].attn.qkv.weight.shape == (3 * 24, 32) and model.config.layer_heads == [3, 4]


def test_choose_heads_takes_the_least_important_and_keeps_one_per_layer():
    importance = [torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.05, 0.8])]
    assert choose_heads(importance, 2) == {0: [0], 1: [1]}             # not both of layer 0: one must stay
    assert choose_heads(importance, 3) == {0: [0], 1: [1, 2]}
    with pytest.raises(ValueError, match="at most 3"):
        choose_heads(importance, 4)


def test_head_pruned_folder_records_the_heads_and_predicts(toy, tmp_path, capsys):
    out = tmp_path / "heads"
    run_export(capsys, toy["dir"], "--out", out, "--prune-heads", "3", "--calib", toy["dev"], "--calib-examples", "64")
    info = json.loads((out / "labels.json").read_text())
    removed = info["export"]["pruned_heads"]
    assert sum(map(len, removed.values())) == 3 and all(len(h) < 4 for h in removed.values())
    model, _, _ = load_model(str(out))
    for layer, heads in removed.items():
        attn = model.encoder.blocks[int(layer)].attn
        assert attn.num_heads == 4 - len(heads)
    assert probs_of(str(out), toy["texts"]).shape == (len(toy["texts"]), 2)


# -----------------------------------------------------------------------------------------------------
# LoRA, TorchScript, the report, the command line


def test_merged_lora_folder_predicts_as_the_lora_model(toy, tmp_path, capsys):
    from peft import apply_peft
    model, tok, info = load_finetuned(toy["dir"])
    apply_peft(model, "lora", lora_r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)                                     # a trained-looking, non-zero update
    lora = tmp_path / "lora"
    save_finetuned(str(lora), model, tok, info | {"method": "lora", "peft": {"lora_r": 4}})
    with pytest.raises(SystemExit):
        export.main([str(lora), "--out", str(tmp_path / "unmerged")])
    assert "pass --merge-lora" in capsys.readouterr().err
    run_export(capsys, lora, "--out", tmp_path / "merged", "--merge-lora")
    assert not (tmp_path / "merged" / "peft.json").exists()
    assert json.loads((tmp_path / "merged" / "labels.json").read_text())["export"]["source_method"] == "lora"
    np.testing.assert_allclose(probs_of(str(tmp_path / "merged"), toy["texts"]), probs_of(str(lora), toy["texts"]), atol=1e-5)


def test_torchscript_export_gives_the_same_logits(toy, tmp_path, capsys):
    out = tmp_path / "ts"
    printed = run_export(capsys, toy["dir"], "--out", out, "--torchscript", "--onnx")
    traced = torch.jit.load(str(out / "model.torchscript.pt"))
    model, tok, _ = load_model(str(out))
    enc = tok(toy["texts"][:7])
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    with torch.no_grad():
        torch.testing.assert_close(traced(*args), model(*args))
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert "skipping ONNX export: the onnx package is not installed" in printed


def test_report_measures_size_latency_and_accuracy_of_every_stage(toy, tmp_path, capsys):
    out = tmp_path / "all"
    printed = run_export(capsys, toy["dir"], "--out", out, "--prune-heads", "2", "--prune", "0.3", "--quantize", "int8",
                         "--report", toy["dev"], "--repeats", "1", "--calib-examples", "32")
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["float", "heads -2", "pruned 30%", "int8"]
    for r in rows:
        assert r["size_mb"] > 0 and r["ms_batch1"] > 0 and r["ms_batch32"] > 0
        assert 0.5 <= r["accuracy"] <= 1 and 0 <= r["agree_with_float"] <= 1
    assert rows[0]["agree_with_float"] == 1.0
    assert rows[-1]["size_mb"] < 0.5 * rows[0]["size_mb"]
    assert "variant" in printed and "int8" in printed


@pytest.mark.parametrize("argv, message", [
    (["--prune", "1.5"], "--prune: expected a fraction"),
    (["--prune-heads", "2"], "--prune-heads needs labelled examples"),
    (["--merge-lora"], "--merge-lora"),
])
def test_bad_flags_are_one_line_errors(toy, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        export.main([toy["dir"], "--out", str(tmp_path / "x")] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err


def test_export_never_writes_into_a_folder_in_use(toy, capsys):
    with pytest.raises(SystemExit):
        export.main([toy["dir"], "--out", toy["dir"], "--quantize", "int8"])
    assert "not empty" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(toy["dir"], export.INT8_WEIGHTS))


# -----------------------------------------------------------------------------------------------------
# ONNX


def test_onnx_in_onnxruntime_gives_pytorchs_probabilities_and_joins_the_report(toy, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    printed = run_export(capsys, toy["dir"], "--out", out, "--onnx", "--report", toy["dev"], "--repeats", "1")
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    texts = toy["texts"]                                  # 160 dev sentences, batched by length as predict does
    torch_probs = predict.Predictor([toy["dir"]])(texts)
    onnx_probs = predict.Predictor([str(out)], runtime="onnx")(texts)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    int8_probs = predict.Predictor([str(out)], runtime="onnx-int8")(texts)
    assert (int8_probs.argmax(1) == torch_probs.argmax(1)).mean() >= 0.95
    rows = {r["variant"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"float", "onnxruntime float", "onnxruntime int8"}
    assert rows["onnxruntime float"]["agree_with_float"] == 1.0
    assert rows["onnxruntime float"]["accuracy"] == rows["float"]["accuracy"]
    assert rows["onnxruntime int8"]["size_mb"] < rows["onnxruntime float"]["size_mb"]
    assert all(r["ms_batch1"] > 0 and r["ms_batch32"] > 0 for r in rows.values())
    assert "onnxruntime int8" in printed


def test_int8_and_onnx_in_one_run_give_all_four_rows_with_the_float_graph_for_onnxruntime(toy, tmp_path):
    # the export table compares PyTorch's int8 with onnxruntime's in the same run: --quantize int8 --onnx
    # writes the int8 folder and the ONNX graphs of the float model (onnxruntime quantizes it itself)
    pytest.importorskip("onnxruntime")
    out = tmp_path / "both"
    export.main([toy["dir"], "--out", str(out), "--quantize", "int8", "--onnx", "--report", toy["dev"], "--repeats", "1"])
    rows = {r["variant"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert list(rows) == ["float", "int8", "onnxruntime float", "onnxruntime int8"]
    assert rows["onnxruntime float"]["agree_with_float"] == 1.0          # the float graph, not the int8 model
    np.testing.assert_allclose(predict.Predictor([str(out)], runtime="onnx")(toy["texts"][:20]),
                               predict.Predictor([toy["dir"]])(toy["texts"][:20]), atol=1e-4)
    assert (out / "model.int8.safetensors").is_file()                  # and OUT itself is PyTorch's int8


def test_predict_runs_the_onnx_graph_from_the_command_line(toy, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    run_export(capsys, toy["dir"], "--out", out, "--onnx")
    texts = toy["texts"][:3]
    predict.main([str(out), *texts, "--runtime", "onnx", "--format", "jsonl"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([list(r["probs"].values()) for r in rows], predict.Predictor([toy["dir"]])(texts),
                               atol=1e-4)
    with pytest.raises(SystemExit):                       # a folder without the graph: one line, not a traceback
        predict.main([toy["dir"], "text", "--runtime", "onnx"])
    assert "model.onnx: not found" in capsys.readouterr().err
