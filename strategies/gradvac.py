"""gradvac: Gradient Vaccine (Wang, Tsvetkov, Firat, Cao, ICLR 2021, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models"; TorchJD's GradVac).

Like PCGrad, pairwise surgery in a random order, but towards a target similarity instead of orthogonality:
each pair keeps an exponential moving average phi_hat_ij of its cosine (rate beta = 0.5). For task i, over
the other tasks j in random order, with phi_ij = cos(g_i', g_j):

    if phi_ij < phi_hat_ij:  g_i' += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                                     / (||g_j|| sqrt(1 - phi_hat^2)) g_j
    phi_hat_ij = (1 - beta) phi_hat_ij + beta phi_ij;       d = sum_i g_i'

Each g_i' stays a combination of the original gradients, so everything is read from the Gram matrix
(common/aggregators.py:GradVac, gradvac_coefficients; the targets and the random generator are checkpointed).

    python strategies/gradvac.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("gradvac", __doc__, aggregator="gradvac")
