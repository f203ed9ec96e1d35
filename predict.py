"""Predict with a fine-tuned model: a label and class probabilities (or a score) for each text.

    python predict.py out/sst2 "a gripping, funny film" "dull and overlong"     # label, p, text per line
    cat reviews.txt | python predict.py out/sst2 --format jsonl                  # or --format tsv
    python predict.py out/sst2,out/sst2-seed2 --input dev.tsv --text-col sentence --output preds.tsv
    python predict.py out/ner "Peter Blackburn spoke in Brussels." --format jsonl     # entities, character offsets
    python predict.py out/qa --input questions.jsonl --format jsonl   # {"question", "context"} a line -> answer spans
    printf 'Who spoke?\tPeter spoke.\n' | python predict.py out/qa        # stdin: question TAB context
    python predict.py out/sst2 --explain "a gripping, funny film" --explain-html why.html   # explain.py

MODEL is a folder written by finetune.py (BERT layout + labels.json) or by export.py (the same, possibly
int8 or pruned). Several folders, comma-separated, form an ensemble whose probabilities are averaged.
`Predictor` is also what serve.py runs, so the command line and the server give the same answers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

from atomic import atomic_write


class InputError(ValueError):
    """Bad input text, file or column; the message names the file or flag."""


# -----------------------------------------------------------------------------------------------------
# loading: the one dispatch between a float folder and an int8 one


def load_model(path: str, runtime: str = "torch", threads: int | None = None):
    """(model, tokenizer, info) for a folder: int8 folders (export.py) by int8.load_int8, every other by
    finetuned.load_finetuned; runtime "onnx" / "onnx-int8" runs export.py --onnx's graph in onnxruntime
    instead (onnxrun.load_onnx). All give a model in eval mode with the SequenceClassifier interface."""
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a folder (expected a fine-tuned model folder with config.json and labels.json)")
    if runtime != "torch":
        from onnxrun import load_onnx
        return load_onnx(path, runtime, threads)
    from int8 import INT8_WEIGHTS, load_int8              # late: the model code loads only when a model does
    if os.path.isfile(os.path.join(path, INT8_WEIGHTS)):
        return load_int8(path)
    from finetuned import load_finetuned
    return load_finetuned(path)


class Predictor:
    """One model or an ensemble. Members must share the task and the label names; each keeps its own
    tokenizer, so an ensemble may mix vocabularies. Averaging probabilities (not logits) keeps each member's
    calibration and needs nothing from them beyond predict_proba."""

    def __init__(self, paths: list[str], batch_size: int = 32, runtime: str = "torch", threads: int | None = None):
        from finetuned import predict_proba
        self._predict_proba = predict_proba
        if not paths:
            raise InputError("no model folder given")
        self.runtime = runtime
        self.members = [load_model(p, runtime, threads) for p in paths]
        self.info = self.members[0][2]
        self.task, self.labels = self.info["task"], list(self.info.get("labels") or [])
        if self.task == "simcse":
            raise InputError(f"{paths[0]}: a SimCSE sentence encoder has no labels to predict")
        if self.per_token and len(paths) > 1:
            raise InputError(f"{paths[1]}: ensembles average class probabilities; a --task {self.task} model "
                             "predicts alone")
        for path, (_, _, info) in zip(paths[1:], self.members[1:]):
            if info["task"] != self.task or list(info.get("labels") or []) != self.labels:
                raise InputError(f"{path}: task {info['task']!r} with labels {info.get('labels')} does not match "
                                 f"{paths[0]} ({self.task!r}, {self.labels}); an ensemble needs one task")
        self.batch_size = batch_size

    @property
    def per_token(self) -> bool:
        """NER (entities) and QA (answer spans): outputs per token, not probabilities per text."""
        return self.task in ("token", "qa")

    @property
    def needs_pairs(self) -> bool:
        """Fine-tuned on (text, pair): every pair task, QA (question, context), and any task whose training
        file had a pair column."""
        return self.task in ("pair", "qa") or bool((self.info.get("columns") or {}).get("pair"))

    def check(self, texts, pairs):
        if pairs is None and self.needs_pairs:
            raise InputError("this model was fine-tuned on text pairs: give the second text of each pair too")
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"got {len(texts)} texts but {len(pairs)} pairs")

    def __call__(self, texts: list[str], pairs: list[str] | None = None):
        """(N, K) class probabilities, or (N,) scores for regression; the mean over the ensemble. NER: a list
        of entities per text; QA (texts = questions, pairs = contexts): the best answer span per question."""
        self.check(texts, pairs)
        if self.per_token:
            from data.spans import Question
            from finetuned import answer_spans, tagged_entities
            model, tok, info = self.members[0]
            if self.task == "token":
                return tagged_entities(model, tok, texts, info, self.batch_size)
            return answer_spans(model, tok, [Question("", q, c, [], []) for q, c in zip(texts, pairs)], info,
                                self.batch_size)
        outs = [np.asarray(self._predict_proba(model, tok, texts, pairs, info=info, batch_size=self.batch_size),
                           dtype=np.float64) for model, tok, info in self.members]
        mean = np.mean(outs, axis=0)
        return mean.reshape(len(texts)) if self.task == "regression" else mean.reshape(len(texts), -1)

    def describe(self, out, texts: list[str] | None = None) -> list[dict]:
        """One JSON-ready dict per row: {"score"} for regression, {"entities": [{"type", "text", "start",
        "end", "score"}]} for NER, {"answer", "start", "end", "score"} for QA, else {"label", "probs": {name: p}};
        with texts, each row starts with its "text"."""
        if self.task == "token":
            rows = [{"entities": row} for row in out]
        elif self.task == "qa":
            rows = list(out)
        elif self.task == "regression":
            rows = [{"score": float(s)} for s in out]
        else:
            names = self.labels or [str(k) for k in range(out.shape[1])]
            rows = [{"label": names[int(row.argmax())], "probs": dict(zip(names, map(float, row)))} for row in out]
        return rows if texts is None else [{"text": t, **row} for t, row in zip(texts, rows)]


# -----------------------------------------------------------------------------------------------------
# output


def format_header(predictor: Predictor) -> str:
    """The tsv header: label, prob_<name> per class (regression: score; NER: entities; QA: the span), then the text."""
    if predictor.task in ("regression", "token"):
        return {"regression": "score", "token": "entities"}[predictor.task] + "\ttext"
    if predictor.task == "qa":
        return "answer\tstart\tend\tscore\tquestion"
    return "\t".join(["label"] + [f"prob_{name}" for name in predictor.labels] + ["text"])


def format_row(row: dict, fmt: str) -> str:
    """One output line: "text" (for people: label, its probability, every class's, the text), tsv or jsonl."""
    if fmt == "jsonl":
        return json.dumps(row, ensure_ascii=False)
    text = row.get("text", "").replace("\t", " ")
    if "entities" in row:      # TYPE[start:end]=text; ...
        found = "; ".join(f"{e['type']}[{e['start']}:{e['end']}]={e['text']}" for e in row["entities"])
        return f"{found}\t{text}" if fmt == "tsv" else f"{found or '(no entities)'}   {text}"
    if "answer" in row:
        score = "" if row["score"] is None else f"{row['score']:.6f}"
        return "\t".join([" ".join(row["answer"].split()), str(row["start"]), str(row["end"]), score, text])
    if fmt == "text":
        if "score" in row:
            return f"score {row['score']:8.4f}   {text}"
        probs = "  ".join(f"{name} {p:.3f}" for name, p in row["probs"].items())
        return f"{row['label']:<12} {row['probs'][row['label']]:.3f}   ({probs})   {text}"
    if "score" in row:
        return f"{row['score']:.6f}\t{text}"
    return "\t".join([row["label"]] + [f"{p:.6f}" for p in row["probs"].values()] + [text])


def stdin_texts(pairs: bool) -> tuple[list[str], list[str] | None]:
    """One text per non-empty stdin line; for a pair model, the two texts separated by a tab."""
    if sys.stdin.isatty():
        raise InputError("no input: give texts as arguments, --input FILE, or pipe text on stdin")
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not pairs:
        return lines, None
    split = [line.split("\t", 1) for line in lines]
    bad = next((n for n, s in enumerate(split, start=1) if len(s) != 2), None)
    if bad:
        raise InputError(f"stdin line {bad}: a pair model needs two texts separated by a tab")
    return [a for a, _ in split], [b for _, b in split]


def run(args) -> None:
    from tqdm import tqdm
    if args.input and args.texts:
        raise InputError("give texts as arguments or --input FILE, not both")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    predictor = Predictor([p for p in args.model.split(",") if p], batch_size=args.batch_size, runtime=args.runtime)
    if args.input:
        from data.tasks import read_examples     # the reader finetune.py uses: same formats, same columns
        qa = predictor.task == "qa"                   # QA files: question and context columns by default
        ex = read_examples([args.input], args.text_col or ("question" if qa else None),
                           args.text_pair_col or ("context" if qa else None), need_labels=False)
        texts, pairs = ex.texts, ex.pairs
    elif args.texts:
        texts, pairs = list(args.texts), None
    else:
        texts, pairs = stdin_texts(predictor.needs_pairs)
    predictor.check(texts, pairs)
    if args.explain:
        return run_explain(predictor, texts, pairs, args)
    with output_file(args.output) as out:
        if args.format == "tsv":
            out.write(format_header(predictor) + "\n")
        bar = tqdm(total=len(texts), unit="text", disable=args.no_progress or not args.input, file=sys.stderr)
        step = args.batch_size
        for i in range(0, len(texts), step):
            chunk_pairs = pairs[i:i + step] if pairs is not None else None
            for row in predictor.describe(predictor(texts[i:i + step], chunk_pairs), texts[i:i + step]):
                out.write(format_row(row, args.format) + "\n")
            bar.update(len(texts[i:i + step]))
        bar.close()


def run_explain(predictor: Predictor, texts, pairs, args) -> None:
    """One JSON line per text: its word attributions (integrated gradients) and an attention map; with
    --explain-html also a page that shades the words."""
    from explain import explain, to_html
    if len(predictor.members) > 1:
        raise InputError("--explain: give one model folder, not an ensemble")
    model, tokenizer, info = predictor.members[0]
    found = [explain(model, tokenizer, info, t, None if pairs is None else pairs[i], target=args.target,
                     steps=args.ig_steps, baseline=args.baseline, layer=args.layer, head=args.head)
             for i, t in enumerate(texts)]
    with output_file(args.output) as out:
        for text, e in zip(texts, found):
            out.write(json.dumps({"text": text, **e.to_dict()}, ensure_ascii=False) + "\n")
    if args.explain_html:
        with atomic_write(args.explain_html) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(to_html(found, texts))


@contextlib.contextmanager
def output_file(path):
    """stdout, or `path` written atomically: a finished predictions file or none, never half of one."""
    if path is None:
        yield sys.stdout
        return
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Label texts with a fine-tuned model (or an ensemble of them).",
                                allow_abbrev=False)
    p.add_argument("model", help="fine-tuned model folder; several, comma-separated, are averaged")
    p.add_argument("texts", nargs="*", help="texts to label (else --input, else stdin, one per line)")
    p.add_argument("--input", help="a .tsv, .csv or .jsonl file (optionally .gz/.xz/.bz2) with a text column")
    p.add_argument("--text-col", help="the text column (default: found by name: sentence, text, sentence1, ...)")
    p.add_argument("--text-pair-col", help="the second text of each pair, for pair models")
    p.add_argument("--format", choices=("text", "tsv", "jsonl"), default="text",
                   help="text: for people (label, probability, text); tsv or jsonl: for programs (default text)")
    p.add_argument("--output", help="write here instead of stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runtime", choices=("torch", "onnx", "onnx-int8"), default="torch",
                   help="onnx / onnx-int8: run model.onnx / model.int8.onnx (export.py --onnx) in onnxruntime")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --input")
    g = p.add_argument_group("explanations (explain.py)")
    g.add_argument("--explain", action="store_true", help="print word attributions (integrated gradients) and "
                   "an attention map per text, as JSON lines")
    g.add_argument("--ig-steps", type=int, default=50, help="intervals of the path integral (default 50)")
    g.add_argument("--baseline", choices=("pad", "mask"), default="pad", help="the input that scores zero: "
                   "every word replaced by [PAD] or by [MASK]")
    g.add_argument("--target", help="explain this label (default: the predicted one)")
    g.add_argument("--layer", type=int, default=-1, help="attention map of this layer (default -1, the last)")
    g.add_argument("--head", type=int, default=0, help="... and this head (default 0)")
    g.add_argument("--explain-html", metavar="FILE", help="also write the attributions as an HTML page")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from trainer import fail
    try:
        run(args)
    except (ValueError, OSError) as e:      # InputError, CheckpointError, TokenizerError, a missing file, ...
        fail(str(e))


if __name__ == "__main__":
    main()
