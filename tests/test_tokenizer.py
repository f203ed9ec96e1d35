"""Specification of tokenizer.py.

WordPiece is checked id for id against the reference BertTokenizer (transformers) built from
the same all-MiniLM-L6-v2 vocab.txt. SentencePiece is trained here on real WikiText text.
"""
import random
import sys
import unicodedata

import pytest
import torch

from conftest import ROOT, minilm_dir, require_data

sys.path.insert(0, str(ROOT))
from tokenizer import (  # noqa: E402
    SentencePieceTokenizer, Tokenizer, TokenizerError, WordPieceTokenizer, load_tokenizer,
)

HELD_OUT = 300  # last non-blank WikiText lines, never seen in training


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer(str(minilm_dir() / "vocab.txt"))


@pytest.fixture(scope="module")
def wordpiece():
    return WordPieceTokenizer(minilm_dir() / "vocab.txt")


def sst2_sentences(split):
    lines = require_data("sst2", f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    return [line.rsplit("\t", 1)[0] for line in lines[1:]]


@pytest.fixture(scope="module")
def wiki_lines():
    text = require_data("wikitext", "wiki.valid.raw").read_bytes()[:2_000_000].decode("utf-8", "ignore")
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sp_models(wiki_lines, tmp_path_factory):
    """unigram trained from a corpus file, bpe from a string iterator: both corpus kinds."""
    root = tmp_path_factory.mktemp("sp")
    corpus = root / "train.txt"
    corpus.write_text("\n".join(wiki_lines[:-HELD_OUT]) + "\n", encoding="utf-8")
    return {
        "unigram": SentencePieceTokenizer.train([corpus], root / "unigram", vocab_size=2000, model_type="unigram", num_threads=2),
        "bpe": SentencePieceTokenizer.train(iter(wiki_lines[:-HELD_OUT]), root / "bpe", vocab_size=2000, model_type="bpe", num_threads=2),
    }


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    path.write_text("the cat sat on the mat\nthe dog ate the bone\n" * 20, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# WordPiece == reference
# ---------------------------------------------------------------------------------------------
def test_wordpiece_ids_equal_reference_on_every_sst2_dev_sentence(wordpiece, reference):
    sentences = sst2_sentences("dev")
    assert len(sentences) == 872
    ours = wordpiece.encode_batch(sentences)
    ref = reference(sentences, add_special_tokens=False)["input_ids"]
    mismatches = [s for s, a, b in zip(sentences, ours, ref) if a != b]
    assert not mismatches, mismatches[:5]
    # and with [CLS]/[SEP] through the batch call, unpadded
    batch = wordpiece(sentences, max_length=None, padding=False, return_tensors=None)
    assert batch["input_ids"] == reference(sentences)["input_ids"]


HANDCRAFTED = [
    "Café, naïve, Ångström, résumé, São Paulo, Zürich, Øresund, façade",
    "ΟΔΟΣ ΣΑΣ Σ σ ς İstanbul ǅ ß ẞ ﬁ ﬂ",  # Greek final sigma stays σ: lowercasing is per character
    "中文字符 日本語 ひらがな カタカナ 한국어 漢字かな混じり文",
    "emoji 😀🤣🥰 🫠 👍🏽 👨‍👩‍👧 🏴󠁧󠁢󠁳󠁣󠁴󠁿 ❤️ ✓",
    "control\x00chars\x01here\x7f tab\tnew\nline\rcr \x0b\x0c \u200b\u200d\ufeff soft\u00adhyphen \ufffd",
    "spaces\u00a0nbsp\u2003em\u3000ideo\u2028line\u2029para",
    "[CLS] special [SEP] tokens[MASK]inside [PAD][UNK] text [mask] [ MASK ] [MASK",
    "supercalifragilisticexpialidocious " + "a" * 100 + " " + "b" * 101 + " pneumonoultramicroscopic",
    "https://example.com/path?q=1&x=2#frag user@mail.org $3.50 100% C++ <html> {json: [1, 2]}",
    "don't stop—believin’ « quotes » „Anführungszeichen“ ¿Qué? ¡Olé! …",
    "hindi हिन्दी arabic العربية hebrew עברית russian Москва thai ภาษาไทย",
    "numbers ½ ² ³ ① Ⅻ ١٢٣ ０１２ ｆｕｌｌｗｉｄｔｈ",
    "", "   ", "\x00\x01",
]


@pytest.mark.parametrize("text", HANDCRAFTED)
def test_wordpiece_ids_equal_reference_on_handcrafted_text(wordpiece, reference, text):
    ref = reference(text, add_special_tokens=False)["input_ids"]
    assert wordpiece.encode(text) == ref, (wordpiece.tokenize(text), reference.convert_ids_to_tokens(ref))


def test_wordpiece_ids_equal_reference_on_random_mixed_script_text(wordpiece, reference):
    # An alphabet over Latin, accents, combining marks, Greek, Cyrillic, Arabic, Devanagari,
    # CJK, Hangul, kana, punctuation, controls, odd whitespace and emoji. (Marks and
    # punctuation added to Unicode after 8.0 are left out: the reference's tables predate them.)
    alphabet = ("abcXYZ019 .,!?'\"-()[]{}#@&*/\\" + "éÉçÇñÑüÜøÅß" + "\u0301\u0308\u0327"
                + "αβΣςДжЖ" + "سلام" + "हिन्दी" + "中文字日本" + "한국" + "かなカナ" + "。、「」"
                + "\x00\x07\t\n\u00a0\u2003\u200b\ufeff" + "😀🤣🫠👍")
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(2000)]
    texts += [t.replace("ab", "[MASK]") for t in texts[:200]]
    ref = reference(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, wordpiece.encode_batch(texts), ref) if a != b]
    assert not mismatches, mismatches[:5]


