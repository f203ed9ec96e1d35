"""Export a fine-tuned model for inference: merge LoRA, prune heads, prune weights, quantize to int8.

    python export.py out/sst2 --out out/sst2-int8 --quantize int8 --report sst2/dev.tsv
    python export.py out/sst2-lora --out out/sst2-small --merge-lora --prune-heads 4 --prune 0.3
    python export.py out/sst2 --out out/sst2-p70 --prune 0.7      # stored sparsely: 69 % of the dense size for MiniLM

Read beside docs/deployment.md. The steps run in this order, each optional:

    load (finetuned.load_finetuned) -> merge LoRA -> remove N attention heads (least important first)
        -> global magnitude pruning of the encoder's Linear weights -> int8 -> write DST

DST is inference-only: config.json + weights + tokenizer + labels.json. A float result is the BERT layout
(model.safetensors), read by finetuned.load_finetuned like any fine-tuned folder; an int8 result stores
model.int8.safetensors (int8 codes + per-row scale and zero point, no pickled code), read by `int8.load_int8`.
After --prune, a float result stores its weights sparsely (model.sparse.safetensors: a bitmask and the non-zero
values, `sparse.py`), so the folder shrinks with the sparsity; load_finetuned reads it back bit for bit.
--dense keeps model.safetensors (what other libraries read).
predict.load_model picks between the two. `--report DEV` measures every stage side by side.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings

from config import fail

# -----------------------------------------------------------------------------------------------------
# the command line first: --help and a bad flag are answered before the imports below load torch (seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Compress a fine-tuned model into an inference-only folder.",
                                allow_abbrev=False)
    p.add_argument("src", help="a fine-tuned model folder (finetune.py)")
    p.add_argument("--out", required=True, help="the new folder (must not exist, or be empty)")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA updates into the weights")
    p.add_argument("--prune-heads", type=int, default=0, metavar="N", help="remove the N least important heads")
    p.add_argument("--prune", type=float, default=0.0, metavar="SPARSITY",
                   help="zero this fraction of the encoder's Linear weights")
    p.add_argument("--dense", action="store_true", help="after --prune, keep the dense model.safetensors "
                   "(readable by other libraries) instead of the sparse model.sparse.safetensors")
    p.add_argument("--quantize", choices=("int8",), help="int8 weights (Linear layers and the token embeddings)")
    p.add_argument("--calib", help="labelled examples for head importance (default: the --report file)")
    p.add_argument("--calib-examples", type=int, default=256, help="how many of them to use")
    p.add_argument("--torchscript", action="store_true", help="also write model.torchscript.pt")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx and model.int8.onnx for onnxruntime, "
                   "from the float model (before --quantize; onnxruntime quantizes it its own way); needs onnx")
    p.add_argument("--report", metavar="DEV", help="a labelled dev file: measure every stage on it")
    p.add_argument("--report-json", help="where the report goes (default: OUT/report.json)")
    p.add_argument("--repeats", type=int, default=5, help="timing passes per measurement (the median is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing (default 1)")
    p.add_argument("--text-col")
    p.add_argument("--text-pair-col")
    p.add_argument("--label-col", help="the label column of --report/--calib (default: label)")
    return p


if __name__ == "__main__":
    ARGS = build_parser().parse_args()

import torch  # noqa: E402  (the heavy imports come after the command line, on purpose)
import torch.nn as nn  # noqa: E402

from atomic import atomic_write, write_json  # noqa: E402
from finetuned import TASKS, save_finetuned  # noqa: E402
from int8 import INT8_WEIGHTS, is_int8, quantize_model, save_int8  # noqa: E402
from predict import InputError, Predictor, load_model  # noqa: E402
from sparse import SPARSE_WEIGHTS, sparsify_folder  # noqa: E402



def save_folder(model: nn.Module, tokenizer, info: dict, out: str, sparse: bool = False) -> None:
    """DST as described at the top. The weights are plain now (LoRA merged, other methods only chose what
    trained), so labels.json says method "full": nothing to re-apply on loading; `export` keeps the story.
    sparse: store the float weights as bitmask + non-zero values (after pruning)."""
    info = info | {"method": "full", "peft": None}
    if is_int8(model):
        save_int8(out, model, tokenizer, info)
    else:
        save_finetuned(out, model, tokenizer, info)          # BERT layout + labels.json, for load_finetuned
        if sparse:
            sparsify_folder(out)


# -----------------------------------------------------------------------------------------------------
# pruning


def encoder_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]


def sparsity(model: nn.Module) -> float:
    """The fraction of exact zeros among the encoder's Linear weights."""
    weights = [m.weight for m in encoder_linears(model)]
    return sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)


