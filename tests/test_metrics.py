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
