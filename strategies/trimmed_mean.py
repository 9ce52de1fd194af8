"""trimmed_mean: coordinate-wise trimmed mean of the task gradients (Yin et al., ICML 2018,
"Byzantine-Robust Distributed Learning"), torchjd 0.18's TrimmedMean.

In every coordinate of the shared parameters' gradients the --trimmed-mean-trim largest and smallest
task values are dropped and the rest averaged (T = 5, trim 1: the middle three), so no single task's
extreme gradient moves a coordinate. Needs the T x P gradients (common/gradient_rules.py:TrimmedMean).

    python strategies/trimmed_mean.py
    python strategies/trimmed_mean.py --trimmed-mean-trim 2      # the coordinate-wise median of 5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("trimmed_mean", __doc__, aggregator="trimmed_mean")
