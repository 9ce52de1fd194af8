"""Runs of several models (single_task: one model per task; task_grouping: one per group): the plainest
loop they train each model with, one summary over the models, and the single-task references other rules read."""
import json
import math
from pathlib import Path

import numpy as np


def train_sum_of_losses(run):
    """The plainest loop, for strategies that train several models (one per task, one per group):
    every task of the run on every batch, equal weights. Returns the summary."""
    run.start()
    for batch in run.batches():
        losses = run.task_losses(batch)
        run.step(losses.sum(), losses, batch)
        run.log_step(losses)
        if run.at_eval():
            run.validate()
            run.eval_checkpoint()
    return run.finish()


def merge_summaries(summaries, tasks, strategy):
    """One summary over several models that each own some of the tasks (single_task: one model per
    task; task_grouping: one per group), shaped like any run's summary.json. summaries: {name: summary} of
    models whose folders lie in the merged run's folder; each task's metrics come from the model that has it."""
    from common.evaluate import METRIC_NAMES
    owner = {t: s for s in summaries.values() for t in s["tasks"] if t in tasks}

    def merged(split):
        per_task = {t: owner[t][split]["per_task"][t] for t in tasks}
        # an undefined metric (AP without positives) is null in summary.json: left out of the mean
        mean = {m: float(np.mean([v for t in tasks if (v := per_task[t][m]) is not None] or [np.nan]))
                for m in METRIC_NAMES}
        return {"per_task": per_task, "mean": mean}
    parts = list(summaries.values())
    seconds = sum(s["train_seconds"] for s in parts)
    steps = sum(s["steps"] for s in parts)
    return {
        "strategy": strategy, "run": f"seed{parts[0]['seed']}", "tasks": list(tasks), "seed": parts[0]["seed"],
        "model_size": parts[0]["model_size"], "data": parts[0]["data"], "steps": steps,
        "epochs": parts[0]["epochs"], "train_seconds": seconds, "seconds_per_step": seconds / max(steps, 1),
        "seconds_per_epoch": sum(s["seconds_per_epoch"] for s in parts),
        "nonfinite_skips": sum(s["nonfinite_skips"] for s in parts),
        "lr": parts[0].get("lr"), "metric": parts[0].get("metric"), "select_metric": parts[0].get("select_metric"),
        # the budget is per model: the models' budgets and steps add up; the run stopped early only if every
        # model did; steps_to_best per model (each selected its own best checkpoint)
        "budget_steps": sum(s.get("budget_steps") or 0 for s in parts) or None,
        "stopped_early": all(s.get("stopped_early", False) for s in parts),
        "steps_to_best": sum(s.get("steps_to_best") or 0 for s in parts),
        "steps_to_best_per_model": {name: s.get("steps_to_best") for name, s in summaries.items()},
        "thresholds": ({t: owner[t]["thresholds"].get(t) for t in tasks}
                       if all(owner[t].get("thresholds") for t in tasks) else None),
        "world_size": parts[0].get("world_size", 1), "precision": parts[0].get("precision"),
        "val": merged("val"), "test": merged("test"),
        "decisions": {"models": {name: s["tasks"] for name, s in summaries.items()}},
        "versions": parts[0].get("versions"), "data_fingerprint": parts[0].get("data_fingerprint"),
        # each task's test scores: the file of the model that has it, relative to this summary's folder (each
        # model's folder is <this folder>/<its run name>: single_task/seed0/gory/)
        "test_scores": ({t: [f"{owner[t]['run']}/{owner[t]['test_scores'][t][0]}", owner[t]["test_scores"][t][1]]
                         for t in tasks} if all(owner[t].get("test_scores") for t in tasks) else None),
    }


def single_task_references(out, seed, tasks, metric):
    """({task: val metric of the single-task model}, why) from <out>/single_task/seed<seed>/summary.json, or
    (None, why) when that run is missing or lacks a finite value: the reference that curriculum
    (--difficulty single_task) and dynamic_sampling (--difficulty gap) read."""
    path = Path(out) / "single_task" / f"seed{seed}" / "summary.json"
    if not path.exists():
        return None, f"no {path}"
    per_task = json.loads(path.read_text())["val"]["per_task"]
    refs = {t: per_task.get(t, {}).get(metric) for t in tasks}
    missing = [t for t, v in refs.items() if v is None or not math.isfinite(v)]
    return (None, f"{path} has no finite val {metric} for {missing}") if missing else (refs, f"val {metric} of single_task/seed{seed} (under --out)")
