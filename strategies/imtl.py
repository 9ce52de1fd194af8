"""imtl: Impartial Multi-Task Learning, gradient part IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang,
ICLR 2021, "Towards Impartial Multi-task Learning").

The update d = sum_t alpha_t g_t has equal projections on every task's unit gradient u_t: with
D = [g_1 - g_t], U = [u_1 - u_t] (t >= 2), alpha_{2..T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum.
All inner products come from the Gram matrix (common/aggregators.py:imtl_weights). The direction does
not change when one task's loss is scaled.

    python strategies/imtl.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("imtl", __doc__, aggregator="imtl")
