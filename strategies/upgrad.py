"""upgrad: unconflicting projection of gradients (Quinton & Rey, 2024, "Jacobian Descent for
Multi-Objective Optimization", the TorchJD paper).

Each task gradient g_i is projected onto the dual cone of all task gradients, the set of directions that
conflict with none of them, {x : g_j . x >= 0 for every j}; the update is the mean of the projections:

    d = (1/T) sum_i proj_cone(g_i),     so g_j . d >= 0 for every task j (no task is hurt to first order)

A set of gradients that do not conflict (g_i . g_j >= 0 for all pairs) is left as its mean. The
projections are small quadratic programs on the T x T Gram matrix (common/aggregators.py:UPGrad,
upgrad_weights), followed by the shared combination of csrc/ into .grad, like every aggregator here.

    python strategies/upgrad.py
    python strategies/upgrad.py --grad-space representation      # the cheaper variant
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("upgrad", __doc__, aggregator="upgrad")
