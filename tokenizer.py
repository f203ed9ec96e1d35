"""Tokenizers: text -> ids for a BERT-style encoder, two ways behind one interface.

- SentencePieceTokenizer: trains (unigram or BPE) and wraps a `sentencepiece` model. Use it
  to pretrain from scratch on your own corpus.
- WordPieceTokenizer: a hand-written BERT WordPiece that reads a `vocab.txt` and gives the
  same ids as the reference BERT tokenizer. Use it to fine-tune or evaluate checkpoints that
  ship a BERT vocabulary (e.g. all-MiniLM-L6-v2).

Both share the `Tokenizer` base class, which owns everything that is not about splitting
text: the five reserved tokens, building `[CLS] a [SEP] b [SEP]`, truncation, padding and
batching into tensors. A subclass only has to turn plain text segments into ids and back.

Known limit of the WordPiece match: character classes come from Python's `unicodedata`, while
the reference's mark/punctuation tables are Unicode 8.0. ~500 code points of scripts and
symbols added since (Newa, Soyombo, U+2E43.., U+0890..) are classed differently; all text in
scripts older than 2015 (Latin, Greek, Cyrillic, Arabic, Indic, CJK, emoji...) matches.
"""
import functools
import itertools
import json
import os
import pathlib
import re
import shutil
import unicodedata

import torch

from atomic import atomic_write, write_json, write_text
from config import template_problem

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# Found in raw text, a special token is never split: "a[MASK]b" -> a, [MASK], b.
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class TokenizerError(ValueError):
    """A bad corpus, model file or argument, with a one-line message naming the culprit."""


