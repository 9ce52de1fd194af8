"""pcd: Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained Descent for
Hierarchical Multi-Objective Optimization", TMLR; reference code DaraVaram/priority-constrained-descent;
TorchJD's PCD).

The first task (of --tasks) is the primary one: the update follows its gradient as closely as possible,
while every other task gets at least a fraction tau (--pcd-tau, 0.02) of the progress of a step along its
own normalised gradient:

    d~ = argmin_d ||d - g~_1||^2 / 2   s.t.   g~_j . d >= tau ||g~_j||^2  (j >= 2),   d = d~ ||g_1|| / ||d~||

with g~_i = g_i / sqrt(v_i + eps), v_i the bias-corrected moving average (beta = 0.999) of ||g_i||^2. The
quadratic program is solved on the T x T Gram matrix by the dual active-set method of Goldfarb and Idnani
(common/aggregators.py:PCD; the moving average is checkpointed). Infeasible constraints give d = g_1,
counted as pcd_infeasible.

    python strategies/pcd.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("pcd", __doc__, aggregator="pcd")
