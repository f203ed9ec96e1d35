"""metrics.py: each metric against a value worked out by hand, and against scipy where it is installed."""
import math

import numpy as np
import pytest

import metrics as M

# A 10-example binary problem worked out by hand:
#   true  1 1 1 1 0 0 0 0 0 1
#   pred  1 1 0 1 0 1 0 0 0 0
# TP = 3 (0, 1, 3), FN = 2 (2, 9), FP = 1 (5), TN = 4 (4, 6, 7, 8)
TRUE = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
PRED = [1, 1, 0, 1, 0, 1, 0, 0, 0, 0]


def test_accuracy_counts_agreements():
    assert M.accuracy(TRUE, PRED) == pytest.approx(7 / 10)


def test_confusion_matrix_rows_are_true_columns_are_predicted():
    assert M.confusion_matrix(TRUE, PRED).tolist() == [[4, 1], [2, 3]]
    assert M.confusion_matrix([0, 2], [2, 2], num_classes=3).tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 1]]


def test_binary_precision_recall_f1_by_hand():
    p, r, f1 = M.precision_recall_f1(TRUE, PRED)
    assert (p, r) == (pytest.approx(3 / 4), pytest.approx(3 / 5))
    assert f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))           # = 2/3


def test_macro_f1_averages_the_classes_equally():
    # class 0: P = 4/6, R = 4/5 -> F1 = 8/11; class 1: F1 = 2/3
    assert M.precision_recall_f1(TRUE, PRED, "macro")[2] == pytest.approx((8 / 11 + 2 / 3) / 2)


def test_precision_of_no_predicted_positives_is_zero():
    assert M.precision_recall_f1([1, 0, 1], [0, 0, 0]) == (0.0, 0.0, 0.0)


def test_mcc_binary_by_hand():
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(4 * 5 * 5 * 6)
    assert M.mcc(TRUE, PRED) == pytest.approx(10 / math.sqrt(600))


def test_mcc_is_one_for_perfect_minus_one_for_inverted_zero_for_constant():
    assert M.mcc([0, 1, 2, 1], [0, 1, 2, 1]) == pytest.approx(1.0)
    assert M.mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert M.mcc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_mcc_multiclass_by_hand():
    # true 0 0 1 1 2 2, pred 0 1 1 1 2 0: s = 6, c = 4, t = (2, 2, 2), p = (2, 3, 1)
    # (c s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert M.mcc([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]) == pytest.approx(12 / math.sqrt(22 * 24))


def test_rankdata_gives_ties_their_mean_rank():
    assert M.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_roc_auc_counts_tied_pairs_as_half():
    # positives score 0.9, 0.5; negatives 0.5, 0.1. Pairs: (0.9 > 0.5), (0.9 > 0.1), (0.5 = 0.5: 1/2), (0.5 > 0.1)
    assert M.roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(3.5 / 4)
    assert M.roc_auc([1, 0], [0.2, 0.8]) == 0.0


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1], [0.1, 0.2])


def test_pearson_and_spearman_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = 1, 2, 3, 4; y = 1, 3, 2, 4: d = (0, 1, 1, 0), rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 12/60
    assert M.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert M.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)   # any monotone map


def test_correlation_of_a_constant_is_zero_not_nan():
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert M.spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_correlations_and_auc_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    y[:50] = x[:50]                                   # some correlation, and many ties in x
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert M.rankdata(x).tolist() == stats.rankdata(x).tolist()
    labels = rng.integers(0, 2, 200)
    u = stats.mannwhitneyu(x[labels == 1], x[labels == 0]).statistic   # U of the positives
    assert M.roc_auc(labels, x) == pytest.approx(u / ((labels == 1).sum() * (labels == 0).sum()))


def test_perplexity_is_exp_of_mean_nll():
    assert M.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_classification_metrics_from_probabilities():
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    out = M.classification_metrics([1, 1, 0, 0], probs)
    assert out["accuracy"] == 0.5 and out["f1"] == pytest.approx(0.5)
    assert out["auc"] == pytest.approx(0.75)          # 0.8 beats both negatives, 0.4 beats 0.1 only
    three = M.classification_metrics([0, 1, 2], np.eye(3))
    assert three["accuracy"] == 1.0 and three["macro_f1"] == 1.0 and "auc" not in three


def test_format_table_lines_up_splits_as_columns():
    table = M.format_table({"dev": {"accuracy": 0.5, "mcc": 0.25}, "test": {"accuracy": 0.75}}, title="run")
    lines = table.splitlines()
    assert lines[0] == "run"
    assert lines[1].split() == ["metric", "dev", "test"]
    assert lines[3].split() == ["accuracy", "0.5000", "0.7500"]
    assert lines[4].split() == ["mcc", "0.2500", "-"]
    assert M.format_table({"steps": 1200}).splitlines()[2].split() == ["steps", "1,200"]


# -----------------------------------------------------------------------------------------------------
# BLEU and ROUGE: hand examples, then sacrebleu and rouge-score on real sentences (SST-2 dev, 872)


