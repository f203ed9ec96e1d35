"""Data augmentation on words: EDA with WordNet synonyms, and back-translation through MarianMT-style models.

    python finetune.py ... --augment eda                       # one EDA edit per drawn example, 10 % of its words
    python finetune.py ... --augment backtranslate --translator DIR_EN_XX --translator-back DIR_XX_EN

EDA (Wei & Zou 2019) edits words, never sub-word pieces: synonym replacement, random insertion (a synonym of
a word of the sentence, at a random place), random swap, random deletion. Synonyms come from WordNet 3.0, read
here from its own database files (`WordNet`), which Debian ships as the package wordnet-base in
/usr/share/wordnet (--wordnet DIR or $WORDNET_DIR elsewhere); nothing is downloaded at run time. A synonym is
a lemma sharing a synset with the word, in the word's part of speech, and never one of the word's antonyms
(the embedding-neighbour thesaurus this replaces turned "good" into "bad"). Without a tagger that ships
offline, the part of speech is the one WordNet tags most often for the word (its SemCor sense counts).

Back-translation (Sennrich et al. 2016) paraphrases each training text by translating it to another language
and back with any two translation folders transformers can load (AutoModelForSeq2SeqLM, e.g. the
Helsinki-NLP opus-mt-en-XX / opus-mt-XX-en models); the paraphrases are computed once, before training, and
cached in a JSON file keyed by text and models, so a second run translates nothing.

Both plug into data/tasks.py's TaskDataset as its `augmenter(i, rng) -> (ids, types)`: example i, edited with
the batch's own generator, so a micro-batch is still a pure function of (step, index) and resume stays exact.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from atomic import atomic_write

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# EDA's stop words (from the authors' code): never replaced, never the source of an insertion
STOP_WORDS = frozenset("""i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until while of
at by for with about against between into through during before after above below to from up down in out on off
over under again further then once here there when where why how all any both each few more most other some such
no nor not only own same so than too very s t can will just don should now""".split())


class AugmentError(ValueError):
    """A missing WordNet, a bad translation folder: the message names the flag or path."""


# -----------------------------------------------------------------------------------------------------
# WordNet, read from its database files


def find_wordnet(path: str | None = None) -> str:
    """The WordNet dict folder: `path`, else $WORDNET_DIR, else where Debian's wordnet-base puts it."""
    for d in ([path] if path else [os.environ["WORDNET_DIR"]] if os.environ.get("WORDNET_DIR") else WORDNET_DIRS):
        if os.path.isfile(os.path.join(d, "index.noun")):
            return d
    raise AugmentError(f"--wordnet {path or os.environ.get('WORDNET_DIR') or WORDNET_DIRS[0]}: no WordNet database "
                       "(index.noun, data.noun, ...) there; install it with `apt-get install wordnet-base` or "
                       "give --wordnet DIR (a WordNet 3.0 dict folder)")