PAIRS = [
    ("The quick brown fox jumps over the lazy dog.", "A fast fox."),
    ("short", "a much longer second sentence that will have to be cut down to size"),
    ("a much longer first sentence that will have to be cut down to size", "short"),
    ("same length here", "also same here"),
    ("Café 中文", "[MASK] emoji 😀"),
]


@pytest.mark.parametrize("max_length", [None, 8, 9, 12, 64])
def test_wordpiece_pair_batch_equals_reference_including_truncation_and_padding(wordpiece, reference, max_length):
    a, b = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    ours = wordpiece(a, b, max_length=max_length, padding="longest", truncation=max_length is not None)
    ref = reference(a, b, max_length=max_length, padding="longest", truncation=max_length is not None,
                    return_special_tokens_mask=True, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask"):
        assert torch.equal(ours[key], ref[key]), key


def test_wordpiece_single_text_batch_equals_reference_padded_to_max_length(wordpiece, reference):
    texts = ["hello world", "a rather longer sentence with more words in it than the first", ""]
    ours = wordpiece(texts, max_length=10, padding="max_length")
    ref = reference(texts, max_length=10, padding="max_length", truncation=True,
                    return_special_tokens_mask=True, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask"):
        assert torch.equal(ours[key], ref[key]), key


def test_wordpiece_special_ids_come_from_the_vocab(wordpiece):
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id) == (0, 100, 101, 102, 103)
    assert wordpiece.special_ids == frozenset({0, 100, 101, 102, 103})
    assert wordpiece.vocab_size == 30522
    assert isinstance(wordpiece, Tokenizer)
    assert wordpiece.token_to_id("hello") == 7592 and wordpiece.id_to_token(7592) == "hello"
    assert wordpiece.token_to_id("not-a-token-xyz") == wordpiece.unk_id


def test_wordpiece_decode_joins_continuations_and_skips_special_tokens(wordpiece):
    ids = wordpiece("Tokenization is unbelievable", return_tensors=None)["input_ids"][0]
    assert wordpiece.decode(ids) == "tokenization is unbelievable"
    assert wordpiece.decode(ids, skip_special_tokens=False) == "[CLS] tokenization is unbelievable [SEP]"


def test_wordpiece_reads_do_lower_case_from_tokenizer_config_and_saves_it(tmp_path, reference, wordpiece):
    cased = WordPieceTokenizer(minilm_dir() / "vocab.txt", lowercase=False)
    saved = cased.save(tmp_path / "cased")
    assert '"do_lower_case": false' in (saved / "tokenizer_config.json").read_text()
    loaded = load_tokenizer(saved)
    assert isinstance(loaded, WordPieceTokenizer) and loaded.lowercase is False and loaded.strip_accents is False
    import transformers
    ref = transformers.BertTokenizer(str(minilm_dir() / "vocab.txt"), do_lower_case=False)
    text = "Hello World Café"
    assert loaded.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert loaded.encode(text) != wordpiece.encode(text)
    # the saved vocab is the same vocab
    assert (saved / "vocab.txt").read_bytes() == (minilm_dir() / "vocab.txt").read_bytes()


def test_wordpiece_batch_encodes_all_of_sst2_train(wordpiece):
    """The whole training set in one call (the word cache keeps it fast; no clock in the test)."""
    sentences = sst2_sentences("train")
    assert len(sentences) > 67_000
    fresh = WordPieceTokenizer(minilm_dir() / "vocab.txt")  # empty word cache
    batch = fresh(sentences, max_length=128)
    assert batch["input_ids"].shape[0] == len(sentences)
    for i in range(0, len(sentences), 6_700):               # rows agree with one-at-a-time encoding
        ids = [fresh.cls_id] + fresh.encode(sentences[i])[:126] + [fresh.sep_id]
        assert batch["input_ids"][i, :len(ids)].tolist() == ids


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_sentencepiece_round_trips_held_out_wikitext_lines(sp_models, wiki_lines, kind):
    tok = sp_models[kind]
    assert tok.vocab_size == 2000
    held_out = wiki_lines[-HELD_OUT:]
    encoded = tok.encode_batch(held_out)
    assert encoded == [tok.encode(line) for line in held_out[:20]] + encoded[20:]  # batch == one by one
    # Characters outside the 99.95% coverage become [UNK]; those lines cannot round-trip.
    clean = [(line, ids) for line, ids in zip(held_out, encoded) if tok.unk_id not in ids]
    assert len(clean) >= 0.8 * len(held_out)
    for line, ids in clean:
        # sentencepiece's default normalisation: NFKC, whitespace runs collapsed, ends trimmed
        assert tok.decode(ids) == " ".join(unicodedata.normalize("NFKC", line).split())
    n_tokens = sum(map(len, encoded))
    assert sum(ids.count(tok.unk_id) for ids in encoded) < 0.01 * n_tokens
    assert n_tokens < 0.5 * sum(map(len, held_out))  # pieces are mostly longer than one character


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_sentencepiece_reserves_ids_0_to_4_and_keeps_special_tokens_in_text_whole(sp_models, kind):
    tok = sp_models[kind]
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == frozenset(range(5))
    ids = tok.encode("[CLS] the cat [SEP] sat[MASK]on [PAD] mat [UNK]")
    assert [i for i in ids if i < 5] == [2, 3, 4, 0, 1]
    assert tok.encode("[MASK]") == [4] and tok.encode("[PAD]") == [0]
    assert tok.decode(ids) == "the cat sat on mat"
    assert tok.decode(ids, skip_special_tokens=False) == "[CLS] the cat [SEP] sat [MASK] on [PAD] mat [UNK]"
    # nothing learnt from the corpus contains a special token
    assert not any("[MASK]" in tok.id_to_token(i) for i in range(5, tok.vocab_size))


def test_sentencepiece_save_and_load_round_trip(sp_models, wiki_lines, tmp_path):
    tok = sp_models["unigram"]
    saved = tok.save(tmp_path / "saved")
    assert (saved / "tokenizer.model").is_file()
    for loaded in (load_tokenizer(saved), load_tokenizer(saved / "tokenizer.model")):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(wiki_lines[-50:]) == tok.encode_batch(wiki_lines[-50:])


def test_sentencepiece_training_is_repeatable(wiki_lines, tmp_path):
    lines = wiki_lines[:400]
    a = SentencePieceTokenizer.train(iter(lines), tmp_path / "a", vocab_size=500, model_type="bpe", num_threads=1)
    b = SentencePieceTokenizer.train(iter(lines), tmp_path / "b", vocab_size=500, model_type="bpe", num_threads=1)
    assert [a.id_to_token(i) for i in range(500)] == [b.id_to_token(i) for i in range(500)]


# ---------------------------------------------------------------------------------------------
# bad inputs: one clear error each
# ---------------------------------------------------------------------------------------------
def test_training_on_an_empty_corpus_says_so(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"empty corpus.*blank\.txt"):
        SentencePieceTokenizer.train([blank], tmp_path / "out", vocab_size=100)
    with pytest.raises(TokenizerError, match="empty corpus"):
        SentencePieceTokenizer.train(iter(["", "  "]), tmp_path / "out", vocab_size=100)
    with pytest.raises(TokenizerError, match="empty corpus"):
        SentencePieceTokenizer.train([], tmp_path / "out", vocab_size=100)


def test_vocab_larger_than_the_corpus_allows_names_the_size_and_a_smaller_one(tiny_corpus, tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=5000 is larger than this corpus allows; use vocab_size <= \d+"):
        SentencePieceTokenizer.train([tiny_corpus], tmp_path / "out", vocab_size=5000, num_threads=1)


def test_vocab_too_small_for_the_reserved_symbols_says_so(tiny_corpus, tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=5 is too small.*\[PAD\]"):
        SentencePieceTokenizer.train([tiny_corpus], tmp_path / "out", vocab_size=5)
    with pytest.raises(TokenizerError, match=r"vocab_size=8 is too small: the corpus needs \d+ ids"):
        SentencePieceTokenizer.train([tiny_corpus], tmp_path / "out", vocab_size=8, num_threads=1)


def test_non_utf8_bytes_in_a_corpus_file_name_the_file_line_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line ok\n".encode() + "second: caf".encode() + b"\xe9 au lait\n")
    with pytest.raises(TokenizerError, match=r"latin1\.txt is not UTF-8: byte 0xe9 at byte offset 25 \(line 2\)"):
        SentencePieceTokenizer.train([bad], tmp_path / "out", vocab_size=100)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"corpus file not found: .*nope\.txt"):
        SentencePieceTokenizer.train([tmp_path / "nope.txt"], tmp_path / "out", vocab_size=100)
    with pytest.raises(TokenizerError, match=r"SentencePiece model file not found: .*gone\.model"):
        SentencePieceTokenizer(tmp_path / "gone.model")
    with pytest.raises(TokenizerError, match=r"WordPiece vocab file not found: .*vocab\.txt"):
        WordPieceTokenizer(tmp_path / "vocab.txt")
    with pytest.raises(TokenizerError, match=r"no tokenizer in .*expected tokenizer\.model or vocab\.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"tokenizer path not found: .*missing"):
        load_tokenizer(tmp_path / "missing")


def test_a_vocab_without_the_special_tokens_is_rejected(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.txt has no \[MASK\] token"):
        WordPieceTokenizer(vocab)


# ---------------------------------------------------------------------------------------------
# batch call: padding, truncation, masks (structure, for either tokenizer)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["wordpiece", "sentencepiece"])
def any_tokenizer(request, wordpiece, sp_models):
    return wordpiece if request.param == "wordpiece" else sp_models["bpe"]


def test_batch_call_pads_to_the_longest_row_and_masks_padding(any_tokenizer):
    tok = any_tokenizer
    texts = ["one", "two words here and more of them", "three"]
    batch = tok(texts)
    lengths = [len(tok.encode(t)) + 2 for t in texts]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"}
    assert all(v.dtype == torch.long and v.shape == (3, max(lengths)) for v in batch.values())
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        ids = batch["input_ids"][row].tolist()
        assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and ids[n:] == [tok.pad_id] * (len(ids) - n)
        assert batch["special_tokens_mask"][row].tolist() == [1] + [0] * (n - 2) + [1] + [1] * (len(ids) - n)
    assert batch["token_type_ids"].sum() == 0


def test_batch_call_truncates_and_pads_to_max_length(any_tokenizer):
    tok = any_tokenizer
    long_text = "word " * 200
    batch = tok([long_text, "short"], max_length=16, padding="max_length")
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].tolist() == [1] * 16
    assert batch["input_ids"][0, -1] == tok.sep_id
    untruncated = tok([long_text], max_length=16, truncation=False, padding="longest")
    assert untruncated["input_ids"].shape[1] > 16


def test_batch_call_with_pairs_sets_token_types(any_tokenizer):
    tok = any_tokenizer
    batch = tok("first part", pairs="second part here", return_tensors=None, padding=False)
    a, b = tok.encode("first part"), tok.encode("second part here")
    assert batch["input_ids"] == [[tok.cls_id] + a + [tok.sep_id] + b + [tok.sep_id]]
    assert batch["token_type_ids"] == [[0] * (len(a) + 2) + [1] * (len(b) + 1)]
    assert batch["special_tokens_mask"] == [[1] + [0] * len(a) + [1] + [0] * len(b) + [1]]


def test_batch_call_rejects_ragged_tensors_and_bad_arguments(any_tokenizer):
    tok = any_tokenizer
    rows = tok(["a", "a b c d e f g"], padding=False, return_tensors=None)["input_ids"]
    assert [len(r) for r in rows] == [len(tok.encode(t)) + 2 for t in ("a", "a b c d e f g")]
    with pytest.raises(TokenizerError, match="different lengths"):
        tok(["a", "a b c d e f g"], padding=False)
    with pytest.raises(TokenizerError, match="padding must be"):
        tok(["a"], padding="sideways")
    with pytest.raises(TokenizerError, match="2 texts but 1 pairs"):
        tok(["a", "b"], pairs=["c"])
    with pytest.raises(TokenizerError, match="no room"):
        tok.encode_pair_ids([5, 6], [7], max_length=2)


def test_tokenizers_pickle_for_dataloader_workers(any_tokenizer):
    import pickle
    text = "Pickled tokenizers [MASK] still work, naïvely."
    assert pickle.loads(pickle.dumps(any_tokenizer)).encode(text) == any_tokenizer.encode(text)


@pytest.mark.parametrize("n_a, n_b, max_length, kept", [
    (3, 2, 20, (3, 2)),     # fits: untouched
    (10, 3, 10, (4, 3)),    # only the longer one is cut
    (3, 10, 10, (3, 4)),
    (5, 10, 10, (3, 4)),    # both cut: half each, the odd one to the longer
    (10, 5, 10, (4, 3)),
    (6, 6, 10, (3, 4)),     # a tie: the odd one goes to the second
    (7, None, 5, (3, None)),
])
def test_encode_pair_ids_truncates_longest_first(wordpiece, n_a, n_b, max_length, kept):
    a = list(range(1000, 1000 + n_a))
    b = None if n_b is None else list(range(2000, 2000 + n_b))
    ids, types, special = wordpiece.encode_pair_ids(a, b, max_length=max_length)
    assert len(ids) == len(types) == len(special) <= max_length
    assert sum(1000 <= i < 2000 for i in ids) == kept[0]
    if b is not None:
        assert sum(i >= 2000 for i in ids) == kept[1]
        assert types.count(1) == kept[1] + 1
