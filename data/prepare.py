"""Raw text -> pre-training shards: tokenizer.model, train.bin, val.bin and meta.json in one folder.

    python data/prepare.py --input ../shared/data/wiki/text ../shared/data/books --out data/wiki --vocab-size 8192
    python data/prepare.py --input ../shared/data/wikitext/wiki.test.raw --out data/wikitext-test --val-only --tokenizer data/wiki
    python data/prepare.py --download wikitext-103       # fetch + verify + unzip, then prepare into data/wikitext-103

or from Python: `from data.prepare import prepare; meta = prepare(["../shared/data/books"], "data/books")`.

The pipeline, step by step:
 1. Read. Each input is a file or a folder (walked recursively, in sorted order). A name ending in .xz, .bz2 or
    .gz is opened through lzma/bz2/gzip; all text is read as UTF-8 (bad bytes become U+FFFD, CRLF becomes LF).
    The format comes from the name, else from the first 64 KiB of (decompressed) text:
      Wikipedia XML dump  name *.xml, or text starting <mediawiki   -> one doc per article (namespace 0, no redirects)
      WikiText raw        name wiki.*.raw or *.tokens               -> one doc per ` = Title = ` article
      WikiExtractor       text starting `<doc `  (wiki_00 has no extension) -> one doc per <doc>...</doc>
      Project Gutenberg   a `*** START OF` line in the first 64 KiB -> one doc per book, between the markers
      plain text          any other *.txt, and any file named directly -> one doc per file
    Inside a folder, files matching none of these (README.md, SHA256SUMS, ...) are skipped.
    A document is paragraphs joined by "\n". Title lines are dropped (the first sentence repeats them);
    section headings stay as short lines, as WikiExtractor leaves them. Hard-wrapped text (books, .txt with
    blank lines between paragraphs) is re-flowed so that one line is one paragraph.
 2. Clean: drop control characters, collapse runs of whitespace, drop empty lines, then drop documents
    shorter than min_chars and exact duplicates (by a hash of the cleaned text; the first copy wins).
 3. Split: a document goes to val when its hash, read as a number in [0, 1), is below val_fraction. This is
    deterministic and does not depend on input order; if no document lands in val, the lowest hash does.
 4. Tokenize: train SentencePiece on the training documents (or copy the given model), then encode with a
    process pool; every document is followed by one [SEP] (id 3), the document separator. Unigram training
    time grows faster than its input, so above tokenizer_chars (10 M characters) it sees every k-th paragraph.
 5. Write train.bin / val.bin as flat numpy streams (uint16 for vocabularies up to 65536, else uint32; read
    them with np.memmap), then meta.json. Everything is written under temporary names first and moved into
    place with os.replace, meta.json last: a crashed run leaves the previous outputs, never a half-written
    folder that looks complete. A run whose inputs (sha256) and arguments equal meta.json's is a no-op.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import lzma
import multiprocessing
import signal
import os
import pathlib
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python data/prepare.py` finds tokenizer.py in the repo root
    sys.path.insert(0, str(ROOT))

from atomic import write_text  # noqa: E402

FORMAT_VERSION = 1
# The official WikiText raw archives (Merity et al. 2016): url, sha256, size in bytes.
DATASETS = {
    "wikitext-103": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
                     "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794", 191_984_949),
    "wikitext-2": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
                   "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", 4_721_645),
}


class PrepareError(ValueError):
    """Bad input or a failed download: one line that says what and where. The CLI prints it and exits 2."""


def log(quiet, msg):
    if not quiet:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. reading: find the files, tell their format, turn each into documents
# ---------------------------------------------------------------------------------------------
_COMPRESSED = {".xz": lzma.open, ".bz2": bz2.open, ".gz": gzip.open}
# The marker's title may wrap onto the next line: then the marker ends at the closing '***'.
_GUTENBERG_START = re.compile(r"^[ \t]*\*{3}[ \t]*START OF(?:[^*]{0,300}?\*{3}|[^\n]*).*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^[ \t]*(\*{3}[ \t]*END OF|End of (the )?Project Gutenberg)", re.M | re.I)


def open_text(path, mode="rt"):
    """Open plain or compressed (.xz/.bz2/.gz) files alike; text mode is UTF-8 with universal newlines."""
    opener = _COMPRESSED.get(pathlib.Path(path).suffix.lower(), open)
    return opener(path, mode, encoding="utf-8", errors="replace") if "t" in mode else opener(path, mode)


def detect_format(path, named=False):
    """'wikixml', 'wikitext', 'wikiextractor', 'gutenberg' or 'text'; None for a folder's unknown files."""
    path = pathlib.Path(path)
    name = path.name.lower()
    inner = name[: -len(path.suffix)] if path.suffix.lower() in _COMPRESSED else name
    if inner.endswith(".xml"):
        return "wikixml"
    if re.fullmatch(r"wiki\.[\w.-]+\.raw", inner) or inner.endswith(".tokens"):
        return "wikitext"
    try:
        with open_text(path) as f:
            head = f.read(1 << 16)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    start = head.lstrip("\ufeff \t\n")
    if start.startswith("<mediawiki") or (start.startswith("<?xml") and "<mediawiki" in start[:1000]):
        return "wikixml"
    if start.startswith("<doc "):
        return "wikiextractor"
    if _GUTENBERG_START.search(head):
        return "gutenberg"
    return "text" if inner.endswith(".txt") or named else None