@torch.no_grad()
def magnitude_prune(model: nn.Module, target: float) -> None:
    """Zero the `target` fraction of the encoder's Linear weights with the smallest |w|, with one threshold
    for all layers (global), so layers with many small weights lose more of them."""
    weights = [m.weight for m in encoder_linears(model)]
    scores = torch.cat([w.abs().flatten() for w in weights])
    k = int(round(target * scores.numel()))
    if k == 0:
        return
    tau = torch.kthvalue(scores, k).values     # keep w iff |w| > tau, the k-th smallest |w|  [eq:magnitude-prune]
    for w in weights:
        w.masked_fill_(w.abs() <= tau, 0.0)


def head_importance(model, tokenizer, info, texts, pairs, gold, batch_size: int = 8) -> list[torch.Tensor]:
    """Michel et al. (2019): multiply each head's output by a gate xi_h = 1 and take I_h = sum over batches
    of |dL/dxi_h|, how much the loss would move if the head were scaled down; then normalise each layer's
    scores to unit L2 norm (their finding: this ranks heads across layers better)."""
    blocks = model.encoder.blocks
    gates = [torch.ones(b.attn.num_heads, requires_grad=True) for b in blocks]

    def gate(i, head_dim):                     # the heads, concatenated, are the input of attn.proj
        return lambda module, args: (args[0] * gates[i].repeat_interleave(head_dim).to(args[0].dtype),)

    hooks = [b.attn.proj.register_forward_pre_hook(gate(i, b.attn.head_dim)) for i, b in enumerate(blocks)]
    scores = [torch.zeros(b.attn.num_heads) for b in blocks]
    try:
        with torch.enable_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], None if pairs is None else pairs[i:i + batch_size],
                                max_length=info["max_length"])
                logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
                loss = TASKS[info["task"]].loss(logits, gold[i:i + batch_size])   # the fine-tuning loss
                grads = torch.autograd.grad(loss, gates)
                for s, g in zip(scores, grads):
                    s += g.abs()                 # I_h = sum_batches |dL/dxi_h|  [eq:head-importance]
    finally:
        for h in hooks:
            h.remove()
    return [s / s.norm().clamp(min=1e-12) for s in scores]


def choose_heads(importance: list[torch.Tensor], n: int) -> dict[int, list[int]]:
    """The n least important heads over all layers, never the last head of a layer: {layer: [heads]}."""
    left = [len(s) for s in importance]
    if n > sum(left) - len(left):
        raise InputError(f"--prune-heads {n}: at most {sum(left) - len(left)} heads can go (each layer keeps one)")
    ranked = sorted((float(s), layer, h) for layer, scores in enumerate(importance) for h, s in enumerate(scores))
    drop: dict[int, list[int]] = {}
    for _, layer, h in ranked:
        if len(drop.get(layer, [])) < left[layer] - 1 and sum(map(len, drop.values())) < n:
            drop.setdefault(layer, []).append(h)
    return {layer: sorted(heads) for layer, heads in sorted(drop.items())}


@torch.no_grad()
def remove_heads(model: nn.Module, drop: dict[int, list[int]]) -> None:
    """Take heads out of their layers. A head is hs rows in each of W_Q, W_K, W_V (and their biases) and
    hs columns of W_O; those rows and columns are cut out, and the layer keeps fewer heads
    (EncoderConfig.layer_heads records how many, so the smaller model loads again)."""
    for layer, heads in drop.items():
        attn = model.encoder.blocks[layer].attn
        hs, nh = attn.head_dim, attn.num_heads
        keep = torch.tensor([c for h in range(nh) if h not in heads for c in range(h * hs, (h + 1) * hs)])
        rows = torch.cat([keep + part * nh * hs for part in range(3)])       # in each of Q, K, V
        attn.qkv = _linear(attn.qkv.weight[rows], attn.qkv.bias[rows])          # (3 nh' hs, C)
        attn.proj = _linear(attn.proj.weight[:, keep], attn.proj.bias)          # (C, nh' hs)
        attn.num_heads = nh - len(heads)
    model.config.layer_heads = [b.attn.num_heads for b in model.encoder.blocks]


