"""krum: Krum / Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent"; TorchJD's Krum).

A Byzantine-robust rule from federated learning, here with the tasks as the workers: each task gradient is
scored by the sum of its distances to its T - f - 2 nearest other gradients (f = --krum-n-byzantine, 1 by
default), and the update is the mean of the --krum-n-selected (1) best-scored gradients:

    score_i = sum over the T - f - 2 nearest j of ||g_i - g_j||,    d = mean of the n_selected lowest-score g_i

so a task whose gradient is far from the others' is left out. Distances from the Gram matrix,
||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij (common/aggregators.py:Krum, krum_weights). With fewer active tasks
than Krum needs (f + 3) the step is the mean, counted as krum_too_few_tasks.

    python strategies/krum.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("krum", __doc__, aggregator="krum")
