"""nash_mtl: Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, ICML 2022,
"Multi-Task Learning as a Bargaining Game").

The update is the Nash bargaining solution: d = sum_t alpha_t g_t with alpha > 0 solving
G alpha = 1 / alpha (elementwise), G the Gram matrix of the per-task gradients. It is invariant to the
scale of each task's loss. Solved on the Gram matrix (common/aggregators.py:nash_mtl_weights, warm
started from the previous step); combined into .grad by the csrc/ kernel.

    python strategies/nash_mtl.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("nash_mtl", __doc__, aggregator="nash_mtl")
