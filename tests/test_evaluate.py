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


# ---------------------------------------------------------------- scikit-learn, tuned thresholds, loss
def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, log_loss
    rng = np.random.default_rng(3)
    labels = (rng.random((60, 2)) < [0.3, 0.1]).astype(int)
    scores = np.clip(labels * 0.3 + rng.random((60, 2)) * 0.7, 0, 1)
    out = evaluate_predictions(labels, scores, ["binary", "gory"])
    for i, t in enumerate(["binary", "gory"]):
        m, y, s = out["per_task"][t], labels[:, i], scores[:, i]
        assert m["ap"] == pytest.approx(average_precision_score(y, s))
        assert m["f1_pos"] == pytest.approx(f1_score(y, s > 0.5))
        assert m["f1_macro"] == pytest.approx(f1_score(y, s > 0.5, average="macro"))
        assert m["accuracy"] == pytest.approx(accuracy_score(y, s > 0.5))
        assert m["loss"] == pytest.approx(log_loss(y, s))
        assert m["f1_pos_tuned"] == pytest.approx(f1_score(y, s >= m["threshold"]))


def test_loss_by_hand():
    m = task_metrics([1, 0], [0.8, 0.4])
    assert m["loss"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def brute_force_threshold(labels, scores):
    """Every distinct score as the threshold of "score >= t"; the highest F1, ties to the highest t."""
    best = (-1.0, None)
    for t in sorted(set(scores)):
        pred = [s >= t for s in scores]
        tp = sum(p and y for p, y in zip(pred, labels))
        fp = sum(p and not y for p, y in zip(pred, labels))
        fn = sum((not p) and y for p, y in zip(pred, labels))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 >= best[0] - 1e-12:
            best = (f1, t)
    return best[1], best[0]


def test_tuned_threshold_is_the_brute_force_maximiser():
    from common.evaluate import best_f1_threshold
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.3, 0.3, 0.2, 0.15, 0.1, 0.05, 0.6]
    t, f1 = best_f1_threshold(labels, scores)
    assert (t, f1) == pytest.approx(brute_force_threshold(labels, scores))
    # by hand: at t = 0.3 the prediction is 0.9 0.8 0.7 0.6 0.3 0.3 -> tp 3, fp 3, fn 1: F1 = 6/10; at 0.7
    # tp 2, fp 1, fn 2: F1 = 4/7 = 0.571; at 0.15: tp 4, fp 4, fn 0: F1 = 8/12 = 0.667 (the best)
    assert t == pytest.approx(0.15) and f1 == pytest.approx(8 / 12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = (rng.random(15) < 0.3).astype(int)
        if y.sum() == 0:
            continue
        s = np.round(rng.random(15), 1)  # ties
        assert best_f1_threshold(y, s) == pytest.approx(brute_force_threshold(list(y), list(s)))


def test_given_thresholds_are_used_for_tuned_f1_and_the_05_f1_stays():
    labels = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.4], [0.3], [0.35], [0.1]])
    chosen_here = evaluate_predictions(labels, scores, ["binary"])["per_task"]["binary"]
    assert chosen_here["threshold"] == pytest.approx(0.35) and chosen_here["f1_pos_tuned"] == pytest.approx(1.0)
    assert chosen_here["f1_pos"] == 0.0 and chosen_here["collapsed"]  # nothing above 0.5
    given = evaluate_predictions(labels, scores, ["binary"], thresholds={"binary": 0.38})["per_task"]["binary"]
    assert given["threshold"] == 0.38 and given["f1_pos_tuned"] == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="binary"):
        evaluate_predictions(labels, scores, ["binary"], thresholds={})