def _linear(weight, bias) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    lin.weight.copy_(weight)
    lin.bias.copy_(bias)
    return lin


# -----------------------------------------------------------------------------------------------------
# labelled data, and the side-by-side report


def labelled(path: str, info: dict, args):
    """(texts, pairs or None, gold) of a labelled file, read and encoded as finetune.py reads its dev set:
    gold holds class ids (0./1. for binary) or scores."""
    from data.tasks import encode_labels, read_examples
    ex = read_examples([path], args.text_col, args.text_pair_col, args.label_col)
    return ex.texts, ex.pairs, torch.tensor(encode_labels(info["task"], ex, info["labels"]))


# what inference reads; a fine-tuning folder also holds checkpoint.pt (with the optimizer), logs, predictions
MODEL_FILES = ("config.json", "labels.json", "model.safetensors", SPARSE_WEIGHTS, INT8_WEIGHTS, "peft.json", "peft.safetensors",
               "vocab.txt", "tokenizer.model", "tokenizer_config.json")


def model_mb(path: str) -> float:
    """Size on disk of the files inference reads, in MiB."""
    files = [os.path.join(path, f) for f in MODEL_FILES]
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / 2**20


def latencies_ms(predictors: list[Predictor], texts, pairs, batch: int, repeats: int) -> list[float]:
    """Each predictor's median milliseconds per example over `repeats` passes of a fixed sample, in batches of
    `batch` (tokenization included: what a caller waits for). The predictors take turns pass by pass, the
    order flipping each pass, so that a busy neighbour on the machine slows them all alike (as in bench.py)."""
    n = min(len(texts), 64 if batch == 1 else 8 * batch)
    chunks = [(texts[i:i + batch], None if pairs is None else pairs[i:i + batch]) for i in range(0, n, batch)]
    for predictor in predictors:
        predictor(*chunks[0])                                        # warm-up: first-call allocations
    times = [[] for _ in predictors]
    for r in range(repeats):
        order = range(len(predictors)) if r % 2 == 0 else reversed(range(len(predictors)))
        for i in order:
            for t, p in chunks:
                start = time.perf_counter()
                predictors[i](t, p)
                times[i].append((time.perf_counter() - start) * 1000 / len(t))
    return [statistics.median(t) for t in times]


def score(name: str, folder: str, predictor: Predictor, texts, pairs, gold, task: str, reference=None) -> tuple:
    """(one report row without latencies, the predictions: labels, or scores for regression) of one stage."""
    out = predictor(texts, pairs)
    row = {"variant": name, "size_mb": model_mb(folder)}
    if task == "regression":
        from metrics import pearson
        row["pearson"] = pearson(gold.numpy(), out)
        return row, out
    pred = out.argmax(axis=1)
    row["accuracy"] = float((pred == gold.numpy()).mean())
    row["agree_with_float"] = float((pred == reference).mean()) if reference is not None else 1.0
    return row, pred


