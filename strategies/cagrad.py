"""cagrad: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone, Liu, NeurIPS 2021).

The update d maximises the worst task improvement min_t <d, g_t> within a ball around the mean
gradient g0: ||d - g0|| <= c ||g0||, c = 0.5. Its dual is a T-dimensional problem on the simplex,
solved from the Gram matrix of the per-task gradients (common/aggregators.py:cagrad_weights); the
update sum_t w_t g_t is written into .grad by the csrc/ kernel. c = 0 is the mean gradient.

    python strategies/cagrad.py
    python strategies/cagrad.py --grad-space params
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
# make compare --grid full tunes this flag with the learning rate (the default value first)
TUNE_GRID = ("--cagrad-c", ["0.4", "0.2"])

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("cagrad", __doc__, aggregator="cagrad")