def find_input_files(inputs):
    """[(path, format)] for every input: a file as named, or each recognised file below a folder."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_file():
            found.append((path, detect_format(path, named=True)))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            recognised = [(p, fmt) for p in files if (fmt := detect_format(p)) is not None]
            if not recognised:
                raise PrepareError(f"no recognised text files in folder {path} (looked for WikiExtractor, "
                                   f"Wikipedia XML, Gutenberg, WikiText and .txt files, plain or .xz/.bz2/.gz)")
            found += recognised
        else:
            raise PrepareError(f"input not found: {path}")
    if not found:
        raise PrepareError("no inputs given")
    return found


def read_documents(path, fmt=None):
    """Yield the raw documents of one file (paragraphs joined by "\\n"; not yet cleaned)."""
    fmt = fmt or detect_format(path, named=True)
    try:
        if fmt == "wikixml":
            yield from _read_wiki_xml(path)
            return
        with open_text(path) as f:
            if fmt == "wikiextractor":
                yield from _read_wikiextractor(f)
            elif fmt == "wikitext":
                yield from _read_wikitext(f)
            elif fmt == "gutenberg":
                yield _reflow(_cut_gutenberg(f.read()))
            else:
                yield _reflow(f.read())
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    except ET.ParseError as e:
        raise PrepareError(f"malformed XML in {path}: {e}") from None


def _read_wikiextractor(lines):
    """`<doc id=.. url=.. title="T">`, then a line repeating T (dropped), the paragraphs, `</doc>`."""
    doc, title = None, None
    for line in lines:
        if line.startswith("<doc "):
            m = re.search(r'title="(.*)"\s*>', line)
            title, doc = (html.unescape(m.group(1)).strip() if m else None), []
        elif line.startswith("</doc>"):
            if doc is not None:
                yield "".join(doc)
            doc = None
        elif doc is not None:
            if not doc and title is not None and line.strip() == title:
                continue
            doc.append(line)


def _read_wikitext(lines):
    """WikiText: ` = Title = ` starts an article (dropped), ` = = Section = = ` stays as 'Section'.
    WikiText splits numbers as `1 @,@ 000` / `3 @.@ 5` / `well @-@ known`; those are joined back."""
    doc = []
    for line in lines:
        s = line.strip()
        m = re.fullmatch(r"((?:= )+)(.*?)((?: =)+)", s)
        if m and m.group(1).count("=") == 1:
            if doc:
                yield "\n".join(doc)
            doc = []
        elif s:
            s = m.group(2) if m else s
            doc.append(re.sub(r" @([-,.])@(?: |$)", r"\1", s))
    if doc:
        yield "\n".join(doc)


def _cut_gutenberg(text):
    """Keep what lies between the `*** START OF ...` and `*** END OF ...` marker lines (the book itself);
    the `End of the Project Gutenberg EBook of ...` line that often precedes the END marker ends it too."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    return text[: end.start()] if end else text