class Tokenizer:
    """The shared interface. Subclasses set `vocab_size` and call `_set_special_ids`, and
    implement `_encode_segments`, `decode`, `token_to_id`, `id_to_token` and `save`."""

    vocab_size: int

    def _set_special_ids(self, lookup, where):
        """Look the five reserved tokens up with `lookup(token) -> id or None`."""
        ids = {}
        for token in SPECIAL_TOKENS:
            ids[token] = lookup(token)
            if ids[token] is None:
                raise TokenizerError(f"{where} has no {token} token; a BERT tokenizer needs all of {' '.join(SPECIAL_TOKENS)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = frozenset(ids.values())
        self._special_to_id = ids

    # ---- text -> ids ----
    def _encode_segments(self, segments: list[str]) -> list[list[int]]:
        """Ids of each plain-text segment (no special tokens inside). Subclass hook."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no [CLS]/[SEP] added. Special tokens written in the text map to
        their reserved id; the text between them goes to the subclass in one batch call."""
        segments, plans = [], []
        for text in texts:
            if not isinstance(text, str):
                raise TokenizerError(f"expected text as str, got {type(text).__name__}: {text!r:.60}")
            # A plan lists, per text, either [special id] or the index of a segment in `segments`.
            plan = []
            parts = _SPECIAL_RE.split(text) if "[" in text else [text]
            for k, part in enumerate(parts):
                if k % 2:  # re.split puts the captured special tokens at odd positions
                    plan.append([self._special_to_id[part]])
                elif part:
                    plan.append(len(segments))
                    segments.append(part)
            plans.append(plan)
        encoded = self._encode_segments(segments) if segments else []
        return [[i for item in plan for i in (item if isinstance(item, list) else encoded[item])] for plan in plans]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def tokenize(self, text: str) -> list[str]:
        return [self.id_to_token(i) for i in self.encode(text)]

    # ---- model inputs ----
    cloze = None    # (ids before the sentence, ids after it) of a cloze template: set_template

    def set_template(self, template: str | None):
        """From now on every text goes into a cloze template, "{text} It was [MASK] .", as a model fine-tuned
        with --task prompt reads it: `[CLS] before x after [SEP]`. The sentence (never the template) is cut
        to max_length, and a [MASK] typed in the sentence is dropped, so each row holds the template's one.
        None: plain `[CLS] x [SEP]` again. Returns the tokenizer."""
        if template is None:
            self.cloze = None
            return self
        problem = template_problem(template, name="template")
        if problem:
            raise TokenizerError(problem)
        before, after = template.split("{text}")
        self.cloze = (self.encode(before) if before.strip() else [], self.encode(after) if after.strip() else [])
        return self

    def encode_pair_ids(self, a_ids, b_ids=None, max_length=None):
        """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` -> (input_ids, token_type_ids, special_tokens_mask).

        Type 0 covers [CLS], a and its [SEP]; type 1 covers b and the last [SEP]. With max_length,
        a and b are cut at the end, longest first, exactly as the reference BERT tokenizer does.
        With a cloze template (set_template), a goes inside it and is cut alone; b is refused.
        """
        a_ids, b_ids = list(a_ids), (None if b_ids is None else list(b_ids))
        if self.cloze is not None:
            if b_ids is not None:
                raise TokenizerError("a cloze template (--task prompt) takes one text per example, not a pair")
            before, after = self.cloze
            a_ids = [i for i in a_ids if i != self.mask_id]
            if max_length is not None:
                room = max_length - 2 - len(before) - len(after)
                if room < 1:
                    raise TokenizerError(f"max_length={max_length} leaves no room for the sentence beside the "
                                         f"template's {len(before) + len(after)} tokens and [CLS] [SEP]")
                a_ids = a_ids[:room]
            a_ids = before + a_ids + after
        n_special = 2 if b_ids is None else 3
        if max_length is not None:
            budget = max_length - n_special
            if budget < 0:
                raise TokenizerError(f"max_length={max_length} leaves no room for the {n_special} special tokens")
            if b_ids is None:
                a_ids = a_ids[:budget]
            else:
                n_a, n_b = _longest_first(len(a_ids), len(b_ids), budget)
                a_ids, b_ids = a_ids[:n_a], b_ids[:n_b]
        ids = [self.cls_id] + a_ids + [self.sep_id]
        types = [0] * len(ids)
        special = [1] + [0] * len(a_ids) + [1]
        if b_ids is not None:
            ids += b_ids + [self.sep_id]
            types += [1] * (len(b_ids) + 1)
            special += [0] * len(b_ids) + [1]
        return ids, types, special

    def __call__(self, texts, pairs=None, max_length=128, padding="longest", truncation=True, return_tensors="pt"):
        """Tokenize a batch into model inputs: input_ids, attention_mask, token_type_ids,
        special_tokens_mask. Padding uses pad_id for input_ids, 0 for attention_mask and
        token_type_ids, and 1 for special_tokens_mask ([PAD] is a special token, so a masked-LM
        collator that skips special tokens also skips padding; this matches the reference)."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(pairs, str):
            pairs = [pairs]
        texts = list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise TokenizerError(f"got {len(texts)} texts but {len(pairs)} pairs")
        if padding is True:
            padding = "longest"
        if padding not in ("longest", "max_length", False, None):
            raise TokenizerError(f"padding must be 'longest', 'max_length' or False, got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise TokenizerError("padding='max_length' needs a max_length")
        if return_tensors not in ("pt", None):
            raise TokenizerError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

        firsts = self.encode_batch(texts)
        seconds = self.encode_batch(list(pairs)) if pairs is not None else [None] * len(texts)
        limit = max_length if truncation else None
        rows = [self.encode_pair_ids(a, b, limit) for a, b in zip(firsts, seconds)]

        lengths = [len(ids) for ids, _, _ in rows]
        width = {"longest": max(lengths, default=0), "max_length": max([*lengths, max_length or 0])}.get(padding)
        if width is None and return_tensors == "pt":
            if len(set(lengths)) > 1:
                raise TokenizerError("padding=False gives rows of different lengths; use return_tensors=None or pad")
            width = lengths[0] if lengths else 0
        pads = {"input_ids": self.pad_id, "token_type_ids": 0, "special_tokens_mask": 1}
        if return_tensors is None:
            out = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "special_tokens_mask": []}
            for row, n in zip(rows, lengths):
                fill = 0 if width is None else width - n
                out["attention_mask"].append([1] * n + [0] * fill)
                for key, values in zip(pads, row):
                    out[key].append(values + [pads[key]] * fill)
            return out
        # Tensors: start from all-padding, then pour every row's values, flattened, into the
        # real (non-padding) positions; a boolean-mask assignment fills them in row order.
        real = torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]
        out = {"input_ids": None, "attention_mask": real.long(), "token_type_ids": None, "special_tokens_mask": None}
        for k, (key, pad) in enumerate(pads.items()):
            out[key] = torch.full((len(rows), width), pad, dtype=torch.long)
            out[key][real] = torch.tensor(list(itertools.chain.from_iterable(row[k] for row in rows)), dtype=torch.long)
        return out


def _longest_first(n_a, n_b, budget):
    """Lengths that a and b keep so that n_a + n_b <= budget, cutting the longer one first.

    Closed form of "drop one token from the longer sequence until it fits": if only the longer
    one needs cutting it keeps what the shorter leaves; else both get half, and the odd token
    goes to the one that was longer (the first when they tie). Same rule as the reference.
    """
    if n_a + n_b <= budget:
        return n_a, n_b
    short, long_ = min(n_a, n_b), max(n_a, n_b)
    if short <= budget - short:
        short_keep, long_keep = short, budget - short
    else:
        short_keep, long_keep = budget // 2, budget - budget // 2
    return (short_keep, long_keep) if n_a <= n_b else (long_keep, short_keep)


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A trained `sentencepiece` model with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4."""

    MODEL_NAME = "tokenizer.model"

    def __init__(self, model_file):
        import sentencepiece as spm

        self.model_file = pathlib.Path(model_file)
        if not self.model_file.is_file():
            raise TokenizerError(f"SentencePiece model file not found: {self.model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"cannot read SentencePiece model {self.model_file}: {e}") from None
        self.vocab_size = self.sp.get_piece_size()

        def lookup(token):
            i = self.sp.piece_to_id(token)
            return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to unk_id

        self._set_special_ids(lookup, f"SentencePiece model {self.model_file}")

    @classmethod
    def train(cls, corpus, out_dir, vocab_size=8192, model_type="unigram", character_coverage=0.9995,
              input_sentence_size=2_000_000, num_threads=None, seed=0, verbose=False):
        """Train on `corpus` and write `out_dir/tokenizer.model` (and the readable tokenizer.vocab).

        corpus: a list/tuple of text-file paths (or one path), one sentence or paragraph per line;
        or any other iterable of strings, streamed to sentencepiece without a temporary file.
        """
        import sentencepiece as spm

        if model_type not in ("unigram", "bpe"):
            raise TokenizerError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        n_reserved = len(SPECIAL_TOKENS)
        if vocab_size <= n_reserved:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: {n_reserved} ids are reserved for "
                                 f"{' '.join(SPECIAL_TOKENS)}, and every kept character needs one too")
        if isinstance(corpus, (str, os.PathLike)):
            corpus = [corpus]
        if isinstance(corpus, (list, tuple)):
            paths = [pathlib.Path(p) for p in corpus]
            if not any([_check_corpus_file(p) for p in paths]):  # a list, so every file gets checked
                raise TokenizerError(f"empty corpus: no non-blank text in {', '.join(map(str, paths)) or 'an empty file list'}")
            source = {"input": [str(p) for p in paths]}
        else:
            source = {"sentence_iterator": _non_empty_or_raise(iter(corpus))}

        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        spm.set_random_generator_seed(seed)  # sampling and shuffling become repeatable
        try:
            spm.SentencePieceTrainer.train(
                **source,
                model_prefix=str(out_dir / pathlib.Path(cls.MODEL_NAME).stem),
                model_type=model_type,
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                # Reserved ids. [PAD]/[UNK] are sentencepiece's own pad/unk; BOS/EOS are off (BERT uses
                # [CLS]/[SEP]); [CLS] [SEP] [MASK] are user-defined so they take ids 2, 3, 4 and are
                # never merged into other pieces.
                pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
                user_defined_symbols=[CLS, SEP, MASK],
                # Large corpora: train on a shuffled sample of this many lines, not the first ones.
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                # Lines longer than this (in bytes) are silently dropped; the default 4192 loses paragraphs.
                max_sentence_length=1 << 20,
                # A vocab the corpus cannot fill is an error, not a smaller model.
                hard_vocab_limit=True,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=0 if verbose else 1,
            )
        except RuntimeError as e:
            raise _explain_training_error(e, vocab_size) from None
        return cls(out_dir / cls.MODEL_NAME)

    def _encode_segments(self, segments):
        return self.sp.encode(segments)  # sentencepiece's list API encodes the batch in C++

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        # Keep special tokens visible: decode the runs between them, write them out as text.
        words = []
        for special, run in itertools.groupby(ids, key=lambda i: i in self.special_ids):
            run = list(run)
            words += [self.id_to_token(i) for i in run] if special else [self.sp.decode(run)]
        return " ".join(words)

    def token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def id_to_token(self, i):
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self.sp.id_to_piece(int(i))

    def save(self, out_dir):
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / self.MODEL_NAME
        if not (target.exists() and target.samefile(self.model_file)):
            with atomic_write(target) as tmp:
                shutil.copyfile(self.model_file, tmp)
        return out_dir


def _check_corpus_file(path, chunk_size=1 << 24):
    """Raise unless `path` is readable UTF-8; return whether it holds any non-blank text.

    sentencepiece would otherwise skip or mangle bad bytes without saying where they are. Reads
    in chunks cut at a newline, so a multi-byte character never straddles two chunks.
    """
    if not path.is_file():
        raise TokenizerError(f"corpus file not found: {path}")
    has_text, offset, line = False, 0, 1
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(chunk_size)
            data = tail + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            chunk, tail = data[:cut], data[cut:]
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                bad_line = line + chunk.count(b"\n", 0, e.start)
                raise TokenizerError(f"corpus file {path} is not UTF-8: byte 0x{chunk[e.start]:02x} at byte offset "
                                     f"{offset + e.start} (line {bad_line})") from None
            has_text = has_text or bool(chunk.strip())
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
            if not block:
                return has_text


def _non_empty_or_raise(sentences):
    """Pass an iterator of strings through, but fail early if it holds no non-blank text."""
    for s in sentences:
        if not isinstance(s, str):
            raise TokenizerError(f"corpus iterator must yield str, got {type(s).__name__}")
        if s.strip():
            yield s
            yield from sentences
            return
    raise TokenizerError("empty corpus: the sentence iterator yielded no non-blank text")


def _explain_training_error(e, vocab_size):
    msg = str(e)
    if m := re.search(r"Vocabulary size too high.*?<= (\d+)", msg):
        return TokenizerError(f"vocab_size={vocab_size} is larger than this corpus allows; "
                              f"use vocab_size <= {m.group(1)} or a bigger corpus")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return TokenizerError(f"vocab_size={vocab_size} is too small: the corpus needs {m.group(1)} ids for its "
                              f"characters and reserved tokens; raise vocab_size or lower character_coverage")
    return TokenizerError(f"sentencepiece training failed: {msg.splitlines()[-1] if msg else type(e).__name__}")


# ---------------------------------------------------------------------------------------------
# WordPiece
# ---------------------------------------------------------------------------------------------
# ASCII fast path of text cleaning: tab/newline/CR become spaces, other control chars vanish.
_ASCII_CLEAN = {c: (" " if chr(c) in "\t\n\r" else None) for c in [*range(32), 127]}


def _is_cjk(cp):
    """CJK Unified Ideographs (BERT's "Chinese characters"). Hangul and kana are not in here.
    The reference's tables start the last extension block at U+2B920, not U+2B820; we follow it."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


@functools.lru_cache(maxsize=None)
def _clean_char(c, split_cjk):
    """What one character becomes: dropped (control, NUL, U+FFFD), a space (any whitespace),
    spaced out (a CJK ideograph, so that it is a word of its own), or itself.

    "Control" is Cc/Cf/Co/Cs but not Cn (unassigned), as in the reference: a character newer
    than Python's Unicode tables (a recent emoji) reads as Cn here and must survive as [UNK]."""
    if c in "\t\n\r":
        return " "
    if c == "\x00" or c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs"):
        return ""
    if c.isspace():
        return " "
    if split_cjk and _is_cjk(ord(c)):
        return f" {c} "
    return c


@functools.lru_cache(maxsize=None)
def _is_punctuation(c):
    """BERT's punctuation: every ASCII non-alphanumeric printable, plus Unicode category P*."""
    return (c.isascii() and c.isprintable() and not c.isalnum() and c != " ") or unicodedata.category(c).startswith("P")


def _split_punctuation(word):
    """'don't!' -> ['don', "'", 't', '!']: each punctuation character is a word of its own."""
    words, start = [], 0
    for k, c in enumerate(word):
        if _is_punctuation(c):
            if start < k:
                words.append(word[start:k])
            words.append(c)
            start = k + 1
    if start < len(word):
        words.append(word[start:])
    return words


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer: clean + normalise text, split on whitespace and punctuation, then cut
    each word into the longest vocabulary pieces from the left (`##` marks a continuation)."""

    VOCAB_NAME, CONFIG_NAME = "vocab.txt", "tokenizer_config.json"
    max_input_chars_per_word = 100  # longer "words" (URLs, base64...) become a single [UNK]

    def __init__(self, vocab_file, lowercase=None, strip_accents=None, tokenize_chinese_chars=None):
        """lowercase / strip_accents / tokenize_chinese_chars left as None are read from a
        tokenizer_config.json beside vocab.txt (do_lower_case, ...), else lowercase=True,
        tokenize_chinese_chars=True, and strip_accents follows lowercase, as in original BERT."""
        self.vocab_file = pathlib.Path(vocab_file)
        if not self.vocab_file.is_file():
            raise TokenizerError(f"WordPiece vocab file not found: {self.vocab_file}")
        config_file = self.vocab_file.with_name(self.CONFIG_NAME)
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

        def setting(arg, key, default):  # the argument, else the config file, else the default
            return arg if arg is not None else config[key] if config.get(key) is not None else default

        self.lowercase = bool(setting(lowercase, "do_lower_case", True))
        self.strip_accents = bool(setting(strip_accents, "strip_accents", self.lowercase))
        self.tokenize_chinese_chars = bool(setting(tokenize_chinese_chars, "tokenize_chinese_chars", True))

        with open(self.vocab_file, encoding="utf-8") as f:
            self.id_to_tok = [line.rstrip("\r\n") for line in f]
        self.vocab = {}
        for i, tok in enumerate(self.id_to_tok):
            self.vocab.setdefault(tok, i)
        self.vocab_size = len(self.id_to_tok)
        self._set_special_ids(self.vocab.get, f"vocab file {self.vocab_file}")
        # Real text repeats the same words over and over: remember each word's ids (a plain
        # dict, bounded, so that the tokenizer still pickles into DataLoader workers).
        self._word_cache = {}

    # ---- text -> ids ----
    def normalize(self, text):
        """BERT's normaliser: clean, space out CJK, strip accents (NFD, drop marks), lowercase."""
        if text.isascii():
            text = text.translate(_ASCII_CLEAN)
            return text.lower() if self.lowercase else text
        text = "".join([_clean_char(c, self.tokenize_chinese_chars) for c in text])
        if self.strip_accents:
            text = "".join([c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn"])
        if self.lowercase:
            # Character by character like the reference: str.lower() would turn a word-final Σ into ς.
            text = "".join([c.lower() for c in text]) if "Σ" in text else text.lower()
        return text

    def _encode_segments(self, segments):
        out = []
        for text in segments:
            ids = []
            for word in self.normalize(text).split(" "):  # after cleaning, all whitespace is " "
                if word:
                    ids.extend(self._encode_word(word))
            out.append(ids)
        return out

    def _encode_word(self, word):
        """Ids of one whitespace-free chunk: split off punctuation, then WordPiece each part."""
        ids = self._word_cache.get(word)
        if ids is None:
            pieces = [word] if word.isalnum() else _split_punctuation(word)
            ids = [i for piece in pieces for i in self._wordpiece(piece)]
            if len(self._word_cache) < 1 << 18:
                self._word_cache[word] = ids
        return ids

    def _wordpiece(self, word):
        """Greedy longest-match-first; if any part of the word has no match, the whole word is [UNK]."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk_id]
            start = end
        return ids

    # ---- ids -> text ----
    def decode(self, ids, skip_special_tokens=True):
        tokens = [self.id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        return " ".join(tokens).replace(" ##", "")

    def token_to_id(self, token):
        return self.vocab.get(token, self.unk_id)

    def id_to_token(self, i):
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self.id_to_tok[i]

    def save(self, out_dir):
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / self.VOCAB_NAME, "".join(t + "\n" for t in self.id_to_tok))
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                  "strip_accents": self.strip_accents, "tokenize_chinese_chars": self.tokenize_chinese_chars}
        write_json(out_dir / self.CONFIG_NAME, config)
        return out_dir


def load_tokenizer(path) -> Tokenizer:
    """A folder holding tokenizer.model (SentencePiece) or vocab.txt (WordPiece), or either file."""
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / SentencePieceTokenizer.MODEL_NAME).is_file():
            return SentencePieceTokenizer(path / SentencePieceTokenizer.MODEL_NAME)
        if (path / WordPieceTokenizer.VOCAB_NAME).is_file():
            return WordPieceTokenizer(path / WordPieceTokenizer.VOCAB_NAME)
        raise TokenizerError(f"no tokenizer in {path}: expected {SentencePieceTokenizer.MODEL_NAME} or {WordPieceTokenizer.VOCAB_NAME}")
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        if path.suffix == ".txt":
            return WordPieceTokenizer(path)
        raise TokenizerError(f"cannot tell the tokenizer kind of {path}: expected a .model (SentencePiece) or vocab .txt (WordPiece) file")
    raise TokenizerError(f"tokenizer path not found: {path} (expected a folder with "
                         f"{SentencePieceTokenizer.MODEL_NAME} or {WordPieceTokenizer.VOCAB_NAME}, or one of those files)")
