"""modo: MoDo, multi-objective gradient with double sampling (Chen, Fernando, Ying, Chen, JMLR 2024, "Three-Way
Trade-Off in Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance"; official code
heshandevaka/Trade-Off-MOL; TorchJD's MoDoWeighting).

The task weights lambda (on the simplex, 1/T at the start) take one projected gradient step per update on
the MGDA objective lambda^T G lambda / 2, with a ridge rho:

    lambda <- proj_simplex(lambda - gamma (G lambda + rho lambda)),     d = sum_t lambda_t g_t

(gamma = 0.1, rho = 0.1: --modo-gamma, --modo-rho). The paper estimates G from two independent batches;
here G is the Gram matrix of the step's batch (a documented difference). common/aggregators.py:MoDo; lambda
is checkpointed.

    python strategies/modo.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("modo", __doc__, aggregator="modo")
