"""Specification of data/prepare.py: raw text in its usual formats -> tokenizer.model, train.bin, val.bin, meta.json.

Real-data samples are small slices of ../shared/data (one WikiExtractor file, one Gutenberg book, WikiText valid),
so the whole file runs in well under a minute on one core. Vocabularies are kept at 1000.
"""
import bz2
import gzip
import hashlib
import http.server
import json
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import unicodedata
import zipfile

import numpy as np
import pytest

from conftest import ROOT, require_data

sys.path.insert(0, str(ROOT))
from data import prepare as P  # noqa: E402
from data.prepare import PrepareError, prepare  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

BOOK = "alcott__eight-cousins.txt.xz"

WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Lobster</title><ns>0</ns><id>1</id><revision><id>10</id><text xml:space="preserve">{{Infobox animal
| name = Lobster {{nested|template}}
}}
'''Lobsters''' are a family of [[marine]] [[crustacean|crustaceans]] living on the ''sea floor''.&lt;ref name="a"&gt;Smith, p. 4&lt;/ref&gt; They are eaten [http://example.com worldwide]. &lt;!-- hidden note --&gt;
[[File:Lobster.jpg|thumb|A lobster in a [[tank]]]]
== Anatomy ==
{| class="wikitable"
| claws || two
|}
* Lobsters have ten legs&amp;nbsp;and a &lt;small&gt;hard&lt;/small&gt; shell.
[[Category:Crustaceans]]
[[fr:Homard]]</text></revision></page>
  <page><title>Lobsters</title><ns>0</ns><id>2</id><redirect title="Lobster" /><revision><id>11</id><text>#REDIRECT [[Lobster]]</text></revision></page>
  <page><title>Talk:Lobster</title><ns>1</ns><id>3</id><revision><id>12</id><text>Talk page chatter that must not appear.</text></revision></page>
  <page><title>Crab</title><ns>0</ns><id>4</id><revision><id>13</id><text>Crabs are decapod crustaceans of the infraorder Brachyura, which typically have a very short projecting tail.</text></revision></page>
</mediawiki>
"""


def _first_docs(text, n):
    """WikiExtractor text cut after its n-th </doc>."""
    end = 0
    for _ in range(n):
        end = text.index("</doc>", end) + len("</doc>\n")
    return text[:end]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A mixed folder of small real samples in every format, compressed as the shared data is."""
    root = tmp_path_factory.mktemp("corpus")
    wiki = lzma.open(require_data("wiki", "text", "AA", "wiki_00.xz"), "rt", encoding="utf-8").read()
    (root / "wiki" / "AA").mkdir(parents=True)
    with lzma.open(root / "wiki" / "AA" / "wiki_00.xz", "wt", encoding="utf-8") as f:
        f.write(_first_docs(wiki, 6))
    book = lzma.open(require_data("books", BOOK), "rb").read()  # bytes: keeps the CRLF line ends
    start, end = book.index(b"*** START OF"), book.index(b"*** END OF")
    (root / "books").mkdir()
    (root / "books" / "eight-cousins.txt").write_bytes(book[: start + 60_000] + b"\r\n\r\n" + book[end - 500:])
    valid = require_data("wikitext", "wiki.valid.raw").read_text(encoding="utf-8")
    cut = [m.start() for m in re.finditer(r"^ = [^=].* = $", valid, re.M)][5]
    (root / "wikitext").mkdir()
    (root / "wikitext" / "wiki.valid.raw").write_text(valid[:cut], encoding="utf-8")
    (root / "dump.xml").write_text(WIKI_XML, encoding="utf-8")
    (root / "README.md").write_text("not data\n")
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    meta = prepare([corpus], out, vocab_size=1000, val_fraction=0.2, min_chars=50, workers=2, quiet=True,
                   tokenizer_chars=150_000)  # about half of the training text: the sampling path runs too
    return out, meta


# ---------------------------------------------------------------------------------------------
# reading each format
# ---------------------------------------------------------------------------------------------
def test_wikiextractor_file_gives_one_document_per_article_without_its_title_line():
    path = require_data("wiki", "text", "AA", "wiki_00.xz")
    raw = lzma.open(path, "rt", encoding="utf-8").read()
    titles = re.findall(r'<doc [^>]*title="([^"]*)"', raw)
    assert P.detect_format(path) == "wikiextractor"
    docs = list(P.read_documents(path))
    assert len(docs) == len(titles) > 10
    for title, doc in zip(titles, docs):
        assert P.clean_text(doc).split("\n")[0] != title
    assert P.clean_text(docs[0]).startswith("Anarchism is a political philosophy")
    assert not any("<doc" in d or "</doc>" in d for d in docs)


def test_gutenberg_book_keeps_only_the_text_between_start_and_end_markers_with_crlf_handled():
    path = require_data("books", BOOK)
    raw = lzma.open(path, "rb").read()
    assert b"\r\n" in raw and b"*** START OF" in raw
    assert P.detect_format(path) == "gutenberg"
    (doc,) = P.read_documents(path)
    text = P.clean_text(doc)
    assert "\r" not in doc
    assert "START OF" not in text and "END OF" not in text and "Project Gutenberg-tm" not in text
    assert "EIGHT COUSINS" in text[:2000]
    assert text.endswith("the spring revel of the eight cousins.")
    # hard-wrapped lines are re-flowed: one line a paragraph, so far fewer lines than the raw book
    assert text.count("\n") < raw.count(b"\n") / 3


def test_wikitext_raw_gives_one_document_per_title_and_undoes_its_number_escapes():
    path = require_data("wikitext", "wiki.valid.raw")
    raw = path.read_text(encoding="utf-8")
    docs = [P.clean_text(d) for d in P.read_documents(path)]
    assert len(docs) == len(re.findall(r"^ = [^=].* = $", raw, re.M)) == 60
    assert docs[0].startswith("Homarus gammarus , known as the European lobster")
    assert "\nDescription\n" in docs[0]  # ' = = Description = = ' became a heading line
    joined = "\n".join(docs)
    assert "@-@" not in joined and "@,@" not in joined and "@.@" not in joined
    assert "born in the city in 1932," in joined  # also at the end of a line
    assert "0.7" in docs[0] and "= Homarus gammarus =" not in joined


def test_wikipedia_xml_dump_keeps_main_namespace_articles_without_markup(tmp_path):
    path = tmp_path / "enwiki-sample.xml"
    path.write_text(WIKI_XML, encoding="utf-8")
    docs = [P.clean_text(d) for d in P.read_documents(path)]
    assert len(docs) == 2  # the redirect and the Talk: page are skipped
    lobster, crab = docs
    assert crab.startswith("Crabs are decapod crustaceans")
    assert lobster.startswith("Lobsters are a family of marine crustaceans living on the sea floor. They are eaten worldwide.")
    assert "Anatomy" in lobster.split("\n")  # heading kept as a line of its own
    assert "Lobsters have ten legs and a hard shell." in lobster
    for markup in ("{{", "}}", "[[", "]]", "''", "<", "Infobox", "Smith", "hidden note", "claws", "thumb",
                   "tank", "Category", "Homard", "http", "=="):
        assert markup not in lobster, markup


def test_plain_txt_is_one_document_and_keeps_its_paragraphs(tmp_path):
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text("First paragraph, hard\nwrapped over lines.\n\nSecond\tone.\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("One paragraph a line.\nAnother one.\n")
    assert [P.clean_text(d) for d in P.read_documents(wrapped)] == ["First paragraph, hard wrapped over lines.\nSecond one."]
    assert [P.clean_text(d) for d in P.read_documents(lines)] == ["One paragraph a line.\nAnother one."]


def test_folder_is_walked_in_sorted_order_with_formats_told_by_name_or_content(corpus, tmp_path):
    found = [(p.relative_to(corpus).as_posix(), fmt) for p, fmt in P.find_input_files([corpus])]
    assert found == [("books/eight-cousins.txt", "gutenberg"), ("dump.xml", "wikixml"),
                     ("wiki/AA/wiki_00.xz", "wikiextractor"), ("wikitext/wiki.valid.raw", "wikitext")]
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  wiki_00\n")
    (tmp_path / "notes.txt").write_text("plain\n")
    assert [p.name for p, _ in P.find_input_files([tmp_path])] == ["notes.txt"]
    assert P.find_input_files([tmp_path / "SHA256SUMS"])[0][1] == "text"  # a file named directly is read as text


def test_clean_text_drops_control_characters_and_collapses_whitespace():
    assert P.clean_text("\ufeffa\x00b  c\t d\r\n\r\n\x07e\u00a0 f \n\n") == "ab c d\ne f"


# ---------------------------------------------------------------------------------------------
# the shards
# ---------------------------------------------------------------------------------------------
def test_shards_agree_with_meta_json_and_decode_back_to_the_documents(prepared, corpus):
    out, meta = prepared
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["format_version"] == 1 and meta["tokenizer"] == "tokenizer.model" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 1000 and meta["doc_separator"] == 3
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert meta["train_docs"] + meta["val_docs"] == 6 + 1 + 5 + 2 and meta["val_docs"] >= 1
    assert {pathlib.Path(s["path"]).name for s in meta["sources"]} == {"eight-cousins.txt", "dump.xml", "wiki_00.xz", "wiki.valid.raw"}
    for s in meta["sources"]:
        assert s["sha256"] == hashlib.sha256(pathlib.Path(s["path"]).read_bytes()).hexdigest()
        assert s["size"] == pathlib.Path(s["path"]).stat().st_size
    tok = load_tokenizer(out / "tokenizer.model")
    # sentencepiece NFKC-normalises and gives newlines back as spaces; characters too rare for a 1000-piece
    # vocabulary become [UNK], which decode drops. Documents without [UNK] must come back exactly.
    norm = lambda t: " ".join(unicodedata.normalize("NFKC", t).split())
    docs = {norm(P.clean_text(d)) for p, fmt in P.find_input_files([corpus]) for d in P.read_documents(p, fmt)}
    exact = 0
    for split in ("train", "val"):
        ids = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta[f"{split}_tokens"] > 0
        assert (ids == 3).sum() == meta[f"{split}_docs"] and ids[-1] == 3 and ids.max() < 1000
        assert (ids == 1).mean() < 0.02
        for doc_ids in np.split(np.asarray(ids), np.flatnonzero(ids == 3) + 1)[:-1]:
            if 1 not in doc_ids:
                assert norm(tok.decode(doc_ids.tolist())) in docs
                exact += 1
    assert exact >= 3
    assert not list(out.glob(".*"))  # no staging or temporary files left behind


def test_second_run_with_the_same_inputs_and_arguments_is_a_noop_that_says_so(prepared, corpus, capsys):
    out, meta = prepared
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare([corpus], out, vocab_size=1000, val_fraction=0.2, min_chars=50, workers=2, tokenizer_chars=150_000)
    assert again == meta
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_inputs_or_arguments_prepare_again(prepared, tmp_path):
    out, _ = prepared
    src = tmp_path / "a.txt"
    src.write_text("A short text about lobsters and crabs, long enough to keep. " * 5)
    dest = tmp_path / "out"
    first = prepare([src], dest, tokenizer=out, quiet=True)
    (dest / ".prepare-tmp-1073741823").mkdir()  # scratch of a killed run (no such process): cleared on the next
    assert prepare([src], dest, tokenizer=out, min_chars=10, quiet=True)["args"]["min_chars"] == 10
    src.write_text("Different words now, about the sea floor and its animals. " * 5)
    third = prepare([src], dest, tokenizer=out, min_chars=10, quiet=True)
    assert third["sources"][0]["sha256"] != first["sources"][0]["sha256"]
    assert third["train_tokens"] == len(np.fromfile(dest / "train.bin", dtype=np.uint16))
    assert not list(dest.glob(".prepare-tmp-*"))


def test_compressed_variants_give_identical_shards(prepared, corpus, tmp_path):
    out, _ = prepared
    text = (corpus / "books" / "eight-cousins.txt").read_bytes()
    writers = {".txt": open, ".txt.gz": gzip.open, ".txt.bz2": bz2.open, ".txt.xz": lzma.open}
    shards = {}
    for ext, opener in writers.items():
        with opener(tmp_path / f"book{ext}", "wb") as f:
            f.write(text)
        meta = prepare([tmp_path / f"book{ext}"], tmp_path / ext, tokenizer=out, val_fraction=0, workers=1, quiet=True)
        assert meta["train_docs"] == 1
        shards[ext] = (tmp_path / ext / "train.bin").read_bytes()
    assert len(set(shards.values())) == 1 and len(shards[".txt"]) > 1000


def test_duplicate_and_too_short_documents_are_dropped(prepared, tmp_path):
    out, _ = prepared
    para = "The lobster walked along the sea floor looking for food and shelter. " * 4
    docs = [f'<doc id="{i}" url="u" title="T{i}">\nT{i}\n\n{body}\n</doc>\n'
            for i, body in enumerate([para, para + "\n", "Too short.", "  " + para.replace(" ", "  "), para + "More."])]
    (tmp_path / "wiki_00").write_text("".join(docs))
    meta = prepare([tmp_path / "wiki_00"], tmp_path / "out", tokenizer=out, val_fraction=0, min_chars=50, quiet=True)
    assert meta["train_docs"] == 2  # the same text up to whitespace counts as a duplicate
    assert meta["stats"] == {"docs_read": 5, "docs_too_short": 1, "docs_duplicate": 2}


def test_train_val_split_is_deterministic_and_independent_of_input_order():
    docs = [(P.doc_hash(f"document {i}"), f"document {i}") for i in range(400)]
    train, val = P.split_documents(docs, 0.1)
    train2, val2 = P.split_documents(docs[::-1], 0.1)
    assert set(val) == set(val2) and set(train) == set(train2) and 20 < len(val) < 60
    assert P.split_documents(docs[:3], 0.001)[1]  # a tiny corpus still gets one val document
    assert P.split_documents(docs, 0.5, val_only=True) == ([], [t for _, t in docs])


def test_tokenizer_trains_on_an_even_sample_of_paragraphs_when_the_text_is_large():
    docs = ["\n".join(f"d{i} p{j} " + "x" * 90 for j in range(10)) for i in range(100)]
    got = list(P.sample_paragraphs(docs, 20_000))
    assert 15_000 < sum(map(len, got)) <= 20_000 and got[0].startswith("d0 p0 ") and got[-1].startswith("d99 ")
    assert list(P.sample_paragraphs(docs, 0)) == [p for d in docs for p in d.split("\n")]


def test_val_only_puts_every_document_in_val_bin_and_needs_an_existing_tokenizer(prepared, corpus, tmp_path):
    out, _ = prepared
    valid = corpus / "wikitext" / "wiki.valid.raw"
    with pytest.raises(PrepareError, match="tokenizer"):
        prepare([valid], tmp_path / "eval", val_only=True, quiet=True)
    meta = prepare([valid], tmp_path / "eval", tokenizer=out / "tokenizer.model", val_only=True, quiet=True)
    assert (meta["train_docs"], meta["train_tokens"], meta["val_docs"]) == (0, 0, 5)
    assert not (tmp_path / "eval" / "train.bin").exists()
    assert (tmp_path / "eval" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert len(np.fromfile(tmp_path / "eval" / "val.bin", dtype=np.uint16)) == meta["val_tokens"]


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("missing input", "input not found"),
    ("folder without text files", "no recognised text files"),
    ("only short documents", "empty after cleaning"),
    ("missing tokenizer", "tokenizer not found"),
])
def test_bad_input_is_one_clear_error(case, message, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / "short.txt").write_text("tiny\n")
    inputs, kwargs = {
        "missing input": ([tmp_path / "nope.txt"], {}),
        "folder without text files": ([tmp_path / "empty"], {}),
        "only short documents": ([tmp_path / "short.txt"], {}),
        "missing tokenizer": ([tmp_path / "short.txt"], {"tokenizer": tmp_path / "no.model"}),
    }[case]
    with pytest.raises(PrepareError, match=message):
        prepare(inputs, tmp_path / "out", vocab_size=1000, quiet=True, **kwargs)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_cli_reports_bad_input_as_one_error_line_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: input not found") and "Traceback" not in r.stderr


def test_cli_prepares_a_held_out_set_with_an_existing_tokenizer(prepared, corpus, tmp_path):
    out, _ = prepared
    r = subprocess.run([sys.executable, "data/prepare.py", "--input", str(corpus / "wikitext"), "--out", str(tmp_path / "ev"),
                        "--val-only", "--tokenizer", str(out), "--workers", "1", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ev" / "meta.json").read_text())["val_docs"] == 5


def test_a_failed_run_keeps_everything_an_earlier_run_wrote(prepared, corpus, tmp_path, monkeypatch):
    out, _ = prepared
    dest = tmp_path / "out"
    shutil.copytree(out, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(PrepareError):
        prepare([tmp_path / "missing"], dest, quiet=True)

    def crash(splits, *args):  # dies half-way through writing the shards
        next(iter(splits)).write_bytes(b"\x01\x02")
        raise RuntimeError("killed")
    monkeypatch.setattr(P, "tokenize_to_files", crash)
    with pytest.raises(RuntimeError):
        prepare([corpus / "dump.xml"], dest, tokenizer=out, min_chars=50, quiet=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # no staging folder left either


# ---------------------------------------------------------------------------------------------
# downloads
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def wikitext_zip(corpus, tmp_path):
    """A small stand-in for wikitext-2-raw-v1.zip, laid out as the real one."""
    valid = (corpus / "wikitext" / "wiki.valid.raw").read_text(encoding="utf-8")
    path = tmp_path / "src" / "wikitext-2-raw-v1.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # stored: bytes in the middle differ visibly
        z.writestr("wikitext-2-raw/wiki.train.raw", valid)
        z.writestr("wikitext-2-raw/wiki.valid.raw", valid[: len(valid) // 2])
        z.writestr("wikitext-2-raw/wiki.test.raw", valid[len(valid) // 2:])
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_resumes_a_partial_file_over_a_file_url_then_unzips_and_prepares(wikitext_zip, tmp_path):
    path, sha = wikitext_zip
    good = path.read_bytes()
    half = len(good) // 2
    out = tmp_path / "wt2"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "wikitext-2-raw-v1.zip.part").write_bytes(good[:half])
    # Spoil the source's first half: only a download that resumes at `half` still gets the right bytes.
    path.write_bytes(b"\0" * half + good[half:])
    meta = P.download_dataset("wikitext-2", out, url=path.as_uri(), sha256=sha, vocab_size=1000, workers=1, quiet=True)
    assert (out / "raw" / "wikitext-2-raw-v1.zip").read_bytes() == good
    assert not (out / "raw" / "wikitext-2-raw-v1.zip.part").exists()
    assert meta["train_docs"] + meta["val_docs"] == 5 and (out / "train.bin").exists()
    evals = [json.loads((out / split / "meta.json").read_text()) for split in ("valid", "test")]
    assert [(ev["train_docs"], ev["val_docs"] > 0) for ev in evals] == [(0, True), (0, True)]
    for split in ("valid", "test"):
        assert (out / split / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert P.main(["--download", "wikitext-2", "--out", str(out), "--url", path.as_uri(), "--sha256", sha,
                   "--vocab-size", "1000", "--workers", "1", "--quiet"]) == 0  # second time: all already there


def test_download_resumes_over_http_with_a_range_request(wikitext_zip, tmp_path):
    path, sha = wikitext_zip
    data = path.read_bytes()
    ranges = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))
            ranges.append(self.headers.get("Range"))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "dl" / "w.zip"
        dest.parent.mkdir()
        (tmp_path / "dl" / "w.zip.part").write_bytes(data[:1000])
        P.download(f"http://127.0.0.1:{server.server_port}/w.zip", dest, sha, quiet=True)
    finally:
        server.shutdown()
        server.server_close()
    assert ranges == ["bytes=1000-"] and dest.read_bytes() == data


def test_download_checksum_mismatch_is_one_clear_error(wikitext_zip, tmp_path):
    path, _ = wikitext_zip
    out = tmp_path / "wt2"
    with pytest.raises(PrepareError, match="checksum mismatch"):
        P.download_dataset("wikitext-2", out, url=path.as_uri(), sha256="0" * 64, quiet=True)
    assert not (out / "raw" / "wikitext-2-raw-v1.zip").exists() and not (out / "meta.json").exists()
    assert P.main(["--download", "wikitext-2", "--out", str(out), "--url", path.as_uri(), "--sha256", "0" * 64,
                   "--quiet"]) == 2


def test_known_datasets_point_at_the_official_wikitext_archives():
    for name, (url, sha, size) in P.DATASETS.items():
        assert url == f"https://s3.amazonaws.com/research.metamind.io/wikitext/{name}-raw-v1.zip"
        assert re.fullmatch(r"[0-9a-f]{64}", sha) and size > 1_000_000


# ---------------------------------------------------------------------------------------------
# the built-in corpus
# ---------------------------------------------------------------------------------------------
def test_pydoc_corpus_is_a_non_empty_list_of_english_help_texts():
    docs = P.pydoc_corpus()
    assert len(docs) > 50 and all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(map(len, docs)) > 200_000 and any("assert" in d for d in docs)


def test_ensure_default_dataset_prepares_the_pydoc_corpus_once(tmp_path, capsys):
    out = P.ensure_default_dataset(tmp_path / "pydoc", workers=1, quiet=True)
    meta = json.loads((pathlib.Path(out) / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["train_docs"] > 50 and meta["val_docs"] >= 1
    assert P.ensure_default_dataset(tmp_path / "pydoc") == out
    assert "already prepared" in capsys.readouterr().out
