"""stch: smooth Tchebycheff scalarisation (Lin et al., ICML 2024, "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization"), as LibMTL (LibMTL/weighting/STCH.py).

Warm-up (epochs 0 .. --stch-warmup-epoch): L = sum_t log L_t; the losses of the last warm-up epoch are
averaged into the nadir point n. Then

    L = T mu log sum_t exp(log(L_t / n_t) / mu)

a smooth maximum of the log-loss ratios: the task furthest above its nadir gets most of the weight.
The rule is common/weighting.py:STCH.

    python strategies/stch.py
    python strategies/stch.py --stch-warmup-epoch 0 --stch-mu 0.5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("stch", __doc__, weighting="stch")
