"""Metrics for the five binary tasks: positive-class F1, macro F1, accuracy, average precision.

Everything works on plain numpy arrays so that it can be checked by hand:
  labels: (N, T) of 0/1, scores: (N, T) probability of the positive class.
A prediction is positive when its score is above 0.5 (= argmax of the two logits).
"""
import math

import numpy as np


def _f1(tp, fp, fn):
    # zero_division = 0, as sklearn's default warning case: no predicted and no true positives gives 0.
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def average_precision(labels, scores):
    """Area under the step precision-recall curve, as sklearn's average_precision_score.

    Precision and recall are taken at each distinct score threshold (ties enter together).
    Returns nan when there is no positive label: AP is undefined there.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # last index of each run of equal scores
    distinct = np.where(np.diff(scores))[0]
    ends = np.r_[distinct, labels.size - 1]
    tp = np.cumsum(labels)[ends]
    predicted = ends + 1
    precision = tp / predicted
    recall = tp / n_pos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def task_metrics(labels, scores, threshold=0.5):
    """Metrics of one binary task. labels (N,) 0/1, scores (N,) positive-class probabilities."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) > threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    tn = int(np.sum(~pred & ~labels))
    f1_pos = _f1(tp, fp, fn)
    f1_neg = _f1(tn, fn, fp)
    return {
        "f1_pos": f1_pos,
        "f1_macro": (f1_pos + f1_neg) / 2,
        "accuracy": (tp + tn) / max(labels.size, 1),
        "ap": average_precision(labels, scores),
        "n": int(labels.size),
        "n_pos": int(labels.sum()),
    }


METRIC_NAMES = ("f1_pos", "f1_macro", "accuracy", "ap")


def evaluate_predictions(labels, scores, tasks):
    """Per-task metrics and their unweighted means over tasks.

    Returns {"per_task": {task: {metric: value}}, "mean": {metric: value}}.
    A task with an undefined AP (no positives) is left out of the AP mean, not counted as 0.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2 or labels.shape[1] != len(tasks):
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be (N, {len(tasks)})")
    if not np.all(np.isfinite(scores)):
        bad = [t for i, t in enumerate(tasks) if not np.all(np.isfinite(scores[:, i]))]
        raise FloatingPointError(f"non-finite prediction scores for tasks {bad}")
    per_task = {t: task_metrics(labels[:, i], scores[:, i]) for i, t in enumerate(tasks)}
    mean = {}
    for m in METRIC_NAMES:
        values = [per_task[t][m] for t in tasks if not math.isnan(per_task[t][m])]
        mean[m] = float(np.mean(values)) if values else float("nan")
    return {"per_task": per_task, "mean": mean}


def delta_m(multi, single, tasks=None, higher_is_better=True):
    """Multi-task gain in percent (Maninis et al. 2019):
    (100 / T) * sum_t s_t (M_t - S_t) / S_t, with s_t = +1 when higher is better.

    multi, single: {task: metric value}. Only the tasks given (default: those in multi) count;
    a task missing from the single-task references is an error, not silently skipped.
    """
    tasks = list(tasks or multi)
    missing = [t for t in tasks if t not in single]
    if missing:
        raise KeyError(f"no single-task reference for tasks {missing}")
    sign = 1.0 if higher_is_better else -1.0
    terms = []
    for t in tasks:
        if single[t] == 0:
            raise ZeroDivisionError(f"single-task reference of {t} is 0; delta_m is undefined")
        terms.append(sign * (multi[t] - single[t]) / single[t])
    return 100.0 * float(np.mean(terms))


def majority_baseline(train_labels, eval_labels, tasks):
    """Metrics of predicting each task's majority training class for every clip (constant scores)."""
    train_labels = np.asarray(train_labels)
    eval_labels = np.asarray(eval_labels)
    majority = (train_labels.mean(axis=0) > 0.5).astype(np.float64)
    scores = np.broadcast_to(majority, eval_labels.shape)
    return evaluate_predictions(eval_labels, scores, tasks)
