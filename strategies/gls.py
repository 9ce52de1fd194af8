"""gls: geometric loss strategy (Chennupati et al., CVPR 2019 workshops, "MultiNet++"), as LibMTL
(LibMTL/weighting/GLS.py).

    L = (prod_t L_t) ^ (1/T)          dL/dL_t = L / (T L_t)

A task whose loss is small gets a large weight: the geometric mean is scale-free per task (multiplying
one task's loss by a constant does not change the gradient direction). The rule is
common/weighting.py:GLS (shared with the schedulers' --weighting gls).

    python strategies/gls.py
    python strategies/gls.py --aggregator pcgrad      # geometric-mean terms + PCGrad
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("gls", __doc__, weighting="gls")
