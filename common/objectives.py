"""What a run trains on: the objective turns a batch into per-item task losses and evaluates a split. Here the
fine-tuning objective (the Comic Mischief tasks) and the loss helpers; the pretraining objective is
common.pretrain.PretrainObjective. Run never asks which one it has."""
import torch
import torch.nn.functional as F

from common.data import TASKS
from common.evaluate import evaluate_predictions
from common.state import Stateless


class FinetuneObjective(Stateless):
    """The Comic Mischief tasks: per-task cross-entropy on the heads' logits (not BCE on softmax: it does
    not saturate). The interface every objective has (common.pretrain.PretrainObjective too):
    tasks, model_tasks, strategy_suffix, per_item_losses, labels, task_parameters, evaluate, parameters,
    to, state_dict, load_state_dict."""
    strategy_suffix = ""
    tasks_past_representation = ()  # every task's loss is a function of the fused representation z

    def __init__(self, tasks, metric="ap", select_metric=None):
        self.tasks = list(tasks)
        self.model_tasks = self.tasks  # the heads the model needs
        self.metric = metric
        self.select_metric = select_metric or metric
        self.columns = torch.tensor([TASKS.index(t) for t in self.tasks])

    def labels(self, batch):
        return batch["labels"][:, self.columns.to(batch["labels"].device)]

    def per_item_losses(self, model, batch, active_modalities=None, generator=None):
        fused = model.trunk(batch, active_modalities=active_modalities)
        per_item = losses_from_logits(model.classify(fused), self.labels(batch), reduction="none")
        return fused, per_item, torch.ones_like(per_item, dtype=torch.bool)

    def task_parameters(self, model, task=None):
        return list(model.heads[task].parameters()) if task else model.head_parameters()

    def evaluate(self, run, dataset, model, modalities, thresholds=None, keep_scores=False):
        """Metrics of a split (common.evaluate). thresholds: {task: threshold} of f1_pos_tuned, the
        validation-chosen ones when scoring test (None: chosen on this split). Each per-task dict and the
        mean carry "score" (--metric, higher is better); the mean also "selection" (--select-metric).
        keep_scores: also return the positive-class probabilities [N, T] as metrics["scores"]."""
        scores, labels = run.predict(dataset, model, modalities)
        metrics = evaluate_predictions(labels, scores, self.tasks, thresholds)
        if keep_scores:
            metrics["scores"] = scores
        for m in list(metrics["per_task"].values()) + [metrics["mean"]]:
            m["score"] = higher_is_better(m, self.metric)
        metrics["mean"]["selection"] = higher_is_better(metrics["mean"], self.select_metric)
        return metrics


def higher_is_better(metrics, name):
    """The value of a metric oriented so that higher is better: minus the loss for "loss"."""
    return -metrics["loss"] if name == "loss" else metrics[name]


def losses_from_logits(logits, labels, reduction="mean"):
    """Per-task cross-entropy. logits [B, T, 2], labels [B, T] (0/1) -> [T] (mean) or [B, T] (none)."""
    B, T, _ = logits.shape
    per_item = F.cross_entropy(logits.reshape(B * T, 2).float(), labels.reshape(B * T), reduction="none")
    per_item = per_item.view(B, T)
    return per_item if reduction == "none" else per_item.mean(0)


def masked_mean(per_item, valid):
    """[B, T] values and bool [B, T] -> [T]: each column's mean over its valid rows (0 where none)."""
    return (per_item * valid).sum(0) / valid.sum(0).clamp(min=1)
