"""sdmgrad: SDMGrad, stochastic direction-oriented multi-objective gradient (Xiao, Ban, Ji, NeurIPS 2023,
"Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms"; official code
OptMN-Lab/SDMGrad; TorchJD's SDMGradWeighting).

MGDA regularised towards the mean gradient: the weights w on the simplex solve, by 20 steps of projected SGD
with momentum per update (warm started from the previous update's w),

    min_w  (w + lambda w~)^T G (w + lambda w~) / 2,   w~ = 1/T,   d = sum_t (w_t + lambda w~_t) / (1 + lambda) g_t

with G scaled by the mean squared gradient norm (lambda = 0.3, lr 10, momentum 0.5: --sdmgrad-*). The paper
estimates G from two independent batches; here G is the step's batch Gram matrix (a documented difference).
common/aggregators.py:SDMGrad; w is checkpointed.

    python strategies/sdmgrad.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("sdmgrad", __doc__, aggregator="sdmgrad")