def _reflow(text):
    """Hard-wrapped text with blank lines between paragraphs -> one paragraph a line.
    Without any blank line, every line already is a paragraph and is kept as it is."""
    blocks = re.split(r"\n[ \t]*\n", text.strip("\n"))
    return text if len(blocks) == 1 else "\n".join(" ".join(b.split()) for b in blocks)


def _read_wiki_xml(path):
    """Stream-parse a MediaWiki export: one document per article (namespace 0, not a redirect)."""
    with open_text(path, "rb") as f:
        root = None
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem  # <mediawiki>; cleared below so that parsed pages do not pile up in memory
            if event != "end" or elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = (elem.findtext("{*}ns") or "0").strip()
            redirect = elem.find("{*}redirect") is not None
            revisions = elem.findall("{*}revision")
            text = (revisions[-1].findtext("{*}text") or "") if revisions else ""
            root.clear()
            if ns == "0" and not redirect and not re.match(r"\s*#redirect", text, re.I):
                yield strip_wiki_markup(text)


_HIDDEN_LINKS = {"file", "image", "category", "media"}  # links that render as a picture or not at all


def _link_text(m):
    """[[target]] -> target, [[target|label]] -> label, [[File:..]] / [[Category:..]] / [[fr:..]] -> ''."""
    target, bar, label = m.group(1).partition("|")
    prefix = target.split(":", 1)[0].strip() if ":" in target else ""
    if prefix.lower() in _HIDDEN_LINKS or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix):
        return ""
    return (label or target).lstrip(":") if bar else target.lstrip(":")


def _remove_nested(text, tokens, opener):
    """Cut every outermost opener ... closer span (they nest: {{a|{{b}}}}). A closer with no opener
    is kept as text; an opener that is never closed is kept too, rather than eating the rest."""
    pieces, depth, keep_from, span_start = [], 0, 0, 0
    for m in tokens.finditer(text):
        if m.group(m.lastindex or 0) == opener:
            if depth == 0:
                span_start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pieces.append(text[keep_from:span_start])
                keep_from = m.end()
    pieces.append(text[keep_from:])
    return "".join(pieces)


def strip_wiki_markup(text):
    """Wikitext -> plain paragraphs. Not a full MediaWiki parser: it handles what articles mostly use."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/\s*>|<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero)\b[^>]*>.*?</\1\s*>",
                  "", text, flags=re.S | re.I)
    text = _remove_nested(text, re.compile(r"\{\{|\}\}"), "{{")  # templates, infoboxes
    text = _remove_nested(text, re.compile(r"^[ \t]*(\{\||\|\})", re.M), "{|")  # tables
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]", lambda m: m.group(1) or "", text)
    while True:  # innermost links first, so a file caption's own links do not stop the file link matching
        text, n = re.subn(r"\[\[([^\[\]]*)\]\]", _link_text, text)
        if n == 0:
            break
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # the remaining HTML tags; their text stays
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold'''
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # == Heading == -> Heading
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)  # list and indent markers
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ and other magic words
    return html.unescape(text)  # &nbsp; &ndash; ... (the XML layer already undid &lt; &amp;)


# ---------------------------------------------------------------------------------------------
# 2.-3. cleaning, de-duplication, train/val split
# ---------------------------------------------------------------------------------------------
# Control characters vanish (tab, vertical tab and form feed become spaces); the BOM goes too.
_CONTROL = {c: None for c in [*range(32), *range(127, 160), 0xFEFF] if c != 10} | {9: " ", 11: " ", 12: " "}


def clean_text(text):
    """Drop control characters, collapse whitespace inside each line, drop empty lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)
    return "\n".join(line for line in (" ".join(raw.split()) for raw in text.split("\n")) if line)


