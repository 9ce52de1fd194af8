"""rlw: Random Loss Weighting (Lin, Ye, Xu, Shi, Zhang, TMLR 2022, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning").

    each step: w = T * softmax(z),  z ~ N(0, I)

A baseline that a learned weighting must beat. The paper's weights sum to 1; here they sum to T like
equal weights, so the learning rate means the same. Rule: common/weighting.py:RLW.

    python strategies/rlw.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("rlw", __doc__, weighting="rlw")
