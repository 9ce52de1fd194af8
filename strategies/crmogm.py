"""crmogm: CR-MOGM, correlation-reduced multi-objective gradient manipulation (Zhou, Zhang, Jiang, Zhang, Kwok,
NeurIPS 2022, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond"; TorchJD's
CRMOGMWeighting).

The weights of another aggregator (--crmogm-base, MGDA by default: CR-MGDA) smoothed across updates by an
exponential moving average, which reduces the correlation between the stochastic weights and gradients:

    lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k,   lambda_0 = lambda^_1,   d = sum_t lambda_k,t g_t

(alpha = 0.9: --crmogm-alpha). common/aggregators.py:CRMOGM; the average and the base's own state are
checkpointed.

    python strategies/crmogm.py
    python strategies/crmogm.py --crmogm-base upgrad
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("crmogm", __doc__, aggregator="crmogm")
