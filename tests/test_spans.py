"""Token classification (NER) and extractive QA: CoNLL/SQuAD reading, entity F1 ≡ seqeval (conlleval's
rules), EM/F1 ≡ the official SQuAD v1.1 definitions, windows over long contexts, the best span, the heads ≡
Hugging Face's, and finetune -> folder -> predict/serve end to end on a tiny model."""
import collections
import json
import lzma
import random
import re
import string

import numpy as np
import pytest
import torch

import finetune
from conftest import require_data
from data.spans import (IGNORE, Question, answer_tokens, encode_words, qa_features, read_conll, read_squad,
                        to_iob2, tokenize_context, word_spans)
from finetuned import answer_spans, best_span, load_finetuned, tagged_entities
from metrics import entities, entity_scores, squad_exact_match, squad_f1, squad_normalize, squad_scores
from model import EncoderConfig, LanguageModel, SpanExtractor, TokenClassifier, from_hf_bert, save_hf_bert
from predict import Predictor
from tokenizer import WordPieceTokenizer

seqeval = pytest.importorskip("seqeval.metrics")


# -----------------------------------------------------------------------------------------------------
# CoNLL and entity F1


def raw_conll(path, n):
    """The first n sentences' (words, tags) exactly as the file has them (IOB1 for CoNLL-2003)."""
    out, words, tags = [], [], []
    for line in lzma.open(path, "rt"):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                out.append((words, tags))
                words, tags = [], []
            if len(out) == n:
                break
            continue
        words.append(parts[0])
        tags.append(parts[-1])
    return out


def test_iob1_is_read_as_iob2_with_the_same_entities():
    path = require_data("conll2003", "train.txt.xz")
    raw = raw_conll(path, 500)
    read = read_conll(path, max_sentences=500)
    assert [w for w, _ in read] == [w for w, _ in raw]
    assert any("B-" in t for _, ts in raw for t in ts)            # IOB1 has B- between adjacent entities
    for (_, iob1), (_, iob2) in zip(raw, read):
        assert entities(iob1) == entities(iob2)
        assert all(t == "O" or t.startswith("B-") or (i and iob2[i - 1][2:] == t[2:] and iob2[i - 1] != "O")
                   for i, t in enumerate(iob2))                  # every entity starts with B-
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]


def corrupt(tags, rng):
    """A plausible wrong prediction: some tags retyped, dropped to O, boundaries moved, I for B."""
    out = list(tags)
    for i in range(len(out)):
        r = rng.random()
        if r < 0.05:
            out[i] = "O"
        elif r < 0.10:
            out[i] = rng.choice(["B-", "I-"]) + rng.choice(["PER", "LOC", "ORG", "MISC"])
        elif r < 0.13 and out[i].startswith("B-"):
            out[i] = "I-" + out[i][2:]
    return out


def seqeval_scores(gold, pred):
    return {"precision": 100 * seqeval.precision_score(gold, pred), "recall": 100 * seqeval.recall_score(gold, pred),
            "f1": 100 * seqeval.f1_score(gold, pred)}


