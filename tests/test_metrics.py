"""erc.metrics against values computed by hand."""

import math

import numpy as np
import pytest

from erc.metrics import classification_metrics, confusion, sentiment_score_metrics, split_metrics

LABELS = ["a", "b", "c"]
# true:  a a a b b c
# pred:  a a b b c c
# confusion rows (true) x cols (pred): a [2 1 0], b [0 1 1], c [0 0 1]
# F1: a = 2*2/(2+3) = 0.8; b = 2*1/(2+2) = 0.5; c = 2*1/(2+1) = 2/3
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_confusion_rows_are_true_columns_predicted():
    cm = confusion(np.array(Y_TRUE), np.array(Y_PRED), 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_classification_metrics_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS)
    assert m["acc"] == pytest.approx(100 * 4 / 6)
    assert m["wf1"] == pytest.approx(100 * (0.8 * 3 + 0.5 * 2 + (2 / 3) * 1) / 6)  # 67.78
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)  # 65.56
    assert m["f1_a"] == pytest.approx(80.0)
    assert m["f1_b"] == pytest.approx(50.0)
    assert m["f1_c"] == pytest.approx(200 / 3)
    assert set(m) == {"wf1", "acc", "macro_f1", "f1_a", "f1_b", "f1_c"}


def test_classification_metrics_prefix():
    m = classification_metrics(Y_TRUE, Y_PRED, LABELS, prefix="val_")
    assert set(m) == {"val_wf1", "val_acc", "val_macro_f1", "val_f1_a", "val_f1_b", "val_f1_c"}
    assert m["val_acc"] == pytest.approx(100 * 4 / 6)


def test_perfect_predictions():
    m = classification_metrics(Y_TRUE, Y_TRUE, LABELS)
    assert m["wf1"] == pytest.approx(100.0)
    assert m["macro_f1"] == pytest.approx(100.0)
    assert m["acc"] == pytest.approx(100.0)


def test_class_never_predicted_scores_zero():
    # true: a b c c ; pred: a b b b -> c is never predicted
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], LABELS)
    assert m["f1_c"] == 0.0
    assert m["f1_a"] == pytest.approx(100.0)
    assert m["f1_b"] == pytest.approx(100 * 2 * 1 / (3 + 1))  # tp 1, predicted 3, actual 1
    assert m["acc"] == pytest.approx(50.0)
    assert m["wf1"] == pytest.approx(100 * (1.0 * 1 + 0.5 * 1 + 0.0 * 2) / 4)
    assert m["macro_f1"] == pytest.approx(100 * (1.0 + 0.5 + 0.0) / 3)


def test_class_absent_from_truth_and_predictions_is_left_out_of_macro_f1():
    labels = ["a", "b", "c", "d"]  # d never occurs
    m = classification_metrics(Y_TRUE, Y_PRED, labels)
    assert m["f1_d"] == 0.0
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)  # d (support 0) not averaged in
    assert m["wf1"] == pytest.approx(100 * (0.8 * 3 + 0.5 * 2 + (2 / 3) * 1) / 6)


def test_class_predicted_but_absent_from_truth():
    # true: a a b ; pred: a c b -> c has support 0 but a false positive
    m = classification_metrics([0, 0, 1], [0, 2, 1], LABELS)
    assert m["f1_c"] == 0.0
    assert m["f1_a"] == pytest.approx(100 * 2 / 3)
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 1.0) / 2)
    assert m["wf1"] == pytest.approx(100 * (2 / 3 * 2 + 1.0 * 1) / 3)


# score:      3.0  -0.4  0.6  -3.7  1.2
# predicted:  4.2   0.2  1.6  -3.2 -0.1
# |error|:    1.2   0.6  1.0   0.5  1.3   -> MAE 0.92
# rounded, clipped to [-3, 3]: true 3 0 1 -3 1, pred 3 0 2 -3 0 -> Acc-7 3/5
# sign (>= 0): true + - + - +, pred + + + - - -> Acc-2 3/5
SCORE_TRUE = [3.0, -0.4, 0.6, -3.7, 1.2]
SCORE_PRED = [4.2, 0.2, 1.6, -3.2, -0.1]


def test_sentiment_score_metrics_by_hand():
    m = sentiment_score_metrics(SCORE_TRUE, SCORE_PRED)
    assert m["mae"] == pytest.approx(0.92)
    assert m["acc7"] == pytest.approx(60.0)
    assert m["acc2_score"] == pytest.approx(60.0)
    t, p = np.array(SCORE_TRUE), np.array(SCORE_PRED)
    dt, dp = t - t.mean(), p - p.mean()
    assert m["corr"] == pytest.approx(float((dt * dp).sum() / math.sqrt((dt ** 2).sum() * (dp ** 2).sum())))
    assert 0.8 < m["corr"] < 1.0


def test_sentiment_score_acc7_clips_both_sides():
    # 5.0 and 3.4 both round/clip to 3; -9 and -2.6 both to -3; 2.4 -> 2 vs 3.4 -> 3 differ
    m = sentiment_score_metrics([5.0, -9.0, 2.4], [3.4, -2.6, 3.4])
    assert m["acc7"] == pytest.approx(100 * 2 / 3)


def test_sentiment_score_metrics_degenerate_and_prefix():
    m = sentiment_score_metrics([1.0, -1.0, 2.0], [0.5, 0.5, 0.5], prefix="test_")
    assert m["test_corr"] == 0.0  # constant prediction: no correlation, not NaN
    assert m["test_acc2_score"] == pytest.approx(100 * 2 / 3)
    assert m["test_mae"] == pytest.approx((0.5 + 1.5 + 1.5) / 3)
    assert sentiment_score_metrics([1.0, -2.0], [-1.0, 2.0])["corr"] == pytest.approx(-1.0)


def test_split_metrics_adds_binary_figures_only_for_binary_sentiment():
    y_true, y_pred = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    sent, cm = split_metrics(y_true, y_pred, ["negative", "positive"], target="sentiment", prefix="test_")
    assert sent["test_acc2"] == pytest.approx(80.0)
    assert sent["test_acc2"] == sent["test_acc"]
    assert sent["test_wf1_binary"] == sent["test_wf1"]
    assert cm.tolist() == [[2, 0], [1, 2]]
    assert "test_mae" not in sent  # no scores given

    emo, _ = split_metrics(y_true, y_pred, ["x", "y"], target="emotion", prefix="test_")
    assert "test_acc2" not in emo and "test_wf1_binary" not in emo
    three, _ = split_metrics([0, 1, 2], [0, 1, 1], ["negative", "neutral", "positive"], target="sentiment")
    assert "acc2" not in three and "wf1_binary" not in three


def test_split_metrics_with_scores():
    y_true = [1, 0, 1, 0, 1]
    y_pred = [1, 1, 1, 0, 0]
    m, cm = split_metrics(y_true, y_pred, ["negative", "positive"], target="sentiment",
                          score_true=SCORE_TRUE, score_pred=SCORE_PRED, prefix="test_")
    assert m["test_mae"] == pytest.approx(0.92)
    assert m["test_acc7"] == pytest.approx(60.0)
    assert m["test_acc2"] == pytest.approx(60.0)  # the classifier's, not the sign's
    assert cm.sum() == 5
    empty, _ = split_metrics(y_true, y_pred, ["negative", "positive"], target="sentiment",
                             score_true=[], score_pred=[])
    assert "mae" not in empty
