"""Labelled task files -> examples -> token ids -> padded micro-batches, for finetune.py.

    examples = read_examples(["train.tsv"])                    # texts, optional pairs, labels as written
    classes  = label_classes("binary", examples)               # ["0", "1"]; None for regression
    labels   = encode_labels("binary", examples, classes)      # [0., 1., ...]
    data     = TaskDataset(ids, types, labels, batch_size=32, slots=world * accum, seed=1, pad_id=0)
    batch    = data.micro_batch(step, index)                   # a pure function: no loader state

Formats, told apart by the file name (.tsv, .csv, .jsonl; any of them may end in .gz/.xz/.bz2):
  TSV   a header line, then rows split on tabs (no quoting: GLUE text holds literal " and ')
  CSV   a header line, quoting as the csv module reads it
  JSONL one JSON object a line; its keys are the columns
  CoLA  as it ships (no header: source, label, original mark, sentence), recognised by its shape
The GLUE files as they ship all read without flags: SST-2 (sentence, label), CoLA, MRPC (#1 String,
#2 String, Quality), RTE (sentence1, sentence2, label), QNLI (question, sentence, label), STS-B
(sentence1, sentence2, score). Other names are given with --text-col / --text-pair-col / --label-col.

Every problem with a file is a TaskDataError naming the file and line and what was expected.
"""
from __future__ import annotations

