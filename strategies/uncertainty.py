"""uncertainty: homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018, "Multi-Task
Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    L = sum_t L_t / (2 exp(s_t)) + s_t / 2     s_t = log sigma_t^2, learned with the model, from s_t = -0.5

the paper's form and LibMTL's (weighting/UW.py, its start value too). dL/ds_t = 1/2 - L_t / (2 exp(s_t)),
so s_t settles near log L_t: a task with a high, noisy loss gets a small weight 1 / (2 exp(s_t)), and the
+ s_t / 2 term stops every weight from shrinking to zero. The rule itself is
common/weighting.py:Uncertainty (shared with the schedulers' --weighting uncertainty).

    python strategies/uncertainty.py
    python strategies/uncertainty.py --aggregator pcgrad      # uncertainty weights + PCGrad
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("uncertainty", __doc__, weighting="uncertainty")
