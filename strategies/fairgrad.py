"""fairgrad: FairGrad (Ban & Ji, ICML 2024, "Fair Resource Allocation in Multi-Task Learning"; official code
OptMN-Lab/fairgrad; TorchJD's FairGrad).

The update maximises the alpha-fair utility of the tasks' first-order improvements g_t . d; its weights
solve, elementwise,

    G w = w^(-1/alpha),     d = sum_t w_t g_t     (so g_t . d = w_t^(-1/alpha))

alpha = 0 is the equal weighting, alpha = 1 proportional fairness (Nash-MTL's condition), larger alpha
favours the worst-off tasks (--fairgrad-alpha, default 1.0 as the official class). Solved exactly on the
T x T Gram matrix (common/aggregators.py:FairGrad, fairgrad_weights: damped Newton on a convex potential,
where the references call least_squares). Where no update improves every task (0 in the convex hull of the
gradients) the step is d = 0, counted as fairgrad_no_solution.

    python strategies/fairgrad.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("fairgrad", __doc__, aggregator="fairgrad")
