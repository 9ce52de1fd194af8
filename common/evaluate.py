"""Metrics for the five binary tasks, computed with scikit-learn.

Everything works on plain numpy arrays:
  labels: (N, T) of 0/1, scores: (N, T) probability of the positive class.
Per task:
  ap            average precision (threshold-free; the default selection and rule metric)
  loss          mean cross-entropy of the scores (threshold-free; the rules' "loss" metric is minus it)
  f1_pos        positive-class F1 at 0.5 (a clip is positive when its score is above 0.5 = argmax of the logits)
  f1_macro, accuracy   at 0.5 too
  threshold     the per-task threshold of f1_pos_tuned: the one that maximises F1 on the split itself
                (validation), or the one given (test: the validation-chosen threshold)
  f1_pos_tuned  positive-class F1 with "score >= threshold"
  collapsed     True when every clip gets the same class at 0.5: the task is still at a constant predictor
"""
import math
import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, log_loss,
                             precision_recall_curve)

METRIC_NAMES = ("ap", "loss", "f1_pos", "f1_pos_tuned", "f1_macro", "accuracy")
DEFAULT_THRESHOLD = 0.5


def average_precision(labels, scores):
    """sklearn's average_precision_score (step area under the precision-recall curve, tied scores
    entering together); nan when there is no positive label: AP is undefined there."""
    labels = np.asarray(labels).astype(int)
    if labels.sum() == 0:
        return float("nan")
    return float(average_precision_score(labels, np.asarray(scores, dtype=np.float64)))


def best_f1_threshold(labels, scores):
    """The threshold t among the distinct scores that maximises the positive-class F1 of "score >= t"
    (ties: the highest such t, the one predicting fewest positives). Returns (t, F1). Without any
    positive label F1 is 0 everywhere: (0.5, 0.0)."""
    labels = np.asarray(labels).astype(int)
    if labels.sum() == 0:
        return DEFAULT_THRESHOLD, 0.0
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64))
    precision, recall = precision[:len(thresholds)], recall[:len(thresholds)]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = f1.max()
    i = np.flatnonzero(f1 >= best - 1e-12).max()  # thresholds ascend: the last of the ties is the highest
    return float(thresholds[i]), float(f1[i])


def task_metrics(labels, scores, threshold=None):
    """Metrics of one binary task. labels (N,) 0/1, scores (N,) positive-class probabilities;
    threshold: the one f1_pos_tuned uses (None: chosen on these labels, as on validation)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = (scores > DEFAULT_THRESHOLD).astype(int)
    if threshold is None:
        threshold, _ = best_f1_threshold(labels, scores)
    tuned = (scores >= threshold).astype(int)
    with warnings.catch_warnings():  # a single-class split warns; the values are still defined
        warnings.simplefilter("ignore")
        return {
            "ap": average_precision(labels, scores),
            "loss": float(log_loss(labels, scores, labels=[0, 1])),
            "f1_pos": float(f1_score(labels, pred, pos_label=1, zero_division=0)),
            "f1_pos_tuned": float(f1_score(labels, tuned, pos_label=1, zero_division=0)),
            "f1_macro": float(f1_score(labels, pred, average="macro", labels=[0, 1], zero_division=0)),
            "accuracy": float(accuracy_score(labels, pred)),
            "threshold": float(threshold),
            "collapsed": bool(pred.min() == pred.max()),
            "n": int(labels.size),
            "n_pos": int(labels.sum()),
        }


def evaluate_predictions(labels, scores, tasks, thresholds=None):
    """Per-task metrics and their unweighted means over tasks.

    thresholds: {task: threshold} for f1_pos_tuned (the validation-chosen ones when scoring test);
    None chooses them on this split. Returns {"per_task": {task: {metric: value}}, "mean": {metric: value}}.
    A task with an undefined AP (no positives) is left out of the AP mean, not counted as 0.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 2 or labels.shape[1] != len(tasks):
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be (N, {len(tasks)})")
    if not np.all(np.isfinite(scores)):
        bad = [t for i, t in enumerate(tasks) if not np.all(np.isfinite(scores[:, i]))]
        raise FloatingPointError(f"non-finite prediction scores for tasks {bad}")
    if thresholds is not None:
        missing = [t for t in tasks if t not in thresholds]
        if missing:
            raise KeyError(f"no threshold given for tasks {missing}")
    per_task = {t: task_metrics(labels[:, i], scores[:, i], None if thresholds is None else thresholds[t])
                for i, t in enumerate(tasks)}
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


def format_metrics(metrics, tasks, title=""):
    from tabulate import tabulate
    if "f1_pos" not in metrics["mean"]:  # pretraining: losses
        rows = [[t, metrics["per_task"][t]["loss"]] for t in tasks] + [["mean", metrics["mean"]["loss"]]]
        return (title + "\n" if title else "") + tabulate(rows, headers=["task", "loss"], floatfmt=".4f")
    rows = [[t] + [metrics["per_task"][t][m] for m in ("f1_pos", "f1_macro", "accuracy", "ap")] for t in tasks]
    rows.append(["mean"] + [metrics["mean"][m] for m in ("f1_pos", "f1_macro", "accuracy", "ap")])
    table = tabulate(rows, headers=["task", "F1 pos", "F1 macro", "accuracy", "AP"], floatfmt=".3f")
    return (title + "\n" if title else "") + table
