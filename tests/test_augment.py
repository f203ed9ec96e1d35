"""augment.py: WordNet synonyms (same synset, same part of speech, never an antonym), EDA on words, and
back-translation through tiny random Marian models this file builds (plumbing and the cache)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from augment import EDA, STOP_WORDS, AugmentError, Paraphrase, TextAugmenter, WordNet, back_translate, build_augmenter
from tokenizer import WordPieceTokenizer


def write_wordnet(folder, synsets):
    """A WordNet database in the wndb(5) format: synsets = [(pos, [words], [(symbol, target synset number,
    source word, target word)], {word: tagged-sense count})]. Offsets are byte offsets, as in WordNet."""
    folder.mkdir()
    files = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    offsets, lines = {}, {p: [] for p in files}
    # two passes: first the offsets (every line has the same width per field), then the text
    for final in (False, True):
        at = {p: 0 for p in files}
        lines = {p: [] for p in files}
        for k, (pos, words, pointers, _) in enumerate(synsets):
            ptrs = " ".join(f"{s} {offsets.get(t, 0):08d} {synsets[t][0]} {a:02x}{b:02x}" for s, t, a, b in pointers)
            body = " ".join(f"{w} 0" for w in words)
            line = f"{at[pos]:08d} 00 {pos} {len(words):02x} {body} {len(pointers):03d} {ptrs} | a gloss\n"
            offsets[k] = at[pos]
            at[pos] += len(line.encode())
            lines[pos].append(line)
    index = {}
    for k, (pos, words, _, tagged) in enumerate(synsets):
        for w in words:
            entry = index.setdefault((w, pos), [0, []])
            entry[0] += tagged.get(w, 0)
            entry[1].append(offsets[k])
    for pos, name in files.items():
        (folder / f"data.{name}").write_text("".join(lines[pos]))
        rows = [f"{w} {p} {len(offs)} 0 {len(offs)} {tag} " + " ".join(f"{o:08d}" for o in offs)
                for (w, p), (tag, offs) in sorted(index.items()) if p == pos]
        (folder / f"index.{name}").write_text("  1 licence header line\n" + "".join(r + "\n" for r in rows))
    return folder


@pytest.fixture
def tiny_wordnet(tmp_path):
    return WordNet(str(write_wordnet(tmp_path / "wn", [
        ("a", ["good", "fine"], [("!", 1, 1, 1)], {"good": 5}),         # 0: good, antonym of bad (1)
        ("a", ["bad", "poor"], [("!", 0, 1, 1)], {"bad": 4}),
        ("a", ["good", "bad", "serious"], [], {}),                       # 2: a sense where "bad" shares a synset
        ("n", ["good", "commodity"], [], {"good": 1}),                   # 3: the noun, rarer than the adjective
        ("n", ["film", "movie"], [], {"film": 3}),
        ("v", ["film", "shoot"], [], {"film": 1}),
    ])))


def test_synonyms_share_a_synset_in_the_words_part_of_speech_and_are_never_antonyms(tiny_wordnet):
    wn = tiny_wordnet
    assert wn.pos_of("good") == "a" and wn.pos_of("film") == "n"        # the most often tagged
    assert wn.synonyms("good") == ["fine", "serious"]                   # "bad" shares a synset but is an antonym
    assert wn.synonyms("good", "n") == ["commodity"] and wn.synonyms("film") == ["movie"]
    assert wn.synonyms("film", "v") == ["shoot"] and wn.synonyms("Movie") == ["film"]
    assert wn.synonyms("unknownword") == []


def test_eda_edits_whole_words(tiny_wordnet):
    eda = EDA(tiny_wordnet, rate=0.25)
    text = "the good film was a good one"
    words = text.split()
    seen = {}
    for seed in range(40):
        for op in EDA.OPS:
            out = eda(text, np.random.default_rng(seed), op)
            assert out == eda(text, np.random.default_rng(seed), op)     # the generator decides everything
            seen.setdefault(op, set()).add(out)
            new = out.split()
            if op == "synonym":
                assert len(new) == len(words) and all(a == b or b in {"fine", "serious", "movie"} for a, b in zip(words, new))
                assert new != words
            elif op == "insert":
                assert len(new) == len(words) + 2 and set(new) - set(words) <= {"fine", "movie", "serious"}
            elif op == "swap":
                assert sorted(new) == sorted(words)
            else:
                assert 1 <= len(new) <= len(words) and all(w in words for w in new)
    assert all(len(v) > 3 for v in seen.values())
    assert "the" in STOP_WORDS and eda("the a", np.random.default_rng(0), "synonym") == "the a"   # nothing to replace


def test_real_wordnet_gives_synonyms_without_antonyms():
    try:
        wn = WordNet()
    except AugmentError as e:
        if os.environ.get("PLAINBERT_REQUIRE_DATA") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    good = wn.synonyms("good")
    assert "estimable" in good and not {"bad", "evil", "badness", "ill"} & set(good)
    assert wn.pos_of("film") == "n" and "movie" in wn.synonyms("film") and "shoot" in wn.synonyms("film", "v")
    assert "tedious" in wn.synonyms("boring") and "exciting" not in wn.synonyms("boring")


def test_text_augmenter_tokenizes_the_edited_text_of_example_i(tiny_wordnet, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "good",
                                                   "fine", "serious", "film", "movie"]) + "\n")
    tok = WordPieceTokenizer(str(tmp_path / "vocab.txt"))
    aug = TextAugmenter(EDA(tiny_wordnet, 0.5), tok, ["the good film", "the film"], ["good", "film"], max_length=16)
    ids, types = aug(0, np.random.default_rng(3))
    assert ids[0] == tok.cls_id and ids.count(tok.sep_id) == 2 and len(ids) == len(types)
    assert types[ids.index(tok.sep_id) + 1] == 1 and tok.unk_id not in ids
    assert {tok.decode(aug(0, np.random.default_rng(s))[0]) for s in range(20)} > {"the good film good"}


def tiny_marian(folder, seed):
    """A randomly initialised MarianMT folder (1 layer, 16 wide) with its own SentencePiece vocabulary; EOS is
    suppressed so that generation always says something (gibberish: this checks plumbing, not translation)."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer
    folder.mkdir()
    sents = ["the film was good", "a dull story", "le film était bon", "une histoire ennuyeuse"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=str(folder / "sp"), vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)
    for name in ("source.spm", "target.spm"):
        shutil.copy(folder / "sp.model", folder / name)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=2,
                                       eos_token_id=0, decoder_start_token_id=2))
    with torch.no_grad():
        model.final_logits_bias[0, 0] = -1e4
    tok.save_pretrained(str(folder))
    model.save_pretrained(str(folder))
    return str(folder)


