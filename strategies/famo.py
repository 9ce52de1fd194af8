"""famo: Fast Adaptive Multitask Optimization (Liu, Liang, Liu, Yu, Gong, NeurIPS 2023).

    loss = sum_t z_t log(L_t + eps) / c,   z = softmax(xi),   c = sum_t z_t / (L_t + eps)  (constant)
    xi  <- Adam step (lr 0.025, weight decay 0.01) along J_softmax(xi)^T delta,
           delta_t = log L_t(before) - log L_t(after)

Every task's log-loss is made to fall at a similar rate, at O(1) cost per step (no per-task gradients).
As the official trainer, L(after) is the loss of the same batch after the optimizer step: a second
forward without grad (its cost is in make bench). Rule: common/weighting.py:FAMO.

    python strategies/famo.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("famo", __doc__, weighting="famo")
