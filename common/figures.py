"""Figures of make compare (matplotlib, Agg backend: no display needed), written next to compare.md.

  ap_bars          per-task test AP of every strategy, mean over seeds with 95% t intervals (grouped bars)
  learning_curves  validation AP per task over steps, one panel per strategy (from metrics.jsonl)
  decisions        what each rule decided over time: weights and sampling probabilities as lines, go/stop
                   states, curriculum entries and the trained task as timelines, TAG's affinity as a heatmap

Each takes {strategy: summary} (or {strategy: {seed: summary}} for ap_bars) as common/compare.py loads
them (a summary carries its path as "_path") and returns the path written (None when nothing to draw).
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.records import log_path, read_log  # noqa: E402
from common.stats import mean_interval  # noqa: E402

# train-line keys whose value is one number per task, drawn as lines over steps
LINE_KEYS = ("weights", "aggregator_weights", "probs")
# train-line keys whose value says, per task, whether it is trained / entered / stopped, drawn as timelines
TIMELINE_KEYS = ("states", "entered", "task")


def _grid(n, width=3.2, height=2.4, max_cols=5):
    cols = min(max_cols, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ap_bars(by_label, tasks, path):
    """One group of bars per strategy, one bar per task: mean test AP over seeds, 95% interval whiskers."""
    labels = list(by_label)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(labels) + 2), 4.2))
    width = 0.8 / len(tasks)
    x = np.arange(len(labels))
    for i, t in enumerate(tasks):
        stats = [mean_interval([s["test"]["per_task"][t].get("ap") for s in by_label[lab].values()]) for lab in labels]
        means = [m for m, _, _ in stats]
        halves = [0.0 if math.isnan(h) else h for _, _, h in stats]
        ax.bar(x + (i - (len(tasks) - 1) / 2) * width, means, width, yerr=halves, capsize=2, label=t)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test AP")
    ax.set_ylim(0, 1)
    ax.legend(ncol=len(tasks), fontsize=8, loc="upper right")
    ax.set_title("Per-task test AP (mean over seeds, 95% interval)")
    return _save(fig, path)


def run_logs(summary):
    """The metrics.jsonl files behind a summary: its own, or those of the models it merges, which the merged
    summary names (decisions.models, common.summaries.merge_summaries: single_task one per task, task_grouping
    one per group; its affinity and brute-force runs are not among them)."""
    folder = Path(summary["_path"]).parent
    if own := log_path(folder):
        return [own]
    models = (summary.get("decisions") or {}).get("models") or {}
    return sorted(path for name in models if (path := log_path(folder / name)))


def learning_curves(first_seed, tasks, path, metric="ap"):
    """Validation metric per task over steps, one panel per strategy (its first seed)."""
    labels = list(first_seed)
    fig, axes = _grid(len(labels))
    for ax, lab in zip(axes, labels):
        for log in run_logs(first_seed[lab]):
            for t in tasks:
                pts = [(r["step"], r["per_task"][t][metric]) for r in read_log(log)
                       if r.get("event") == "val" and t in r.get("per_task", {})
                       and r["per_task"][t].get(metric) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=t, color=f"C{tasks.index(t)}", lw=1.2)
        ax.set_title(lab, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"validation {metric} per task over steps", fontsize=10)
    return _save(fig, path)


def _per_task(value, tasks):
    """A logged per-task value as a list in task order: a list of T numbers, or {task: value}."""
    if isinstance(value, dict):
        return [value.get(t) for t in tasks] if all(t in value for t in tasks) else None
    if isinstance(value, list) and len(value) == len(tasks):
        return value
    return None


def decision_panels(summary, tasks):
    """[(title, kind, data)]: kind "lines" (steps, [T series]), "timeline" (steps, [T x steps] of 0/1) or
    "heatmap" (matrix, row and column names). Constant series (equal weights) are left out."""
    panels = []
    for log in run_logs(summary)[:1]:  # multi-model strategies: their decisions are in the summary
        train = [r for r in read_log(log) if r.get("event") == "train"]
        start = next((r for r in read_log(log) if r.get("event") == "start"), {})
        run_tasks = start.get("tasks", tasks)
        for key in LINE_KEYS:
            pts = [(r["step"], _per_task(r[key], run_tasks)) for r in train if key in r]
            pts = [(s, v) for s, v in pts if v is not None and all(isinstance(x, (int, float)) for x in v)]
            if pts and np.ptp(np.asarray([v for _, v in pts], dtype=float)) > 1e-9:
                steps = [s for s, _ in pts]
                panels.append((key, "lines", (steps, np.asarray([v for _, v in pts], dtype=float).T, run_tasks)))
        for key in TIMELINE_KEYS:
            rows = []
            for r in train:
                if key not in r:
                    continue
                v = r[key]
                if key == "task" and isinstance(v, str):
                    on = [float(t == v) for t in run_tasks]
                elif key == "states":
                    v = _per_task(v, run_tasks)
                    on = None if v is None else [float(x != "stop") for x in v]
                else:
                    v = _per_task(v, run_tasks)
                    on = None if v is None else [float(bool(x)) for x in v]
                if on is not None:
                    rows.append((r["step"], on))
            if rows and np.ptp(np.asarray([on for _, on in rows])) > 0:
                panels.append((f"{key} (dark = trained)", "timeline",
                               ([s for s, _ in rows], np.asarray([on for _, on in rows]).T, run_tasks)))
    affinity = summary.get("decisions", {}).get("affinity")
    if isinstance(affinity, dict) and affinity and all(isinstance(v, dict) for v in affinity.values()):
        names = list(affinity)
        matrix = np.asarray([[affinity[i].get(j, np.nan) for j in names] for i in names], dtype=float)
        panels.append(("affinity Z[i->j]", "heatmap", (matrix, names)))
    return panels


def decisions(first_seed, tasks, path):
    """Every strategy's decision panels in one figure; None when no strategy decided anything over time."""
    panels = [(lab, p) for lab, s in first_seed.items() for p in decision_panels(s, tasks)]
    if not panels:
        return None
    fig, axes = _grid(len(panels), width=3.6, height=2.5, max_cols=4)
    for ax, (lab, (title, kind, data)) in zip(axes, panels):
        if kind == "lines":
            steps, series, names = data
            for i, t in enumerate(names):
                ax.plot(steps, series[i], label=t, color=f"C{tasks.index(t) if t in tasks else i}", lw=1.1)
            ax.legend(fontsize=6)
        elif kind == "timeline":
            steps, on, names = data
            ax.imshow(on, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                      extent=(steps[0], max(steps[-1], steps[0] + 1), len(names) - 0.5, -0.5))
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=7)
        else:
            matrix, names = data
            im = ax.imshow(matrix, cmap="RdBu_r", vmin=-np.nanmax(np.abs(matrix)), vmax=np.nanmax(np.abs(matrix)))
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n[:4] for n in names], fontsize=7)
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels([n[:4] for n in names], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{lab}: {title}", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(fig, path)
