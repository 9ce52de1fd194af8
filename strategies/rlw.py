"""rlw: Random Loss Weighting (Lin, Ye, Xu, Shi, Zhang, TMLR 2022, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning").

    each step: w = softmax(z),  z ~ N(0, I)

A baseline that a learned weighting must beat. The weights sum to 1, as the paper and LibMTL
(weighting/RLW.py); --rlw-scale sumT multiplies them by T (sum T like equal weights), which is not
neutral under the global gradient-norm clip. Rule: common/weighting.py:RLW.

    python strategies/rlw.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("rlw", __doc__, weighting="rlw")