def sst2_pairs():
    """(hypotheses, references, second references): SST-2 dev sentences as references, each hypothesis a
    seeded perturbation of one (words dropped, swapped, replaced from other sentences, truncated, re-cased,
    some emptied), and a second reference set perturbed the same way."""
    from conftest import require_data
    lines = require_data("sst2", "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    refs = [line.split("\t")[0].strip() for line in lines if line.strip()]
    rng = np.random.default_rng(0)
    vocab = sorted({w for r in refs for w in r.split()})

    def perturb(sentence):
        words = sentence.split()
        kind = rng.integers(8)
        if kind == 0:
            return ""                                                    # an empty hypothesis
        if kind == 1:
            return " ".join(words[:rng.integers(0, 4)])                  # very short: higher orders may be empty
        out = []
        for w in words:
            r = rng.random()
            if r < 0.1:
                continue                                                 # dropped
            out.append(vocab[rng.integers(len(vocab))] if r < 0.2 else w.capitalize() if r < 0.25 else w)
        if len(out) > 2 and rng.random() < 0.5:
            i = rng.integers(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]                      # swapped neighbours
        if kind == 2:
            out = out + out[: len(out) // 2]                             # repeated words: clipping matters
        return " ".join(out) + ("-\nand more" if kind == 3 else "")
    return [perturb(r) for r in refs], refs, [perturb(r) for r in refs]


def test_bleu_clips_counts_and_penalises_brevity_by_hand():
    # hyp "the the the cat" vs ref "the cat sat on the mat": unigrams matched min(3, 2) + 1 = 3 of 4,
    # bigrams "the cat" 1 of 3, trigrams 0 of 2, 4-grams 0 of 1; c = 4 < r = 6 so BP = exp(1 - 6/4)
    out = M.corpus_bleu(["the the the cat"], [["the cat sat on the mat"]], smooth="floor", smooth_value=0.1)
    assert out["precisions"] == pytest.approx([75.0, 100 / 3, 5.0, 10.0])
    assert out["bp"] == pytest.approx(math.exp(1 - 6 / 4))
    assert out["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4) * (0.75 * (1 / 3) * 0.05 * 0.1) ** 0.25)
    assert M.corpus_bleu(["the the the cat"], [["the cat sat on the mat"]], smooth="none")["bleu"] == 0.0


@pytest.mark.parametrize("tokenize", ["13a", "none"])
@pytest.mark.parametrize("smooth", ["none", "floor", "add-k", "exp"])
def test_corpus_bleu_equals_sacrebleu(smooth, tokenize):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs, refs2 = sst2_pairs()
    assert sum(h == "" for h in hyps) > 50                               # empty hypotheses are in the set
    for ref_sets in ([refs], [refs, refs2]):
        for subset in (slice(None), slice(0, 40), slice(100, 103)):
            h, rs = hyps[subset], [r[subset] for r in ref_sets]
            theirs = sacrebleu.corpus_bleu(h, rs, smooth_method=smooth, tokenize=tokenize)
            ours = M.corpus_bleu(h, rs, smooth=smooth, tokenize=tokenize)
            assert ours["bleu"] == pytest.approx(theirs.score, abs=1e-6)
            assert ours["precisions"] == pytest.approx(theirs.precisions, abs=1e-6)
            assert (ours["hyp_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)
    assert M.corpus_bleu(hyps, [refs], smooth=smooth)["bleu"] > 10       # a real, non-degenerate score


def test_bleu_of_only_empty_hypotheses_is_zero_as_in_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    _, refs, _ = sst2_pairs()
    for smooth in M.BLEU_SMOOTHING:
        assert M.corpus_bleu([""] * 5, [refs[:5]], smooth=smooth)["bleu"] == \
            sacrebleu.corpus_bleu([""] * 5, [refs[:5]], smooth_method=smooth).score == 0.0


def test_tokenize_13a_equals_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    hyps, refs, _ = sst2_pairs()
    extra = ["Hello, world! It costs $3.50 - or 1,000 &amp; more.", "a-b 3-4 x.y (z) [w] {q}", "<skipped>end-\nline"]
    for text in refs + hyps + extra:
        assert M.tokenize_13a(text) == Tokenizer13a()(text).split()


def test_rouge_by_hand():
    h, r = "a b c d".split(), "a c b d e".split()
    assert M.lcs_length(h, r) == 3                                       # a c d (or a b d)
    assert M.rouge_l(h, r) == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert M.rouge_n(h, r, 1) == pytest.approx(2 * 1 * (4 / 5) / (1 + 4 / 5))
    assert M.rouge_n(h, r, 2) == 0.0                                      # no bigram in common
    assert M.rouge_l([], r) == M.rouge_n([], r, 1) == 0.0


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_equals_rouge_score(stem):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    hyps, refs, _ = sst2_pairs()
    refs = refs[:-3] + ["", "...", "Running runs ran"]                  # empty references too
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    theirs = [scorer.score(r, h) for h, r in zip(hyps, refs)]
    ours = M.rouge(hyps, refs, stem=stem)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert ours[name] == pytest.approx(np.mean([s[name].fmeasure for s in theirs]), abs=1e-6)
        assert 0.3 < ours[name] < 0.95                                   # a real, non-degenerate score
    for h, r, s in list(zip(hyps, refs, theirs))[:200]:                  # and pair by pair
        assert M.rouge([h], [r], stem=stem)["rougeL"] == pytest.approx(s["rougeL"].fmeasure, abs=1e-9)
    assert M.rouge(["running dogs"], ["runs dog"], stem=True)["rouge1"] == 1.0    # stems match
    assert M.rouge(["running dogs"], ["runs dog"])["rouge1"] == 0.0               # words do not