class WordNet:
    """Synonyms from WordNet's database files (wndb(5)). index.POS maps a lemma to its synsets' byte
    offsets in data.POS, most frequent sense first; a data line lists the synset's words and its pointers
    ('!' = antonym, between particular words of two synsets)."""

    def __init__(self, path: str | None = None):
        self.dir = find_wordnet(path)
        self.index: dict[str, dict[str, tuple[int, list[int]]]] = {}   # lemma -> {pos: (tagged senses, offsets)}
        for pos, name in POS_FILES.items():
            with open(os.path.join(self.dir, f"index.{name}"), encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):                               # the licence header
                        continue
                    field = line.split()
                    n_synsets, n_ptrs = int(field[2]), int(field[3])
                    tagged = int(field[5 + n_ptrs])
                    offsets = [int(o) for o in field[6 + n_ptrs:6 + n_ptrs + n_synsets]]
                    self.index.setdefault(field[0], {})[pos] = (tagged, offsets)
        self.data = {pos: open(os.path.join(self.dir, f"data.{name}"), "rb") for pos, name in POS_FILES.items()}
        self._cache: dict[tuple[str, str | None], list[str]] = {}

    def synset(self, pos: str, offset: int) -> tuple[list[str], list[tuple[str, str, int, int, int]]]:
        """(words, pointers (symbol, pos, offset, source word, target word)) of one synset; the words
        lower-case, '_' -> ' ', adjective markers like '(a)' dropped."""
        f = self.data[pos]
        f.seek(offset)
        field = f.readline().decode("utf-8").split(" | ")[0].split()
        n_words = int(field[3], 16)
        words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ").lower() for w in field[4:4 + 2 * n_words:2]]
        at = 4 + 2 * n_words
        pointers = []
        for k in range(int(field[at])):
            sym, off, p, st = field[at + 1 + 4 * k:at + 5 + 4 * k]
            pointers.append((sym, "a" if p == "s" else p, int(off), int(st[:2], 16), int(st[2:], 16)))
        return words, pointers

    def pos_of(self, word: str) -> str | None:
        """The part of speech WordNet tags most often for `word` (then: the one with most senses)."""
        entry = self.index.get(word)
        return max(entry, key=lambda p: (entry[p][0], len(entry[p][1]))) if entry else None

    def synonyms(self, word: str, pos: str | None = None) -> list[str]:
        """Lemmas sharing a synset with `word` in part of speech `pos` (default pos_of(word)), without the
        word itself and without any antonym of the word in any of its senses; in WordNet's sense order."""
        word = word.lower()
        key = (word, pos)
        if key not in self._cache:
            pos = pos or self.pos_of(word)
            entry = self.index.get(word.replace(" ", "_"), {})
            found, antonyms = [], set()
            for p in ([pos] if pos else []):
                for offset in entry.get(p, (0, []))[1]:
                    words, pointers = self.synset(p, offset)
                    found += words
                    me = words.index(word) + 1 if word in words else 0      # the word's number in the synset
                    for sym, tp, toff, src, dst in pointers:
                        if sym == "!" and src in (0, me):
                            target = self.synset(tp, toff)[0]
                            antonyms.update(target if dst == 0 else [target[dst - 1]])
            self._cache[key] = list(dict.fromkeys(w for w in found if w != word and w not in antonyms))
        return self._cache[key]


# -----------------------------------------------------------------------------------------------------
# EDA on words


class EDA:
    """One random EDA operation on a text's words, changing about `rate` of them (at least one)."""

    OPS = ("synonym", "insert", "swap", "delete")

    def __init__(self, wordnet: WordNet, rate: float = 0.1):
        self.wordnet, self.rate = wordnet, rate

    def replaceable(self, words):
        return [i for i, w in enumerate(words) if w.lower() not in STOP_WORDS and self.wordnet.synonyms(w)]

    def __call__(self, text: str, rng: np.random.Generator, op: str | None = None) -> str:
        words = text.split()
        if not words:
            return text
        op = op or self.OPS[rng.integers(len(self.OPS))]
        n = max(1, round(self.rate * len(words)))
        if op == "synonym":
            candidates = self.replaceable(words)
            for i in rng.permutation(candidates)[:n]:
                options = self.wordnet.synonyms(words[i])
                words[i] = options[rng.integers(len(options))]
        elif op == "insert":
            sources = [words[i] for i in self.replaceable(words)]     # before any insertion shifts them
            for _ in range(n if sources else 0):
                options = self.wordnet.synonyms(sources[rng.integers(len(sources))])
                words.insert(int(rng.integers(len(words) + 1)), options[rng.integers(len(options))])
        elif op == "swap" and len(words) > 1:
            for _ in range(n):
                i, j = rng.choice(len(words), 2, replace=False)
                words[i], words[j] = words[j], words[i]
        elif op == "delete" and len(words) > 1:
            keep = rng.random(len(words)) >= self.rate
            words = [w for w, k in zip(words, keep) if k] or [words[rng.integers(len(words))]]
        return " ".join(words)


# -----------------------------------------------------------------------------------------------------
# back-translation


def _load_translator(path: str, flag: str):
    try:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        return AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    except (OSError, ValueError) as e:
        raise AugmentError(f"{flag} {path}: not a translation model folder transformers can load "
                           f"(e.g. a MarianMT opus-mt folder: config.json, weights, source.spm, target.spm, "
                           f"vocab.json): {str(e).splitlines()[0]}") from None


