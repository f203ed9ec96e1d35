"""Token classification (NER) and extractive QA data: the official files -> words -> sub-word features.

    sentences = read_conll("train.txt.xz")         # [(words, tags)], tags in IOB2 whatever the file used
    ids, types, first = encode_words(tokenizer, words, max_length)   # first[w]: token of word w, or None
    questions = read_squad("dev-v1.1.json.xz", articles=slice(0, 24))
    feats = qa_features(tokenizer, questions, max_length=384, doc_stride=128)   # windows over contexts

Formats (any file may end in .gz/.xz/.bz2):
  CoNLL   one token a line, `word POS chunk NER` (any number of columns: the first is the word, the last
          the tag), blank lines between sentences, `-DOCSTART-` lines between documents. CoNLL-2003 as it
          ships is IOB1 (B- only between two adjacent entities of one type); the model learns IOB2 (every
          entity starts with B-), so tags are converted on reading: the same entities, one spelling.
  SQuAD   the v1.1 JSON: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
          "answers": [{"text", "answer_start"}]}]}]}]}; train (one answer each) and dev (several).

Words, not sub-words, are what a label or an answer belongs to: a word's label goes on its first sub-word
(the others get -100, which the loss skips), and an answer is a run of whole words of the context, so a
prediction maps back to characters through the words' offsets.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from data.prepare import PrepareError, open_text
from data.tasks import TaskDataError, TaskDataset

IGNORE = -100                          # the label of tokens that carry none: losses.cross_entropy skips it
WORD = re.compile(r"\w+(?:['’.-]\w+)*|[^\w\s]")   # a word or one punctuation mark, roughly CoNLL's tokens


# -----------------------------------------------------------------------------------------------------
# CoNLL


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (or IOB2) -> IOB2: an I-X that does not continue an X entity begins one, so becomes B-X."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or out[-1] == "O" or out[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def read_conll(path, max_sentences: int | None = None) -> list[tuple[list[str], list[str]]]:
    """[(words, IOB2 tags)] of a CoNLL file; a malformed tag is a TaskDataError naming file and line."""
    sentences, words, tags = [], [], []
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0] == "-DOCSTART-":
                    if words:
                        sentences.append((words, to_iob2(tags)))
                        words, tags = [], []
                    if max_sentences and len(sentences) >= max_sentences:
                        break
                    continue
                tag = parts[-1]
                if len(parts) < 2 or not (tag == "O" or re.fullmatch(r"[BIES]-\S+", tag)):
                    raise TaskDataError(f"{path}:{n}: expected `word ... TAG` with TAG O, B-X or I-X, got {line.strip()!r}")
                words.append(parts[0])
                tags.append(tag)
    except (OSError, EOFError, PrepareError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None
    if words:
        sentences.append((words, to_iob2(tags)))
    if not sentences:
        raise TaskDataError(f"{path}: no sentences (expected CoNLL lines `word POS chunk TAG`, blank lines between sentences)")
    return sentences


def tag_classes(sentences) -> list[str]:
    """The tag set, "O" first then by entity type and B before I, so a folder's labels read in order."""
    tags = {t for _, ts in sentences for t in ts} - {"O"}
    return ["O"] + sorted(tags, key=lambda t: (t[2:], t[:1]))


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character offsets of the words of a raw text: runs of word characters
    (with inner ' . - kept, "U.S" "o'clock" "1996-08-22") and single punctuation marks."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def encode_words(tokenizer, words: list[str], max_length: int, pieces=None):
    """[CLS] sub-words of each word [SEP], cut at max_length -> (ids, types, first), first[w] the position
    of word w's first sub-word, None when the cut dropped it. `pieces`: the words' ids, when known."""
    pieces = tokenizer.encode_batch(words) if pieces is None else pieces
    ids, first = [tokenizer.cls_id], []
    for p in pieces:
        p = p or [tokenizer.unk_id]                  # a word the tokenizer drops entirely (a control char)
        if len(ids) + len(p) > max_length - 1:
            first.append(None)
            continue
        first.append(len(ids))
        ids += p
    ids.append(tokenizer.sep_id)
    return ids, [0] * len(ids), first


def token_labels(first, label_ids, length) -> list[int]:
    """One label per token: each word's on its first sub-word, IGNORE on the rest and on [CLS]/[SEP]."""
    out = [IGNORE] * length
    for pos, y in zip(first, label_ids):
        if pos is not None:
            out[pos] = y
    return out


def encode_sentences(tokenizer, sentences, classes, max_length):
    """Encoded CoNLL sentences: {"ids", "types", "first", "labels" (per token), "words", "tags"}."""
    flat = tokenizer.encode_batch([w for words, _ in sentences for w in words])   # one batch call
    index = {c: i for i, c in enumerate(classes)}
    out = {"ids": [], "types": [], "first": [], "labels": [], "words": [], "tags": []}
    k = 0
    for words, tags in sentences:
        ids, types, first = encode_words(tokenizer, words, max_length, flat[k:k + len(words)])
        k += len(words)
        # a tag never seen in training (a type the train file lacks) trains nothing: IGNORE
        out["labels"].append(token_labels(first, [index.get(t, IGNORE) for t in tags], len(ids)))
        for key, v in (("ids", ids), ("types", types), ("first", first), ("words", words), ("tags", tags)):
            out[key].append(v)
    return out


class TokenDataset(TaskDataset):
    """TaskDataset with one label per token: padded with IGNORE; the loss is a sum over labelled tokens,
    so num_targets counts those (the trainer divides by it)."""

    def __init__(self, input_ids, token_type_ids, token_labels, *args, **kw):
        super().__init__(input_ids, token_type_ids, None, *args, **kw)
        self.token_labels = token_labels

    def micro_batch(self, step: int, index: int) -> dict:
        batch = super().micro_batch(step, index)
        epoch, k = divmod(step * self.slots + index, self.batches_per_epoch)
        rows = self.epoch_batches(epoch)[k]
        labels = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)      # (B, T)
        for r, i in enumerate(rows):
            labels[r, :len(self.token_labels[i])] = torch.tensor(self.token_labels[i])
        batch["labels"], batch["num_targets"] = labels, int((labels != IGNORE).sum())
        return batch