def doc_hash(text):
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_documents(docs, val_fraction, val_only=False):
    """(train, val) lists of texts. A document's hash decides, so the split survives reordering inputs."""
    if val_only:
        return [], [text for _, text in docs]
    train, val = [], []
    for h, text in docs:
        (val if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else train).append((h, text))
    if val_fraction > 0 and not val and len(train) > 1:  # tiny corpora: still get a validation document
        val.append(train.pop(min(range(len(train)), key=lambda k: train[k][0])))
    if not train and len(val) > 1:
        train.append(val.pop(max(range(len(val)), key=lambda k: val[k][0])))
    return [t for _, t in train], [t for _, t in val]


# ---------------------------------------------------------------------------------------------
# 4. tokenizing with a process pool
# ---------------------------------------------------------------------------------------------
_worker_tokenizer = None


def _init_worker(model_path):
    global _worker_tokenizer
    # a forked worker inherits the parent's signal handlers (a training loop's SIGTERM flag, say); it must
    # die on SIGTERM, or Pool.terminate() waits for it forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from tokenizer import load_tokenizer
    _worker_tokenizer = load_tokenizer(model_path)


def _encode_chunk(job):
    """One chunk of documents -> (how many, one array of their ids, each followed by [SEP])."""
    docs, dtype = job
    ids = []
    for doc in docs:
        ids += _worker_tokenizer.encode(doc)
        ids.append(_worker_tokenizer.sep_id)
    return len(docs), np.asarray(ids, dtype=dtype)