def test_back_translation_runs_both_models_once_and_caches_to_disk(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    forward, back = tiny_marian(tmp_path / "en-xx", 0), tiny_marian(tmp_path / "xx-en", 1)
    cache, texts = str(tmp_path / "cache" / "bt.json"), ["the film was good", "a dull story", "the film was good"]
    first = back_translate(texts, forward, back, cache)
    assert len(first) == 3 and first[0] == first[2] and all(isinstance(p, str) and p for p in first)
    assert len(json.load(open(cache))) == 2                               # one entry per distinct text
    import augment

    def no_model(*a, **k):
        raise AssertionError("the cache should have answered")
    monkeypatch.setattr(augment, "_load_translator", no_model)
    assert back_translate(texts[:2], forward, back, cache) == first[:2]
    monkeypatch.undo()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film"]) + "\n")
    tok = WordPieceTokenizer(str(tmp_path / "vocab.txt"))
    aug = build_augmenter("backtranslate", tok, texts, None, 32, translator=forward, translator_back=back, cache=cache)
    assert isinstance(aug.edit, Paraphrase) and aug.edit.paraphrases["a dull story"] == first[1]
    with pytest.raises(AugmentError, match="--translator-back"):
        build_augmenter("backtranslate", tok, texts, None, 32, translator=forward, cache=cache)
    with pytest.raises(AugmentError, match="--translator .*not a folder"):
        build_augmenter("backtranslate", tok, texts, None, 32, translator=str(tmp_path / "nope"), translator_back=back,
                        cache=cache)