def format_report(rows: list[dict]) -> str:
    keys = list(rows[0])
    cells = [[r[k] if isinstance(r[k], str) else f"{r[k]:.4f}" if k in ("accuracy", "agree_with_float", "pearson")
              else f"{r[k]:.2f}" for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([line(keys), line(["-" * w for w in widths])] + [line(c) for c in cells])


# -----------------------------------------------------------------------------------------------------
# the command line


def export_torchscript(model, tokenizer, info, out: str) -> None:
    """model.torchscript.pt: (input_ids, attention_mask, token_type_ids) -> logits, for runtimes without
    Python (libtorch). Traced, so checked on a second batch of another length before it is kept."""
    a = tokenizer(["a short example", "a second, somewhat longer example for tracing"], max_length=info["max_length"])
    b = tokenizer(["and a third one with other words in it, longer than both of those above"])
    args_of = lambda e: (e["input_ids"], e["attention_mask"], e["token_type_ids"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, args_of(a), check_trace=False)
        if not torch.allclose(traced(*args_of(b)), model(*args_of(b)), atol=1e-4):
            print("skipping TorchScript: the traced model differs from the eager one on another input length")
            return
        traced.save(os.path.join(out, "model.torchscript.pt"))


def check_args(args) -> None:
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise InputError(f"--out {args.out}: the folder exists and is not empty; choose a new one")
    if not 0.0 <= args.prune < 1.0:
        raise InputError(f"--prune: expected a fraction in [0, 1), got {args.prune}")
    if args.prune_heads < 0 or args.calib_examples < 1 or args.repeats < 1 or args.threads < 1:
        raise InputError("--prune-heads must be >= 0; --calib-examples, --repeats and --threads >= 1")
    if args.prune_heads and not (args.calib or args.report):
        raise InputError("--prune-heads needs labelled examples to rank heads: give --calib FILE or --report FILE")


def run(args) -> None:
    from peft import LoRALinear, PEFT_MODULES, merge_lora
    check_args(args)
    torch.set_num_threads(args.threads)
    model, tokenizer, info = load_model(args.src)
    if info["task"] == "simcse":
        raise InputError(f"{args.src}: a SimCSE sentence encoder; export takes classifiers and regressors")
    if info["task"] == "prompt" and args.quantize:      # int8.load_int8 rebuilds a SequenceClassifier only
        raise InputError(f"--quantize int8: {args.src} is a --task prompt model (a masked LM); export it in float, "
                         "or with --onnx (onnxruntime's int8 graph)")
    if is_int8(model):
        raise InputError(f"{args.src}: already int8; export from the float model")
    has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    if args.merge_lora != has_lora:
        raise InputError(f"{args.src}: has LoRA layers: pass --merge-lora" if has_lora
                         else f"--merge-lora: {args.src} has no LoRA layers")
    if has_lora:
        merge_lora(model)                                  # W <- W0 + (alpha / r) B A, see peft.py
    if any(isinstance(m, PEFT_MODULES) for m in model.modules()):
        raise InputError(f"{args.src}: PEFT method {info.get('method')!r} adds layers the BERT layout cannot hold; "
                         "export takes full, top, bitfit and (merged) LoRA models")
    model.eval()
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        stages, float_model = compress(model, tokenizer, info, args, tmp)
        if args.torchscript:
            export_torchscript(model, tokenizer, info, args.out)
        runtimes = export_onnx(float_model, tokenizer, info, args.out) if args.onnx else []
        if args.report:
            report(stages, info, args, runtimes)


def compress(model, tokenizer, info, args, tmp: str) -> tuple[list[tuple[str, str]], nn.Module]:
    """Run the steps in order and write OUT; with --report, also each step's model to tmp/ for measuring.
    Returns [(stage name, folder)], starting with the float source, and the model as it was before int8
    (what --onnx exports: onnxruntime quantizes the float graph its own way)."""
    float_model = model
    stages, done = [("float", args.src)], {"source": args.src, "source_method": info.get("method"),
                                           "merged_lora": args.merge_lora}

    def sparse_now():                                  # pruned, still float, and not asked to stay dense
        return bool(args.prune) and "sparsity" in done and not is_int8(model) and not args.dense

    def stage(name):
        if args.report:
            folder = os.path.join(tmp, str(len(stages)))
            save_folder(model, tokenizer, info | {"export": done}, folder, sparse=sparse_now())
            stages.append((name, folder))

    if args.prune_heads:
        if not args.calib:
            print(f"note: ranking heads on {args.report}, the file --report scores: pass --calib (e.g. a slice "
                  "of the training set) for a report that did not choose the heads")
        texts, pairs, gold = labelled(args.calib or args.report, info, args)
        n = args.calib_examples
        importance = head_importance(model, tokenizer, info, texts[:n], pairs and pairs[:n], gold[:n])
        drop = choose_heads(importance, args.prune_heads)
        remove_heads(model, drop)
        done["pruned_heads"] = {str(k): v for k, v in drop.items()}
        done["heads_removed_by"] = "shrinking"
        stage(f"heads -{args.prune_heads}")
    if args.prune:
        magnitude_prune(model, args.prune)
        done["sparsity"] = round(sparsity(model), 6)
        stage(f"pruned {args.prune:.0%}")
    if args.quantize:
        if args.onnx:                                  # keep the float model for the ONNX graphs
            float_model = copy.deepcopy(model)
        quantize_model(model)
        fbgemm = model.encoder.blocks[0].ffn.fc1.packed is not None
        done["quantize"] = "int8 per-row affine, " + ("fbgemm int8 GEMM" if fbgemm else "dequantized to float")
        stage("int8")
    save_folder(model, tokenizer, info | {"export": done}, args.out, sparse=sparse_now())
    print(f"wrote {args.out} ({model_mb(args.out):.2f} MB): {json.dumps(done)}")
    if args.report and len(stages) > 1:
        stages[-1] = (stages[-1][0], args.out)          # the last step's model is OUT itself
    return stages, float_model


def export_onnx(model, tokenizer, info, out: str) -> list[str]:
    """model.onnx (float) and model.int8.onnx (onnxruntime's dynamic int8 quantization) in OUT, read by
    onnxrun.load_onnx. Kept only if onnxruntime agrees with PyTorch to 1e-4 on a batch of another shape
    than the traced one. Returns the runtimes written ("onnx", "onnx-int8")."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxrun import INPUTS, RUNTIMES, OnnxClassifier
    except ImportError:
        print("skipping ONNX export: it needs the onnx and onnxruntime packages (pip install onnx onnxruntime)")
        return []
    enc = tokenizer(["an example for export"], max_length=info["max_length"])
    check = tokenizer(["a second, longer example to check the graph with", "and a third"], max_length=info["max_length"])
    path = os.path.join(out, RUNTIMES["onnx"])
    try:
        with torch.no_grad(), warnings.catch_warnings(), atomic_write(path) as tmp:
            warnings.simplefilter("ignore")
            # the TorchScript-based exporter (dynamo=False): batch and length stay dynamic, no onnxscript needed
            torch.onnx.export(model, tuple(enc[n] for n in INPUTS), tmp, input_names=list(INPUTS),
                              output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "tokens"} for n in INPUTS},
                              dynamo=False)
            gap = (OnnxClassifier(tmp)(**{n: check[n] for n in INPUTS}) - model(**{n: check[n] for n in INPUTS})).abs().max()
            if gap > 1e-4:
                raise ValueError(f"onnxruntime differs from PyTorch by {gap:.2e} on a batch of another shape")
    except Exception as e:          # exporters fail in many ways; the folder itself is already complete
        print(f"skipping ONNX export: {type(e).__name__}: {e}")
        return []
    with atomic_write(os.path.join(out, RUNTIMES["onnx-int8"])) as tmp:
        quantize_dynamic(path, tmp, weight_type=QuantType.QInt8)
    print(f"wrote {path} and {RUNTIMES['onnx-int8']} (run them: python predict.py {out} --runtime onnx|onnx-int8 ...)")
    return ["onnx", "onnx-int8"]


def report(stages: list[tuple[str, str]], info: dict, args, runtimes=()) -> None:
    """Size on disk, CPU latency per example at batch 1 and 32, and dev accuracy of every stage; with
    --onnx also OUT's graphs in onnxruntime (same threads, timed in the same turns as the PyTorch rows)."""
    from onnxrun import RUNTIMES
    texts, pairs, gold = labelled(args.report, info, args)
    predictors = [Predictor([folder]) for _, folder in stages]
    predictors += [Predictor([args.out], runtime=r, threads=args.threads) for r in runtimes]
    names = [name for name, _ in stages] + [f"onnxruntime {r.removeprefix('onnx').lstrip('-') or 'float'}"
                                            for r in runtimes]
    folders = [folder for _, folder in stages] + [args.out] * len(runtimes)
    rows, reference = [], None
    for name, folder, predictor in zip(names, folders, predictors):
        row, pred = score(name, folder, predictor, texts, pairs, gold, info["task"], reference)
        reference = pred if reference is None else reference
        rows.append(row)
    for row, r in zip(rows[len(stages):], runtimes):               # an ONNX row's size is its graph file
        row["size_mb"] = os.path.getsize(os.path.join(args.out, RUNTIMES[r])) / 2**20
    for batch in (1, 32):
        for row, ms in zip(rows, latencies_ms(predictors, texts, pairs, batch, args.repeats)):
            row[f"ms_batch{batch}"] = ms
    print(format_report(rows))
    path = args.report_json or os.path.join(args.out, "report.json")
    write_json(path, {"dev": args.report, "threads": args.threads, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")


def main(argv=None, args=None) -> None:
    args = args or build_parser().parse_args(argv)     # the script parsed its flags before the heavy imports
    try:
        run(args)
    except (ValueError, OSError) as e:
        fail(str(e))


if __name__ == "__main__":
    main(args=ARGS)
