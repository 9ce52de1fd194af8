"""moco: MoCo (Fernando et al., ICLR 2023, "Mitigating Gradient Bias in Multi-objective Learning:
A Provably Convergent Approach"), as LibMTL (LibMTL/weighting/MoCo.py).

The rule keeps tracked gradients y_t (a moving average of the normalised, loss-scaled task gradients)
and weights lambda on the simplex, each step k:

    y_t    <- y_t - beta / k^beta_sigma * (y_t - L_t g_t / ||g_t||)
    lambda <- softmax(lambda - gamma / k^gamma_sigma * (Y Y^T + rho I) lambda)
    d       = Y^T lambda

Its state lives on the gradients themselves ([T, P], in the checkpoint), so it needs the T x P rows and
--grad-space params (common/gradient_rules.py:MoCo).

    python strategies/moco.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("moco", __doc__, aggregator="moco")