import csv
import json
import math
import pathlib
import random
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python data/tasks.py` and imports from tests both find the repo root
    sys.path.insert(0, str(ROOT))

from atomic import write_text  # noqa: E402
from data.prepare import PrepareError, clean_text, find_input_files, open_text, read_documents  # noqa: E402


class TaskDataError(ValueError):
    """A task file that does not fit the task: `file:line: what was expected, what was found`."""


def _short(value, n: int = 40) -> str:
    """What an error message quotes of a file: repr (control characters and stray bytes escaped), at
    most n characters, so a binary file or a 3 KB cell never floods the terminal."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def _names(header, n: int = 80) -> str:
    """The columns of a header line, for a message: joined, at most n characters, escaped."""
    joined = ", ".join(str(c) for c in header)
    return joined if len(joined) <= n and joined.isprintable() else _short(joined, n)


# Column names recognised without flags, in order of preference: (text, pair). Matched case-insensitively.
TEXT_COLUMNS = [("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                ("premise", "hypothesis"), ("#1 string", "#2 string"), ("text", "text_pair"),
                ("sentence", None), ("text", None), ("content", None), ("review", None)]
LABEL_COLUMNS = ("label", "score", "quality", "labels", "gold_label", "target")


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None        # second segment of sentence-pair tasks
    labels: list[str] | None       # as written in the file; None when the file has no label column
    where: list[str]               # "file:line" of each example, for error messages
    columns: dict                  # {"text": name, "pair": name or None, "label": name or None}
    layout: str                    # "cola" for CoLA as it ships, else "tsv" / "csv" / "jsonl"

    def __len__(self):
        return len(self.texts)

    def head(self, n: int | None) -> "Examples":
        if n is None:
            return self
        cut = lambda xs: None if xs is None else xs[:n]
        return Examples(self.texts[:n], cut(self.pairs), cut(self.labels), self.where[:n], self.columns, self.layout)


# -----------------------------------------------------------------------------------------------------
# reading


def _table(path: pathlib.Path):
    """(kind, header or None, [(line number, fields or dict), ...]) of one task file."""
    name = path.name.lower()
    for ext in (".gz", ".xz", ".bz2"):
        name = name.removesuffix(ext)
    kind = "csv" if name.endswith(".csv") else "jsonl" if name.endswith((".jsonl", ".json")) else "tsv"
    try:
        with open_text(path) as f:
            if kind == "csv":
                reader = csv.reader(f)
                rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
            else:
                rows = [(i, line.rstrip("\r\n")) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, EOFError, PrepareError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None
    except csv.Error as e:
        raise TaskDataError(f"{path}:{reader.line_num}: malformed CSV ({_short(str(e), 80)})") from None
    if not rows:
        raise TaskDataError(f"{path}: empty file: expected a header line and at least one example")
    first = rows[0][1] if isinstance(rows[0][1], str) else ",".join(rows[0][1])
    if "\x00" in first or first.count("\ufffd") > max(2, len(first) // 20):      # NULs, or bytes that are not UTF-8
        raise TaskDataError(f"{path}: does not look like a text file (it starts {_short(first[:30])}); "
                            "expected UTF-8 TSV, CSV or JSONL")
    if kind == "tsv" and "\t" not in first and first.count(",") >= 1 and len(rows) > 1 and "\t" not in rows[1][1]:
        raise TaskDataError(f"{path}: does not look tab-separated (its first line {_short(first, 60)} has commas and "
                            "no tab); a CSV file should be named .csv")
    if kind == "jsonl":
        objects = []
        for i, line in rows:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:     # bad JSON, a 5,000-digit number, 5,000 nested lists
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" if isinstance(
                    e, RecursionError) else _short(str(e), 60)
                raise TaskDataError(f"{path}:{i}: expected a JSON object per line ({msg})") from None
            if not isinstance(obj, dict):
                raise TaskDataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
            objects.append((i, obj))
        return kind, list(objects[0][1]), objects
    if kind == "tsv":
        rows = [(i, line.split("\t")) for i, line in rows]
    rows[0][1][0] = rows[0][1][0].lstrip("\ufeff")           # MRPC ships with a byte-order mark
    if _looks_like_cola(rows[0][1]):
        return "cola", None, rows
    if len(rows) == 1:
        raise TaskDataError(f"{path}: no examples: expected rows after the header line")
    return kind, [c.strip() for c in rows[0][1]], rows[1:]


def _looks_like_cola(fields) -> bool:
    """CoLA as it ships: no header; source code, label 0/1, the author's mark ('' or '*'), sentence."""
    return len(fields) == 4 and fields[1] in ("0", "1") and fields[2] in ("", "*")


def _pick_columns(path, header, text_col, pair_col, label_col, need_labels):
    lower = {c.lower(): c for c in header}

    def find(name, what):
        if name.lower() not in lower:
            raise TaskDataError(f"{path}: unknown {what} column {name!r}; the file has {_names(header)}")
        return lower[name.lower()]

    if text_col:
        text = find(text_col, "text")
        pair = find(pair_col, "pair") if pair_col else None
    else:
        found = next(((t, p) for t, p in TEXT_COLUMNS if t in lower), None)
        if found is None:
            raise TaskDataError(f"{path}: no text column among {_names(header)}; expected one of "
                                "sentence, text, sentence1+sentence2, question+sentence, premise+hypothesis "
                                "(or name it with --text-col)")
        text = lower[found[0]]
        pair = find(pair_col, "pair") if pair_col else lower.get(found[1]) if found[1] else None
    if label_col:
        label = find(label_col, "label") if (need_labels or label_col.lower() in lower) else None
    else:
        label = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
        if label is None and need_labels:
            raise TaskDataError(f"{path}: no label column among {_names(header)}; expected one of "
                                f"{', '.join(LABEL_COLUMNS)} (or name it with --label-col)")
    return text, pair, label


def read_examples(paths, text_col=None, pair_col=None, label_col=None, need_labels=True) -> Examples:
    """Read and concatenate task files (e.g. CoLA's in-domain and out-of-domain dev as GLUE's dev)."""
    parts = [_read_one(pathlib.Path(p), text_col, pair_col, label_col, need_labels) for p in paths]
    first = parts[0]
    for p in parts[1:]:
        if (p.pairs is None) != (first.pairs is None) or (p.labels is None) != (first.labels is None):
            raise TaskDataError(f"{p.where[0].rsplit(':', 1)[0]}: its columns {p.columns} do not match those "
                                f"of {first.where[0].rsplit(':', 1)[0]} ({first.columns})")
    join = lambda name: None if getattr(first, name) is None else [x for p in parts for x in getattr(p, name)]
    return Examples(join("texts"), join("pairs"), join("labels"), join("where"), first.columns, first.layout)


def _read_one(path, text_col, pair_col, label_col, need_labels) -> Examples:
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    kind, header, rows = _table(path)
    if kind == "cola":
        if text_col or pair_col or label_col:
            raise TaskDataError(f"{path}: CoLA files have no header, so --text-col/--label-col do not apply")
        header, columns = ["source", "label", "mark", "sentence"], {"text": "sentence", "pair": None, "label": "label"}
    else:
        t, p, lab = _pick_columns(path, header, text_col, pair_col, label_col, need_labels)
        columns = {"text": t, "pair": p, "label": lab}
    index = {c: i for i, c in enumerate(header)}
    texts, pairs, labels, where = [], [] if columns["pair"] else None, [] if columns["label"] else None, []
    for line, row in rows:
        if isinstance(row, dict):
            missing = [c for c in columns.values() if c is not None and c not in row]
            if missing:
                raise TaskDataError(f"{path}:{line}: no field {missing[0]!r} (the first line has {_names(header)})")
            for c in columns.values():
                _check_json_value(path, line, c, row[c] if c else None, is_label=c == columns["label"])
            get = lambda c: str(row[c])
        else:
            if len(row) != len(header):
                raise TaskDataError(f"{path}:{line}: ragged row: expected {len(header)} fields like the "
                                    f"{'header' if kind != 'cola' else 'CoLA layout'}, got {len(row)}")
            get = lambda c: row[index[c]]
        texts.append(get(columns["text"]).strip())
        if pairs is not None:
            pairs.append(get(columns["pair"]).strip())
        if labels is not None:
            labels.append(get(columns["label"]).strip())
        where.append(f"{path}:{line}")
    return Examples(texts, pairs, labels, where, columns, kind)


def _check_json_value(path, line, column, value, is_label):
    """A JSONL text must be a string (null would train on the text "None", a list on its repr); a label a
    string or a number (not a bool, which would become the classes "True"/"False", nor null or a list)."""
    if column is None:
        return
    ok = isinstance(value, (str, int, float)) and not isinstance(value, bool) if is_label else isinstance(value, str)
    if not ok:
        kind = "null" if value is None else type(value).__name__
        raise TaskDataError(f"{path}:{line}: field {column!r} is {kind} {_short(value, 30)}; expected "
                            + ("a string or a number" if is_label else "a string"))


def read_sentences(paths, text_col=None, min_words=3, max_sentences=None) -> list[str]:
    """Unlabelled sentences for SimCSE: the text column of a TSV/CSV/JSONL, or one sentence per line of
    any text that data/prepare.py reads (plain, .xz/.gz/.bz2, WikiExtractor, folders of them): each
    line is split at sentence ends, and sentences of fewer than `min_words` words are dropped."""
    out = []
    for p in paths:
        p = pathlib.Path(p)
        if p.is_file() and re.search(r"\.(tsv|csv|jsonl?)(\.(gz|xz|bz2))?$", p.name.lower()):
            out += [t for t in read_examples([p], text_col, need_labels=False).texts if len(t.split()) >= min_words]
        else:
            try:
                for path, fmt in find_input_files([p]):
                    for doc in read_documents(path, fmt):
                        for line in clean_text(doc).split("\n"):
                            out += [s for s in _SENTENCE_END.split(line) if len(s.split()) >= min_words]
                        if max_sentences and len(out) >= max_sentences:
                            return out[:max_sentences]
            except PrepareError as e:
                raise TaskDataError(str(e)) from None
    if not out:
        raise TaskDataError(f"{', '.join(map(str, paths))}: no sentences of {min_words}+ words found")
    return out[:max_sentences] if max_sentences else out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")

# -----------------------------------------------------------------------------------------------------
# labels


def _as_class(label: str):
    """('1', 'number') for integer-valued labels ('1', '1.0'), ('pos', 'text') for names, (x, 'real') else."""
    try:
        v = float(label)
    except ValueError:
        return label, "text"
    return (str(int(v)), "number") if v.is_integer() else (label, "real")


def label_classes(task: str, examples: Examples) -> list[str] | None:
    """The classes of a classification task, sorted (numerically when they are numbers); None for
    regression, after checking every label is a number."""
    if examples.labels is None:
        raise TaskDataError(f"{examples.where[0].rsplit(':', 1)[0]}: no label column")
    if task in ("regression", "simcse"):
        encode_labels(task, examples, None)
        return None
    seen, first_kind = {}, None
    for label, where in zip(examples.labels, examples.where):
        name, kind = _as_class(label)
        if not label:
            raise TaskDataError(f"{where}: empty label")
        if kind == "real":
            raise TaskDataError(f"{where}: label {_short(label)} is not a class (a whole number or a name); "
                                "scores need --task regression")
        if first_kind is None:
            first_kind = (kind, label, where)
        elif kind != first_kind[0]:
            raise TaskDataError(f"{where}: mixed label types: {_short(label)} is {'a name' if kind == 'text' else 'a number'} "
                                f"but {first_kind[2]} has {_short(first_kind[1])}")
        if name not in seen:
            if task == "binary" and len(seen) == 2:
                raise TaskDataError(f"{where}: label {_short(label)} is a third class (after {', '.join(map(repr, seen))}); "
                                    "--task binary has two classes: use --task multiclass")
            seen[name] = where
    if len(seen) < 2:
        raise TaskDataError(f"{examples.where[0].rsplit(':', 1)[0]}: only one class ({_short(next(iter(seen)))}) "
                            f"in the training labels; --task {task} needs at least two")
    return sorted(seen, key=(lambda c: int(c)) if first_kind[0] == "number" else None)


def encode_labels(task: str, examples: Examples, classes: list[str] | None) -> list:
    """Class indices (floats 0./1. for binary, which trains one logit with BCE; ints for multiclass/pair),
    or float scores for regression. A label outside `classes` (e.g. in the dev file) is an error."""
    out = []
    index = {c: i for i, c in enumerate(classes or [])}
    for label, where in zip(examples.labels, examples.where):
        if classes is None:
            try:
                value = float(label)
            except ValueError:
                raise TaskDataError(f"{where}: expected a numeric score for --task {task}, got {_short(label)}") from None
            if not math.isfinite(value):
                raise TaskDataError(f"{where}: expected a finite score, got {_short(label)}")
            out.append(value)
            continue
        name, kind = _as_class(label)
        if name not in index:
            raise TaskDataError(f"{where}: label {_short(label)} is not one of the training classes "
                                f"{', '.join(classes)} (--task {task})")
        out.append(float(index[name]) if task == "binary" else index[name])
    return out


# -----------------------------------------------------------------------------------------------------
# batches


def pad_batch(ids: list[list[int]], types: list[list[int]], pad_id: int) -> dict:
    """Dynamic padding: every row padded to the longest one in this batch, not to max_length."""
    B, T = len(ids), max(len(x) for x in ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for r, (x, t) in enumerate(zip(ids, types)):
        input_ids[r, :len(x)] = torch.tensor(x)
        token_type_ids[r, :len(t)] = torch.tensor(t)
        attention_mask[r, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def eval_order(lengths, batch_size: int):
    """Index batches for inference, shortest first, so little compute goes to padding."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class TaskDataset:
    """Training micro-batches as a pure function of (step, index), so that resuming needs no state.

    c = step * slots + index numbers the micro-batches of the whole run (slots = world_size * grad_accum,
    index as trainer.train passes it). Micro-batch c is batch c mod n of epoch c div n, n batches an epoch.
    An epoch's batches: a permutation of the examples from (seed, epoch); within chunks of `bucket`
    batches, examples sorted by length and cut into batches (similar lengths -> little padding); then
    the batch order shuffled with the same generator, so lengths do not rise through the epoch.
    """

    def __init__(self, input_ids, token_type_ids, labels, batch_size, slots, seed, pad_id,
                 label_dtype=torch.float32, augmenter=None, bucket=100):
        if not input_ids:
            raise TaskDataError("no training examples")
        self.ids, self.types, self.pad_id = input_ids, token_type_ids, pad_id
        self.labels = None if labels is None else np.asarray(labels)
        self.batch_size, self.slots, self.seed, self.bucket = batch_size, slots, seed, bucket
        self.label_dtype, self.augmenter = label_dtype, augmenter
        self.lengths = np.array([len(x) for x in input_ids])
        self.batches_per_epoch = math.ceil(len(input_ids) / batch_size)
        self._epochs = {}                  # a cache of the last epochs' batch lists; purity is unaffected

    def __len__(self):
        return len(self.ids)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            order, batches, chunk = rng.permutation(len(self.ids)), [], self.batch_size * self.bucket
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
            rng.shuffle(batches)
            self._epochs = {e: b for e, b in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = batches
        return self._epochs[epoch]

    def micro_batch(self, step: int, index: int) -> dict:
        c = step * self.slots + index
        epoch, k = divmod(c, self.batches_per_epoch)
        rows = self.epoch_batches(epoch)[k]
        ids, types = [self.ids[i] for i in rows], [self.types[i] for i in rows]
        if self.augmenter is not None:
            rng = np.random.default_rng([self.seed, c, 1])     # the batch's own generator: still pure
            ids, types = map(list, zip(*(self.augmenter(i, rng) for i in rows)))   # augment.py: edits words
        batch = pad_batch(ids, types, self.pad_id)
        if self.labels is not None:
            batch["labels"] = torch.as_tensor(self.labels[rows], dtype=self.label_dtype)
        batch["num_targets"] = len(rows)
        batch["num_tokens"] = int(sum(len(x) for x in ids))
        return batch


# -----------------------------------------------------------------------------------------------------
# a built-in sample, so that `python finetune.py --task binary` runs on a fresh clone

_SUBJECTS = ["the movie", "this film", "the story", "the acting", "the soundtrack", "the ending", "the script",
             "the cast", "the direction", "the dialogue", "the plot", "the photography", "the lead performance"]
_NOUNS = ["film", "movie", "story", "watch", "ride", "comedy", "drama", "thriller"]
_VERBS = ["was", "is", "felt", "seemed", "turned out to be"]
_ADVERBS = ["", "really ", "truly ", "quite ", "very ", "utterly ", "remarkably ", "consistently "]
_POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "charming", "superb", "funny", "gripping",
             "beautiful", "excellent", "clever", "touching", "memorable", "thrilling", "heartfelt"]
_NEGATIVE = ["boring", "dull", "awful", "clumsy", "tedious", "terrible", "bland", "predictable", "painful",
             "weak", "lifeless", "messy", "forgettable", "annoying", "shallow"]
# how people also say it, without one of the words above (no negations: "not bad" is beyond a tiny model)
_POSITIVE_PHRASES = ["worth every minute", "a joy to watch", "well worth seeing", "full of life", "a real pleasure",
                     "i loved every minute", "great fun from start to finish", "it kept me smiling"]
_NEGATIVE_PHRASES = ["far too long", "a waste of time", "hard to sit through", "a chore to watch", "too slow by half",
                     "i nearly fell asleep", "it drags on and on", "i wanted my money back"]
_TEMPLATES = ["{s} {v} {a}{w} .", "i thought {s} {v} {a}{w} .", "{s} {v} {a}{w} and {a2}{w2} .",
              "honestly , {s} {v} {a}{w} .", "overall {s} {v} {w} , {a2}{w2} even .", "what a {w} experience .",
              # shorter and looser, as people write reviews: fragments, phrases, no full stop
              "a {a}{w} {n} .", "{w} , {a2}{w2} {n}", "{a}{w} , {p} .", "{p} , and {a}{w} .", "{s} : {p}",
              "{w} {n} , {p} !"]


def sample_binary(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n distinct (sentence, label) pairs from templates: 1 = positive, 0 = negative, half each.
    The label follows from the sentiment words and phrases alone, so even a small model fresh from random
    initialisation learns it in a few epochs; the short, loose templates let it carry over to the way
    people type a review ("a gripping, funny film"), which the full sentences alone did not."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        label = len(out) % 2
        words, phrases = (_POSITIVE, _POSITIVE_PHRASES) if label else (_NEGATIVE, _NEGATIVE_PHRASES)
        w, w2 = rng.sample(words, 2)
        text = rng.choice(_TEMPLATES).format(s=rng.choice(_SUBJECTS), v=rng.choice(_VERBS), a=rng.choice(_ADVERBS),
                                             a2=rng.choice(_ADVERBS), w=w, w2=w2, n=rng.choice(_NOUNS),
                                             p=rng.choice(phrases))
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def write_sample_binary(out_dir, n_train: int = 600, n_dev: int = 200, seed: int = 0):
    """Write out_dir/train.tsv and dev.tsv (header sentence<TAB>label, as SST-2) unless they exist."""
    out_dir = pathlib.Path(out_dir)
    paths = out_dir / "train.tsv", out_dir / "dev.tsv"
    if not all(p.is_file() for p in paths):
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = sample_binary(n_train + n_dev, seed)
        for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
            write_text(path, "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))
    return paths