def translate(tokenizer, model, texts: list[str], batch_size: int = 16, num_beams: int = 1) -> list[str]:
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
            longest = getattr(model.config, "max_position_embeddings", 512) - 2    # the decoder's positions
            gen = model.generate(**enc, num_beams=num_beams, do_sample=False,
                                 max_new_tokens=min(2 * enc["input_ids"].shape[1] + 8, longest))
            out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    return out


def back_translate(texts: list[str], forward: str, back: str, cache: str, batch_size: int = 16) -> list[str]:
    """The paraphrase back(forward(text)) of each text; computed for texts not yet in `cache` (a JSON file
    {key: paraphrase}, key = sha256 of the two folders' names and the text), which is then rewritten."""
    def key(t):
        return hashlib.sha256(json.dumps([os.path.abspath(forward), os.path.abspath(back), t]).encode()).hexdigest()
    known = {}
    if os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                known = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise AugmentError(f"--translation-cache {cache}: unreadable ({e}); delete it to start afresh") from None
    todo = list(dict.fromkeys(t for t in texts if key(t) not in known))
    if todo:
        (tok_f, model_f), (tok_b, model_b) = _load_translator(forward, "--translator"), _load_translator(back, "--translator-back")
        middle = translate(tok_f, model_f, todo, batch_size)
        known.update({key(t): p for t, p in zip(todo, translate(tok_b, model_b, middle, batch_size))})
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        with atomic_write(cache) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f, ensure_ascii=False)
    return [known[key(t)] for t in texts]


# -----------------------------------------------------------------------------------------------------
# the TaskDataset hook


class TextAugmenter:
    """augmenter(i, rng) -> (ids, types) of training example i after a text edit, tokenized as finetune.py
    tokenizes. edit(text, rng) -> text is EDA, or the cached paraphrase (taken with probability `p`).
    Pair tasks edit both texts, each on its own."""

    def __init__(self, edit, tokenizer, texts, pairs, max_length: int):
        self.edit, self.tokenizer, self.texts, self.pairs, self.max_length = edit, tokenizer, texts, pairs, max_length

    def __call__(self, i: int, rng: np.random.Generator):
        text = self.edit(self.texts[i], rng)
        pair = None if self.pairs is None else [self.edit(self.pairs[i], rng)]
        enc = self.tokenizer([text], pair, max_length=self.max_length, padding=False, return_tensors=None)
        return enc["input_ids"][0], enc["token_type_ids"][0]


class Paraphrase:
    """edit(text, rng): the text's back-translation with probability p, else the text itself."""

    def __init__(self, paraphrases: dict[str, str], p: float = 0.5):
        self.paraphrases, self.p = paraphrases, p

    def __call__(self, text: str, rng: np.random.Generator) -> str:
        return (self.paraphrases.get(text) or text) if rng.random() < self.p else text     # "" = no paraphrase


def build_augmenter(kind: str, tokenizer, texts, pairs, max_length: int, rate: float = 0.1, wordnet: str | None = None,
                    translator: str | None = None, translator_back: str | None = None, cache: str | None = None):
    """finetune.py's --augment: None, or the TaskDataset hook for "eda" / "backtranslate"."""
    if kind == "none":
        return None
    if kind == "eda":
        return TextAugmenter(EDA(WordNet(wordnet), rate), tokenizer, texts, pairs, max_length)
    if not (translator and translator_back):
        raise AugmentError("--augment backtranslate: needs --translator DIR_EN_XX and --translator-back DIR_XX_EN")
    for flag, d in (("--translator", translator), ("--translator-back", translator_back)):
        if not os.path.isdir(d):
            raise AugmentError(f"{flag} {d}: not a folder (a MarianMT-style translation model folder)")
    everything = list(texts) + list(pairs or [])
    paraphrases = dict(zip(everything, back_translate(everything, translator, translator_back, cache)))
    return TextAugmenter(Paraphrase(paraphrases), tokenizer, texts, pairs, max_length)
