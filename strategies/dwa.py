"""dwa: Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, "End-to-End Multi-Task Learning with
Attention").

    w_t = T exp(r_t / tau) / sum_s exp(r_s / tau),   r_t = L_t(k-1) / L_t(k-2),   tau = 2 (--dwa-tau)

L_t(k) is task t's mean training loss over epoch k; the weights are 1 for the first two epochs. A task
whose loss fell less over the last epoch gets more weight. Rule: common/weighting.py:DWA.

    python strategies/dwa.py --epochs 6
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
# make compare --grid full tunes this flag with the learning rate (the default value first)
TUNE_GRID = ("--dwa-tau", ["2.0", "1.0"])

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("dwa", __doc__, weighting="dwa")