@pytest.mark.parametrize("scheme", ["iob1", "iob2"])
def test_entity_scores_equal_seqeval_on_real_conll_sentences(scheme):
    path = require_data("conll2003", "valid.txt.xz")
    sentences = raw_conll(path, 800) if scheme == "iob1" else read_conll(path, max_sentences=800)
    gold = [t for _, t in sentences]
    r = random.Random(0)
    pred = [corrupt(t, r) for t in gold]
    ours, ref = entity_scores(gold, pred), seqeval_scores(gold, pred)
    for k in ("precision", "recall", "f1"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 60 < ours["f1"] < 99                                    # the corruption really changed entities
    report = seqeval.classification_report(gold, pred, output_dict=True)
    for kind in ("PER", "LOC", "ORG", "MISC"):
        assert ours[f"f1_{kind}"] == pytest.approx(100 * report[kind]["f1-score"], abs=1e-9)
    assert ours["entities"] == sum(report[k]["support"] for k in ("PER", "LOC", "ORG", "MISC"))
    assert entity_scores(gold, gold)["f1"] == 100.0


EDGE_CASES = {
    # name: (gold, predicted)
    "iob1 gold, iob2 prediction of the same entities": (["I-PER", "I-PER", "O", "I-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
    "adjacent same-type entities (IOB1's B-)": (["I-PER", "B-PER", "O"], ["B-PER", "I-PER", "O"]),
    "entity at the sentence end": (["O", "O", "B-ORG", "I-ORG"], ["O", "O", "B-ORG", "I-ORG"]),
    "entity cut short at the sentence end": (["O", "B-ORG", "I-ORG"], ["O", "B-ORG", "O"]),
    "wrong type inside a span splits it": (["B-PER", "I-PER", "I-PER"], ["B-PER", "I-LOC", "I-PER"]),
    "I after O starts an entity": (["O", "B-MISC", "I-MISC"], ["O", "I-MISC", "I-MISC"]),
    "right span, wrong type": (["B-LOC", "I-LOC"], ["B-ORG", "I-ORG"]),
    "one-token entities side by side": (["B-LOC", "B-LOC", "B-PER"], ["B-LOC", "I-LOC", "B-PER"]),
    "nothing predicted": (["B-PER", "O"], ["O", "O"]),
    "nothing to find": (["O", "O"], ["B-PER", "O"]),
    "IOBES": (["S-PER", "B-LOC", "E-LOC", "O"], ["S-PER", "B-LOC", "I-LOC", "E-LOC"]),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_entity_scores_equal_seqeval_on_hand_made_edge_cases(name):
    gold, pred = EDGE_CASES[name]
    from seqeval.metrics.sequence_labeling import get_entities
    assert sorted(entities(gold)) == sorted((t, a, b) for t, a, b in get_entities(gold))
    assert sorted(entities(pred)) == sorted((t, a, b) for t, a, b in get_entities(pred))
    # two sentences, so a chunk must not run across the sentence boundary either
    ours, ref = entity_scores([gold, pred], [pred, gold]), seqeval_scores([gold, pred], [pred, gold])
    for k in ("precision", "recall", "f1"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9)


def test_entity_scores_by_hand():
    # gold: PER(0-1), LOC(3); predicted: PER(0-1) right, LOC(3-4) wrong end, ORG(6) spurious
    s = entity_scores([["B-PER", "I-PER", "O", "B-LOC", "O", "O", "O"]],
                      [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "B-ORG"]])
    assert (s["precision"], s["recall"]) == pytest.approx((100 / 3, 50.0))
    assert s["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5) * 100)
    assert (s["f1_PER"], s["f1_LOC"], s["f1_ORG"]) == (100.0, 0.0, 0.0)


# -----------------------------------------------------------------------------------------------------
# SQuAD EM and F1: the official evaluate-v1.1.py, as its definitions read, written here independently


def official_normalize(s):
    """evaluate-v1.1.py's normalize_answer: lower, remove_punc, remove_articles, white_space_fix."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(prediction, truth):
    p, t = official_normalize(prediction).split(), official_normalize(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def official_scores(predictions, golds):
    em = sum(max(float(official_normalize(p) == official_normalize(g)) for g in gs) for p, gs in zip(predictions, golds))
    f1 = sum(max(official_f1(p, g) for g in gs) for p, gs in zip(predictions, golds))
    return {"exact_match": 100 * em / len(golds), "f1": 100 * f1 / len(golds)}


SQUAD_CASES = [  # (prediction, gold answers)
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos"]),
    ("the Denver Broncos!", ["Denver Broncos"]),                # articles and punctuation do not count
    ("Broncos", ["Denver Broncos"]),                            # F1 2/3, EM 0
    ("in 1990 and 1990", ["1990"]),                             # a bag: repeated words count
    ("An apple a day", ["apple day"]),                          # "a"/"an" as words only
    ("Theatre", ["the theatre"]),                               # "the" inside a word stays
    ("  SANTA   Clara,  California ", ["Santa Clara, California", "Levi's Stadium"]),
    ("Levis Stadium", ["Levi's Stadium"]),                      # the apostrophe is punctuation: removed
    ("the", ["a"]),                                             # both normalise to nothing: EM 1, F1 0
    ("", ["something"]),
    ("naïve café", ["Naïve Café"]),                             # non-ASCII: lower-cased, not stripped
    ("1,000 km", ["1000 km"]),
]


def test_squad_em_and_f1_equal_the_official_definitions():
    for prediction, golds in SQUAD_CASES:
        for g in golds:
            assert squad_normalize(prediction) == official_normalize(prediction)
            assert squad_exact_match(prediction, g) == float(official_normalize(prediction) == official_normalize(g))
            assert squad_f1(prediction, g) == pytest.approx(official_f1(prediction, g))
    ours = squad_scores([p for p, _ in SQUAD_CASES], [g for _, g in SQUAD_CASES])
    assert ours == pytest.approx(official_scores([p for p, _ in SQUAD_CASES], [g for _, g in SQUAD_CASES]))
    assert squad_f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)
    assert squad_scores(["Broncos"], [["Denver Broncos", "Broncos"]]) == {"exact_match": 100.0, "f1": 100.0}


# -----------------------------------------------------------------------------------------------------
# words, windows and spans


WORDS = ("Peter Blackburn visited Berlin and Paris on Monday . Anna Schmidt works for Siemens in Munich . "
         "Who did where ? Where does live work the a river city company , ' s 1996 - 08 - 22 zulu alpha bravo "
         "question context Reuters EU German British lamb call to boycott rejects").split()


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A 2-layer, 32-wide BERT-layout folder with a WordPiece vocabulary holding the test's words."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.lower() for w in WORDS} | set(string.punctuation))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    model = LanguageModel(EncoderConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, max_position=128))
    save_hf_bert(model, folder, WordPieceTokenizer(folder / "vocab.txt"))
    return folder


@pytest.fixture(scope="module")
def tok(tiny_init):
    return WordPieceTokenizer(tiny_init / "vocab.txt")


def test_word_spans_give_character_offsets():
    text = "EU rejects German call, 1996-08-22 (U.S. lamb)."
    spans = word_spans(text)
    assert all(text[a:b] == w for w, a, b in spans)
    assert [w for w, _, _ in spans] == ["EU", "rejects", "German", "call", ",", "1996-08-22", "(", "U.S", ".", "lamb",
                                        ")", "."]


def test_the_first_sub_word_of_each_word_carries_its_label(tok):
    words = ["Blackburn", "visited", "Berlin"]
    ids, types, first = encode_words(tok, words, max_length=64)
    pieces = tok.encode_batch(words)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and types == [0] * len(ids)
    assert first == [1, 1 + len(pieces[0]), 1 + len(pieces[0]) + len(pieces[1])]
    _, _, cut = encode_words(tok, words, max_length=1 + len(pieces[0]) + 1)
    assert cut == [1, None, None]                                  # words past the limit have no token


def long_question(n_words=60, answer_at=40):
    words = [WORDS[i % 8] for i in range(n_words)]                 # "Peter Blackburn visited Berlin ..."
    words[answer_at:answer_at + 2] = ["zulu", "alpha"]
    context = " ".join(words)
    start = context.index("zulu alpha")
    return Question("q1", "Where does Anna live ?", context, ["zulu alpha"], [start])


def test_windows_overlap_by_the_stride_and_cover_the_context(tok):
    q = long_question()
    f = qa_features(tok, [q], max_length=32, doc_stride=8, max_query_length=64, train=True)
    ctx = f["contexts"][0]
    room = 32 - len(tok.encode(q.question)) - 3
    assert len(f["ids"]) > 3 and all(len(x) <= 32 for x in f["ids"])
    assert f["start"] == [8 * k for k in range(len(f["ids"]))]     # windows start every doc_stride tokens
    assert f["start"][-1] + room >= len(ctx.ids) > f["start"][-2] + room      # the last one reaches the end
    gold = answer_tokens(ctx, q.starts[0], q.answers[0])
    for ids, label, start, off in zip(f["ids"], f["labels"], f["start"], f["offset"]):
        assert ids[off:-1] == ctx.ids[start:start + room]
        if start <= gold[0] and gold[1] < start + room:            # the answer lies in this window
            assert (label[0] - off + start, label[1] - off + start) == gold
        else:
            assert label == (0, 0)                                 # [CLS]: not in this window
    assert sum(lab != (0, 0) for lab in f["labels"]) >= 2          # overlapping windows both hold it


def test_best_span_is_the_brute_force_maximum_within_the_max_length():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s, e = torch.randn(30, generator=g), torch.randn(30, generator=g)
        lo, hi, L = 5, 29, 4
        brute = max((float(s[i] + e[j]), i, j) for i in range(lo, hi) for j in range(i, min(hi, i + L)))
        score, i, j = best_span(s, e, lo, hi, L)
        assert (i, j) == brute[1:] and score == pytest.approx(brute[0])


class MarkerModel(torch.nn.Module):
    """A stand-in for a SpanExtractor: start logit 5 on the token `a`, end logit 5 on `b`; a window
    holding both gets the highest score, so answer_spans must find the span across windows."""

    def __init__(self, a, b, boost=None):
        super().__init__()
        self.a, self.b, self.boost, self.w = a, b, boost, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = (input_ids == self.a).float() * 5, (input_ids == self.b).float() * 5
        return torch.stack([start, end], -1)


def test_answer_spans_take_the_best_span_over_windows_as_characters(tok):
    q = long_question()
    info = {"max_length": 32, "doc_stride": 8, "max_query_length": 64, "max_answer_length": 5}
    zulu, alpha = tok.encode("zulu")[0], tok.encode("alpha")[0]
    [out] = answer_spans(MarkerModel(zulu, alpha), tok, [q], info)
    assert out["answer"] == "zulu alpha" == q.context[out["start"]:out["end"]]
    assert out["score"] == pytest.approx(10.0)
    info["max_answer_length"] = 1                                   # a two-token answer is now too long
    [out] = answer_spans(MarkerModel(zulu, alpha), tok, [q], info)
    assert out["score"] == pytest.approx(5.0) and out["answer"] in ("zulu", "alpha")
    [empty] = answer_spans(MarkerModel(zulu, alpha), tok, [Question("", "Who ?", "", [], [])], info)
    assert empty == {"answer": "", "start": 0, "end": 0, "score": None}      # no context: no span, JSON-safe


def test_squad_reader_reads_the_official_dev_file_by_article():
    path = require_data("squad", "dev-v1.1.json.xz")
    first, second = read_squad(path, slice(0, 24)), read_squad(path, slice(24, None))
    assert len(first) + len(second) == 10570
    assert {q.article for q in first} == set(range(24)) and {q.article for q in second} == set(range(24, 48))
    q = first[0]
    assert all(q.context[s:s + len(a)] == a for a, s in zip(q.answers, q.starts))


# -----------------------------------------------------------------------------------------------------
# the heads: the Hugging Face layout, read by transformers


@pytest.mark.parametrize("kind", ["token", "span"])
def test_heads_save_in_the_layout_transformers_reads_with_the_same_outputs(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = EncoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, max_position=64, dropout=0.0,
                        attention_dropout=0.0)
    torch.manual_seed(0)
    ours = TokenClassifier(cfg, 5) if kind == "token" else SpanExtractor(cfg)
    save_hf_bert(ours, tmp_path)
    cls = transformers.BertForTokenClassification if kind == "token" else transformers.BertForQuestionAnswering
    theirs = cls.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 50, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        mine = ours.eval()(ids, mask)
        out = theirs(input_ids=ids, attention_mask=mask)
        ref = out.logits if kind == "token" else torch.stack([out.start_logits, out.end_logits], -1)
    real = mask.bool()
    torch.testing.assert_close(mine[real], ref[real], atol=1e-5, rtol=1e-5)
    back = from_hf_bert(str(tmp_path), head=kind, num_labels=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), mine)


# -----------------------------------------------------------------------------------------------------
# finetune -> folder -> predict / serve


NAMES, CITIES = [("Peter", "Blackburn"), ("Anna", "Schmidt")], ["Berlin", "Paris", "Munich"]


def write_conll(path, n, seed):
    """IOB1, as CoNLL-2003 ships: "Peter Blackburn visited Berlin on Monday ." and the like."""
    r = np.random.default_rng(seed)
    lines = ["-DOCSTART- -X- O O", ""]
    for _ in range(n):
        first, last = NAMES[r.integers(2)]
        city = CITIES[r.integers(3)]
        for w, t in ((first, "I-PER"), (last, "I-PER"), ("visited", "O"), (city, "I-LOC"), ("on", "O"),
                     ("Monday", "O"), (".", "O")):
            lines.append(f"{w} NNP I-NP {t}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_squad(path, n, seed):
    r = np.random.default_rng(seed)
    paragraphs = []
    for k in range(n):
        first, last = NAMES[r.integers(2)]
        city = CITIES[r.integers(3)]
        context = f"{first} {last} visited {city} on Monday . " * 3 + f"{first} works for Siemens in {city} ."
        paragraphs.append({"context": context, "qas": [{"id": f"q{k}", "question": f"Where does {first} work ?",
                                                       "answers": [{"text": city, "answer_start": context.rindex(city)}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


FAST = ["--no-progress", "--log-every", "1", "--save-every", "0", "--batch-size", "8", "--max-steps", "6", "--lr", "3e-3"]


def test_token_task_trains_saves_and_predicts_entities_with_character_offsets(tiny_init, tmp_path):
    train, dev = write_conll(tmp_path / "train.txt", 40, 0), write_conll(tmp_path / "dev.txt", 12, 1)
    out = finetune.run(["--task", "token", "--init", str(tiny_init), "--train", str(train), "--dev", str(dev),
                        "--out", str(tmp_path / "ner"), *FAST, "--max-steps", "40"])
    info = json.loads((tmp_path / "ner" / "labels.json").read_text())
    assert info["labels"] == ["O", "B-LOC", "B-PER", "I-PER"] == out["info"]["labels"]    # IOB1 read as IOB2
    # metrics.json is conlleval's F1 of predictions.txt (word gold predicted), as seqeval computes it
    rows = [line.split() for line in (tmp_path / "ner" / "predictions.txt").read_text().split("\n\n") if line.strip()]
    sents = [[line.split() for line in block.strip().splitlines()] for block in
             (tmp_path / "ner" / "predictions.txt").read_text().strip().split("\n\n")]
    assert len(sents) == 12 and rows
    gold, pred = [[r[1] for r in s] for s in sents], [[r[2] for r in s] for s in sents]
    metrics = json.loads((tmp_path / "ner" / "metrics.json").read_text())
    assert metrics["dev"]["f1"] == pytest.approx(100 * seqeval.f1_score(gold, pred), abs=1e-9)
    # the saved folder predicts what the trained model predicts; entities carry their characters
    model, tokenizer, loaded_info = load_finetuned(tmp_path / "ner")
    texts = ["Anna Schmidt visited Munich on Monday.", "Peter Blackburn visited Paris."]
    trained = out["model"].eval()
    assert Predictor([str(tmp_path / "ner")]).describe(Predictor([str(tmp_path / "ner")])(texts)) == \
        [{"entities": e} for e in tagged_entities(trained, out["tokenizer"], texts, loaded_info)]
    found = tagged_entities(model, tokenizer, texts, loaded_info)
    assert sum(map(len, found)) >= 2                              # 40 steps find the names and the cities
    for text, found in zip(texts, found):
        for e in found:
            assert text[e["start"]:e["end"]] == e["text"] and e["type"] in ("PER", "LOC") and 0 < e["score"] <= 1


def test_qa_task_trains_on_windows_saves_and_answers_with_spans(tiny_init, tmp_path, capsys):
    train = write_squad(tmp_path / "train.json", 24, 0)
    out = finetune.run(["--task", "qa", "--init", str(tiny_init), "--train", str(train), "--dev", str(train),
                        "--train-articles", "0:1", "--dev-articles", "0:", "--max-eval-examples", "10",
                        "--max-length", "32", "--doc-stride", "8", "--max-answer-length", "3",
                        "--out", str(tmp_path / "qa"), *FAST])
    assert out["metrics"]["train_features"] > 24                    # long contexts: several windows each
    preds = json.loads((tmp_path / "qa" / "predictions.json").read_text())
    golds = [q.answers for q in read_squad(train)][:10]
    assert list(preds) == [f"q{k}" for k in range(10)]
    metrics = json.loads((tmp_path / "qa" / "metrics.json").read_text())
    assert metrics["dev"] == pytest.approx(official_scores(list(preds.values()), golds))
    # the folder answers (question, context) pairs from the command line as the trained model does
    questions = [Question("", "Where does Anna work ?", "Anna Schmidt visited Paris on Monday . Anna works for Siemens in Berlin .", [], [])]
    expected = answer_spans(out["model"].eval(), out["tokenizer"], questions, out["info"])
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"question": questions[0].question, "context": questions[0].context}) + "\n")
    import predict
    capsys.readouterr()                                             # the training log so far
    predict.main([str(tmp_path / "qa"), "--input", str(src), "--format", "jsonl", "--no-progress"])
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["answer"] == expected[0]["answer"] == questions[0].context[row["start"]:row["end"]]
    assert row["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    assert len(row["answer"].split()) <= 3


@pytest.mark.parametrize("case, expected", [
    ("bad_tag", "train.txt:3: expected `word ... TAG`"),
    ("not_json", "not JSON"),
    ("articles", "--train-articles: expected START:END"),
    ("rdrop", "--rdrop: works on one label per example"),
])
def test_bad_input_gives_one_clear_error(tiny_init, tmp_path, capsys, case, expected):
    conll = tmp_path / "train.txt"
    conll.write_text("-DOCSTART- -X- O O\n\nPeter NNP I-NP PERSON\n")
    squad = tmp_path / "train.json"
    squad.write_text("{not json")
    args = {"bad_tag": ["--task", "token", "--train", str(conll)],
            "not_json": ["--task", "qa", "--train", str(squad)],
            "articles": ["--task", "qa", "--train", str(write_squad(tmp_path / "ok.json", 2, 0)), "--train-articles", "1-2"],
            "rdrop": ["--task", "token", "--train", str(conll), "--rdrop", "1"]}[case]
    assert finetune.main(["--init", str(tiny_init), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
