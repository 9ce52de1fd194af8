"""mgda: Multiple Gradient Descent Algorithm (Sener, Koltun, NeurIPS 2018, "Multi-Task Learning as
Multi-Objective Optimization").

The update is the min-norm point of the convex hull of the per-task gradients,
d = sum_t w_t g_t, w = argmin_{w in simplex} w^T G w, solved exactly on the Gram matrix G
(common/aggregators.py:MGDA, mgda_weights; the paper runs Frank-Wolfe); it is a common descent
direction when one exists. --grad-space params (default) is the paper's MGDA: gradients of all shared
parameters. --grad-space representation is the paper's cheaper MGDA-UB: gradients of the shared
representation, one backward through the trunk (make compare shows both).

    python strategies/mgda.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("mgda", __doc__, aggregator="mgda")
