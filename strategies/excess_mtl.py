"""excess_mtl: ExcessMTL (He et al., ICML 2024, "Robust Multi-Task Learning with Excess Risks"), as
the official code (uiuctml/ExcessMTL) and LibMTL (LibMTL/weighting/ExcessMTL.py).

Task weights w (sum T) grow with each task's estimated excess risk relative to its first one:

    S_t <- S_t + g_t^2,   e_t = sum_p g_tp^2 / sqrt(S_tp + 1e-7),   w_t <- w_t exp(eta e_t / e_t(first)),  w <- T w / sum w
    loss = sum_t w_t L_t   (the shared update and the heads)

The squared-gradient sums S are per coordinate ([T, P], in the checkpoint), so it is a T x P rule
(common/gradient_rules.py:ExcessMTL) although it weighs the losses.

    python strategies/excess_mtl.py
    python strategies/excess_mtl.py --excess-mtl-robust-step-size 0.1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("excess_mtl", __doc__, aggregator="excess_mtl")
