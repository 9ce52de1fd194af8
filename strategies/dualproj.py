"""dualproj: the mean gradient projected onto the dual cone of the task gradients (Lopez-Paz & Ranzato,
NeurIPS 2017, "Gradient Episodic Memory for Continual Learning", Equation 11; TorchJD's DualProj, Quinton & Rey
2024, "Jacobian Descent for Multi-Objective Optimization").

The mean gradient is projected onto the set of directions that conflict with no task, {x : g_j . x >= 0 for
every j}:

    d = proj_cone((1/T) sum_t g_t),     so g_j . d >= 0 for every task j (no task is hurt to first order)

UPGrad projects every gradient and averages; DualProj averages, then projects once. Gradients that do not
conflict are left as their mean. The projection is a small quadratic program on the T x T Gram matrix
(common/aggregators.py:DualProj, dualproj_weights; reg_eps 0, the exact projection, where TorchJD adds 1e-4 I:
--dualproj-reg-eps 1e-4), followed by the shared combination of csrc/ into .grad.

    python strategies/dualproj.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("dualproj", __doc__, aggregator="dualproj")
