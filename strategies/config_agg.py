"""config_agg: ConFIG, conflict-free gradients (Liu, Chu, Thuerey, ICLR 2025, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", Equation 2; official code tum-pbs/ConFIG; TorchJD's ConFIG).
Named config_agg because "config" is a column of the comparison's tables.

The update's direction has the same cosine with every task's unit gradient u_t = g_t / ||g_t|| (so it
conflicts with none), and its length is the sum of the gradients' projections onto it:

    v = pinv([u_1; ...; u_T]) 1,   d = (sum_t g_t . v / ||v||) v / ||v||

From the Gram matrix: pinv(U) = U^T C+ with C the cosine matrix, so d = sum_t w_t g_t with
w = (n^T C a / a^T C a) a / n, a = C+ 1, n_t = ||g_t|| (common/aggregators.py:ConFIG, config_weights).

    python strategies/config_agg.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("config_agg", __doc__, aggregator="config_agg")