def sample_paragraphs(docs, max_chars):
    """Every k-th paragraph of docs, k chosen so that about max_chars characters come out (all if max_chars is
    0). A vocabulary from ~10 MB of text is as good as from all of it, and takes minutes less to train."""
    total = sum(len(d) for d in docs)
    step = max(1, -(-total // max_chars)) if max_chars else 1
    k = 0
    for doc in docs:
        for paragraph in doc.split("\n"):
            if k % step == 0:
                yield paragraph
            k += 1


def _chunks(docs, dtype, max_chars=1 << 18):
    """Group documents into ~256 KB jobs: big enough to amortise pickling, small enough to balance."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk, dtype
            chunk, size = [], 0
    if chunk:
        yield chunk, dtype


def tokenize_to_files(splits, model_path, dtype, workers, quiet):
    """splits: {file path: docs}. Streams each split's ids to its file; returns {file path: token count}."""
    counts = {}
    pool = None
    if workers > 1 and sum(len(d) for d in splits.values()) > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (str(model_path),))
    else:
        _init_worker(str(model_path))
    try:
        for path, docs in splits.items():
            jobs = _chunks(docs, dtype)
            results = pool.imap(_encode_chunk, jobs) if pool else map(_encode_chunk, jobs)
            counts[path] = 0
            with open(path, "wb") as f, tqdm(total=len(docs), unit="doc", desc=f"tokenize {path.name}",
                                             disable=quiet, leave=False) as bar:
                for n_docs, ids in results:
                    ids.tofile(f)
                    counts[path] += len(ids)
                    bar.update(n_docs)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return counts


# ---------------------------------------------------------------------------------------------
# 5. the whole pipeline, and the no-op check
# ---------------------------------------------------------------------------------------------
def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _resolve_tokenizer(tokenizer):
    """A tokenizer folder or file -> the file to copy (tokenizer.model, or a WordPiece vocab.txt)."""
    path = pathlib.Path(tokenizer)
    if path.is_dir():
        path = next((p for p in (path / "tokenizer.model", path / "vocab.txt") if p.is_file()), path / "tokenizer.model")
    if not path.is_file():
        raise PrepareError(f"tokenizer not found: {tokenizer} (expected a tokenizer.model file or a folder holding one)")
    return path


def _already_prepared(out_dir, sources, args):
    """meta.json of an earlier run with the same inputs and arguments whose outputs are all there, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        same = (meta["format_version"] == FORMAT_VERSION and meta["args"] == args and
                [(s["sha256"], s["size"]) for s in meta["sources"]] == [(s["sha256"], s["size"]) for s in sources])
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes_ok = all((out_dir / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * itemsize
                       for split in (("val",) if args["val_only"] else ("train", "val")))
        return meta if same and sizes_ok and (out_dir / meta["tokenizer"]).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(inputs, out_dir, vocab_size=8192, tokenizer_model="unigram", tokenizer=None, val_fraction=0.005,
            min_chars=200, workers=None, quiet=False, val_only=False, tokenizer_chars=10_000_000):
    """Prepare `inputs` (files and folders) into `out_dir`; returns the meta.json contents as a dict.

    tokenizer: an existing tokenizer.model (file or its folder) to reuse instead of training one; required by
    val_only, which sends every document to val.bin (held-out evaluation sets such as WikiText test).
    """
    files = find_input_files(inputs)
    sources = [{"path": str(p.resolve()), "sha256": file_sha256(p), "size": p.stat().st_size} for p, _ in files]

    def documents():
        for path, fmt in tqdm(files, unit="file", desc="read", disable=quiet or len(files) < 2, leave=False):
            yield from read_documents(path, fmt)

    return _prepare(documents, sources, out_dir, vocab_size, tokenizer_model, tokenizer, val_fraction,
                    min_chars, workers, quiet, val_only, tokenizer_chars)


def _prepare(documents, sources, out_dir, vocab_size, tokenizer_model, tokenizer, val_fraction, min_chars,
             workers, quiet, val_only, tokenizer_chars=10_000_000):
    from tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer

    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"output folder {out_dir} is a file")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer_model not in ("unigram", "bpe"):
        raise PrepareError(f"tokenizer_model must be 'unigram' or 'bpe', got {tokenizer_model!r}")
    if val_only and tokenizer is None:
        raise PrepareError("val-only needs an existing tokenizer (--tokenizer): evaluation data must not train one")
    tok_file = _resolve_tokenizer(tokenizer) if tokenizer is not None else None
    args = {"vocab_size": vocab_size, "tokenizer_model": tokenizer_model, "val_fraction": val_fraction,
            "min_chars": min_chars, "val_only": val_only,
            "tokenizer_sha256": file_sha256(tok_file) if tok_file else None,
            "tokenizer_chars": None if tok_file else tokenizer_chars}
    if (meta := _already_prepared(out_dir, sources, args)) is not None:
        log(quiet, f"{out_dir} is already prepared from the same inputs and arguments; nothing to do")
        return meta

    # read, clean, de-duplicate
    docs, seen, n_read, n_short = [], set(), 0, 0
    for raw in documents():
        n_read += 1
        text = clean_text(raw)
        if len(text) < min_chars:
            n_short += 1
        elif (h := doc_hash(text)) not in seen:
            seen.add(h)
            docs.append((h, text))
    if not docs:
        raise PrepareError(f"corpus is empty after cleaning: {n_read} documents read, "
                           f"none with at least min_chars={min_chars} characters")
    train, val = split_documents(docs, val_fraction, val_only)
    log(quiet, f"{n_read} documents read: {len(docs)} kept ({len(train)} train, {len(val)} val), "
               f"{n_short} too short, {n_read - n_short - len(docs)} duplicates")
    del docs, seen

    # Everything goes to a staging folder first; the finished files are moved into place at the end.
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".prepare-tmp-*"):  # scratch of a run that was killed (never an output)
        if not _process_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir / f".prepare-tmp-{os.getpid()}"
    staging.mkdir()
    try:
        try:
            if tok_file is not None:
                tok_name = "vocab.txt" if tok_file.suffix == ".txt" else "tokenizer.model"
                shutil.copyfile(tok_file, staging / tok_name)
                if tok_file.with_name("tokenizer_config.json").is_file():  # WordPiece casing options
                    shutil.copyfile(tok_file.with_name("tokenizer_config.json"), staging / "tokenizer_config.json")
                tok = load_tokenizer(staging / tok_name)
            else:
                tok_name = "tokenizer.model"
                log(quiet, f"training a {tokenizer_model} SentencePiece tokenizer, vocab_size={vocab_size}")
                tok = SentencePieceTokenizer.train(sample_paragraphs(train, tokenizer_chars), staging,
                                                   vocab_size=vocab_size, model_type=tokenizer_model)
        except TokenizerError as e:
            raise PrepareError(f"tokenizer: {e}") from None
        dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
        splits = {staging / "val.bin": val} if val_only else {staging / "train.bin": train, staging / "val.bin": val}
        counts = tokenize_to_files(splits, staging / tok_name, dtype, workers or os.cpu_count() or 1, quiet)

        meta = {
            "format_version": FORMAT_VERSION, "vocab_size": tok.vocab_size, "dtype": dtype,
            "train_tokens": counts.get(staging / "train.bin", 0), "val_tokens": counts[staging / "val.bin"],
            "train_docs": 0 if val_only else len(train), "val_docs": len(val),
            "tokenizer": tok_name, "doc_separator": tok.sep_id,
            "special_ids": {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id},
            "sources": sources, "args": args, "tokenizer_source": str(tok_file) if tok_file else None,
            "stats": {"docs_read": n_read, "docs_too_short": n_short, "docs_duplicate": n_read - n_short - len(train) - len(val)},
        }
        # The swap: the old meta.json goes first, so until the new one lands the folder reads as unfinished.
        (out_dir / "meta.json").unlink(missing_ok=True)
        for f in [tok_name, "tokenizer.vocab", "tokenizer_config.json", *(p.name for p in splits)]:
            if (staging / f).exists():
                os.replace(staging / f, out_dir / f)
        write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(quiet, f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({dtype})")
    return meta


# ---------------------------------------------------------------------------------------------
# the built-in corpus (no download needed) and the WikiText download
# ---------------------------------------------------------------------------------------------
def pydoc_corpus():
    """The help texts that every Python ships (`help('assert')` etc.): ~80 documents, ~460 KB of English."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def ensure_default_dataset(out_dir="data/pydoc", quiet=False, workers=None):
    """Prepare the pydoc corpus into out_dir unless it already is, and return out_dir. `python pretrain.py`
    with no data uses it, so that a fresh checkout trains end to end with nothing downloaded."""
    docs = pydoc_corpus()
    blob = "\0".join(docs).encode("utf-8")
    sources = [{"path": f"pydoc_data.topics (Python {sys.version.split()[0]})",
                "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}]
    _prepare(lambda: iter(docs), sources, out_dir, vocab_size=4096, tokenizer_model="unigram", tokenizer=None,
             val_fraction=0.05, min_chars=100, workers=workers, quiet=quiet, val_only=False)
    return out_dir


def download(url, dest, sha256=None, quiet=False):
    """Fetch url to dest through dest.part, resuming a partial .part (HTTP Range, or a seek for file://),
    check sha256, then rename into place. An existing dest with the right checksum is kept as it is."""
    dest = pathlib.Path(dest)
    if dest.exists():
        if sha256 and (got := file_sha256(dest)) != sha256:
            raise PrepareError(f"checksum mismatch: {dest} has sha256 {got}, expected {sha256}; remove it to download again")
        log(quiet, f"{dest} is already downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have:
        log(quiet, f"resuming {dest.name} at byte {have:,}")
    try:
        if urllib.parse.urlparse(url).scheme == "file":
            src = open(urllib.request.url2pathname(urllib.parse.urlparse(url).path), "rb")
            total = os.fstat(src.fileno()).st_size
            src.seek(min(have, total))
        else:
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                src = urllib.request.urlopen(request, timeout=60)
            except urllib.error.HTTPError as e:
                if e.code != 416:  # 416: nothing after byte `have`, the .part is already whole
                    raise
                src, total = None, have
            if src is not None:
                if have and src.status != 206:  # the server ignored the Range header: start again
                    have = 0
                total = have + int(src.headers.get("Content-Length") or 0) or None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                            desc=dest.name, disable=quiet, leave=False) as bar:
            while src is not None and (block := src.read(1 << 20)):
                f.write(block)
                bar.update(len(block))
        if src is not None:
            src.close()
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise PrepareError(f"download of {url} failed: {e} (run again to resume from {part})") from None
    if sha256 and (got := file_sha256(part)) != sha256:
        bad = part.with_name(dest.name + ".corrupt")
        os.replace(part, bad)
        raise PrepareError(f"checksum mismatch for {url}: got sha256 {got}, expected {sha256} "
                           f"(kept as {bad}; the next run downloads afresh)")
    os.replace(part, dest)
    return dest


def download_dataset(name, out_dir=None, url=None, sha256=None, quiet=False, **prepare_args):
    """Download + unzip a WikiText raw archive into out_dir/raw, prepare wiki.train.raw into out_dir, and the
    official valid and test files, with that tokenizer, into out_dir/valid and out_dir/test (val.bin only)."""
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    default_url, default_sha, _ = DATASETS[name]
    url, sha256 = url or default_url, (sha256 or default_sha).lower()
    out_dir = pathlib.Path(out_dir or ROOT / "data" / name)
    archive = download(url, out_dir / "raw" / default_url.rsplit("/", 1)[-1], sha256, quiet)
    unpacked = archive.with_suffix("")
    if not unpacked.is_dir():
        tmp = unpacked.with_name(f".{unpacked.name}.tmp-{os.getpid()}")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # extractall refuses absolute paths and '..' in member names
        except zipfile.BadZipFile as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PrepareError(f"{archive} is not a valid zip: {e}") from None
        os.replace(tmp, unpacked)
    found = {split: sorted(unpacked.rglob(f"wiki.{split}.raw")) for split in ("train", "valid", "test")}
    if not found["train"]:
        raise PrepareError(f"no wiki.train.raw inside {archive}")
    meta = prepare(found["train"][:1], out_dir, quiet=quiet, **prepare_args)
    eval_args = {k: v for k, v in prepare_args.items() if k in ("workers", "min_chars")}
    for split in ("valid", "test"):
        if found[split]:
            prepare(found[split][:1], out_dir / split, tokenizer=out_dir / meta["tokenizer"], val_only=True,
                    quiet=quiet, **eval_args)
    return meta


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--input", nargs="+", metavar="PATH", help="files and folders of raw text")
    p.add_argument("--out", help="output folder (default with --download: data/<dataset>)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-model", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--tokenizer", metavar="PATH", help="reuse this tokenizer.model (file or folder) instead of training")
    p.add_argument("--tokenizer-chars", type=int, default=10_000_000,
                   help="train the tokenizer on about this many characters of the training text (0: all)")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this after cleaning")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--val-only", action="store_true", help="everything to val.bin (needs --tokenizer)")
    p.add_argument("--download", choices=sorted(DATASETS), help="fetch this dataset and prepare it")
    p.add_argument("--url", help="with --download: another address for the archive (http, https or file)")
    p.add_argument("--sha256", help="with --download: the archive's expected sha256, instead of the built-in one")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    common = dict(vocab_size=a.vocab_size, tokenizer_model=a.tokenizer_model, val_fraction=a.val_fraction,
                  min_chars=a.min_chars, workers=a.workers, tokenizer_chars=a.tokenizer_chars)
    try:
        if bool(a.input) == bool(a.download):
            raise PrepareError("give either --input PATH... or --download DATASET")
        if a.download:
            if a.val_only or a.tokenizer:
                raise PrepareError("--download trains its own tokenizer; --val-only and --tokenizer do not apply")
            download_dataset(a.download, a.out, a.url, a.sha256, quiet=a.quiet, **common)
        else:
            if a.url or a.sha256:
                raise PrepareError("--url and --sha256 go with --download")
            if not a.out:
                raise PrepareError("--out is required with --input")
            prepare(a.input, a.out, tokenizer=a.tokenizer, quiet=a.quiet, val_only=a.val_only, **common)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