# -----------------------------------------------------------------------------------------------------
# SQuAD


@dataclass
class Question:
    id: str
    question: str
    context: str
    answers: list[str]                 # gold texts (dev: usually three, train: one)
    starts: list[int]                  # their character offsets in the context
    article: int = 0


def read_squad(path, articles: slice | None = None) -> list[Question]:
    """The questions of a SQuAD v1.1 file, of the articles `articles` (a slice of the file's articles)."""
    try:
        with open_text(path) as f:
            data = json.load(f)
    except (OSError, EOFError, PrepareError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not JSON ({e}); expected SQuAD v1.1 {{\"data\": [...]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(f"{path}: expected SQuAD v1.1 JSON: an object with a \"data\" list of articles")
    out = []
    chosen = range(len(data["data"]))[articles or slice(None)]
    for a in chosen:
        try:
            for p in data["data"][a]["paragraphs"]:
                for q in p["qas"]:
                    answers = q.get("answers") or []
                    out.append(Question(q["id"], q["question"], p["context"], [x["text"] for x in answers],
                                        [int(x["answer_start"]) for x in answers], a))
        except (KeyError, TypeError) as e:
            raise TaskDataError(f"{path}: article {a}: expected paragraphs with context and qas "
                                f"(id, question, answers: text, answer_start); missing {e}") from None
    if not out:
        raise TaskDataError(f"{path}: no questions in articles {articles} (the file has {len(data['data'])})")
    return out


@dataclass
class Context:
    """A context as words with character offsets, and as sub-words: token k belongs to word word_of[k]."""
    spans: list[tuple[str, int, int]]
    ids: list[int] = field(default_factory=list)
    word_of: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)        # first token of each word
    last: list[int] = field(default_factory=list)         # last token of each word


def tokenize_context(tokenizer, text: str) -> Context:
    ctx = Context(word_spans(text))
    for w, p in enumerate(tokenizer.encode_batch([s[0] for s in ctx.spans]) if ctx.spans else []):
        p = p or [tokenizer.unk_id]
        ctx.first.append(len(ctx.ids))
        ctx.ids += p
        ctx.word_of += [w] * len(p)
        ctx.last.append(len(ctx.ids) - 1)
    return ctx


def answer_tokens(ctx: Context, start_char: int, text: str) -> tuple[int, int] | None:
    """(first, last) context token of the answer: the words overlapping its characters; None when none do."""
    end_char = start_char + len(text)
    words = [w for w, (_, s, e) in enumerate(ctx.spans) if s < end_char and e > start_char]
    return (ctx.first[words[0]], ctx.last[words[-1]]) if words else None


def qa_features(tokenizer, questions, max_length=384, doc_stride=128, max_query_length=64, train=False) -> dict:
    """[CLS] question [SEP] window [SEP] for overlapping windows over each context: windows start every
    doc_stride context tokens, until one reaches the end. train: labels (start, end) = the answer's tokens
    in the window, (0, 0) ([CLS]) when the window does not hold all of it; unanswerable (out of every
    window, or no answer) questions give no training windows.
    -> {"ids", "types", "labels" (train), "question" (the question of each window), "offset" (the
        position of the window's first context token), "start" (its index in the context),
        "contexts" (a Context per question)}."""
    out = {"ids": [], "types": [], "labels": [], "question": [], "offset": [], "start": [], "contexts": []}
    q_ids = tokenizer.encode_batch([q.question for q in questions])
    for n, q in enumerate(questions):
        ctx = tokenize_context(tokenizer, q.context)
        out["contexts"].append(ctx)
        query = q_ids[n][:max_query_length]
        room = max_length - len(query) - 3
        if room < 1:
            raise TaskDataError(f"--max-length {max_length}: leaves no room for the context after a "
                                f"{len(query)}-token question (raise --max-length)")
        gold = answer_tokens(ctx, q.starts[0], q.answers[0]) if train and q.answers else None
        if train and gold is None:
            continue
        start = 0
        while True:
            window = ctx.ids[start:start + room]
            offset = len(query) + 2
            if train:
                inside = start <= gold[0] and gold[1] < start + room
                label = (gold[0] - start + offset, gold[1] - start + offset) if inside else (0, 0)
                out["labels"].append(label)
            out["ids"].append([tokenizer.cls_id] + query + [tokenizer.sep_id] + window + [tokenizer.sep_id])
            out["types"].append([0] * offset + [1] * (len(window) + 1))
            out["question"].append(n)
            out["offset"].append(offset)
            out["start"].append(start)
            if start + room >= len(ctx.ids):
                break
            start += min(doc_stride, room)       # a stride wider than the window would skip tokens
    return out


def parse_articles(flag: str, value: str | None) -> slice | None:
    """'START:END' -> slice(START, END) (either may be empty), for --train-articles / --dev-articles."""
    if value is None:
        return None
    m = re.fullmatch(r"(\d*):(\d*)", value)
    if not m:
        raise TaskDataError(f"{flag}: expected START:END (article indices, e.g. 0:24), got {value!r}")
    return slice(*(int(x) if x else None for x in m.groups()))


def span_labels(feats) -> np.ndarray:
    return np.asarray(feats["labels"], dtype=np.int64).reshape(-1, 2)     # (N, 2): start, end
