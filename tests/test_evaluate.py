import math

import numpy as np
import pytest

from common.evaluate import average_precision, delta_m, evaluate_predictions, majority_baseline, task_metrics


def test_task_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4, 0.05])
    m = task_metrics(labels, scores)
    # predicted positive: 0.9, 0.6, 0.7 -> tp 2, fp 1, fn 1, tn 4
    assert m["f1_pos"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))          # 0.6667
    assert m["f1_macro"] == pytest.approx((4 / 6 + 2 * 4 / (2 * 4 + 1 + 1)) / 2)  # (0.6667 + 0.8) / 2
    assert m["accuracy"] == pytest.approx(6 / 8)
    # ranking: 0.9(+) 0.7(-) 0.6(+) 0.4 0.3 0.2(+) ... -> AP = (1/3)(1/1 + 2/3 + 3/6)
    assert m["ap"] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)


def test_average_precision_ties_enter_together():
    # two tied scores, one positive one negative: precision at that threshold is 1/2
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert average_precision([0, 1, 0], [0.9, 0.5, 0.5]) == pytest.approx(1 / 3)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_no_positive_predictions_gives_zero_f1_not_error():
    m = task_metrics([1, 0, 0], [0.1, 0.2, 0.3])
    assert m["f1_pos"] == 0.0
    assert m["f1_macro"] == pytest.approx((0 + 2 * 2 / (2 * 2 + 1)) / 2)


def test_means_skip_undefined_ap():
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.8, 0.1], [0.2, 0.9], [0.7, 0.2]])
    out = evaluate_predictions(labels, scores, ["binary", "gory"])
    assert out["per_task"]["binary"]["ap"] == pytest.approx(1.0)
    assert math.isnan(out["per_task"]["gory"]["ap"])
    assert out["mean"]["ap"] == pytest.approx(1.0)
    assert out["mean"]["accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_nonfinite_scores_are_an_error():
    with pytest.raises(FloatingPointError, match="gory"):
        evaluate_predictions(np.zeros((2, 2)), np.array([[0.1, np.nan], [0.2, 0.3]]), ["binary", "gory"])


def test_delta_m():
    multi = {"a": 0.6, "b": 0.45}
    single = {"a": 0.5, "b": 0.5}
    assert delta_m(multi, single) == pytest.approx(100 * (0.2 - 0.1) / 2)
    assert delta_m(multi, single, higher_is_better=False) == pytest.approx(-5.0)
    with pytest.raises(KeyError):
        delta_m({"c": 1.0}, single)


def test_majority_baseline():
    train = np.array([[1, 0], [1, 0], [0, 1]])
    ev = np.array([[1, 0], [0, 0], [1, 1], [1, 0]])
    out = majority_baseline(train, ev, ["binary", "gory"])
    assert out["per_task"]["binary"]["accuracy"] == pytest.approx(3 / 4)
    assert out["per_task"]["gory"]["f1_pos"] == 0.0
    assert out["per_task"]["binary"]["ap"] == pytest.approx(3 / 4)  # constant scores: AP = prevalence
