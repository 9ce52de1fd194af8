"""graddrop: gradient sign dropout (Chen et al., NeurIPS 2020, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout"), in torchjd 0.18's form (torchjd.aggregation.GradDrop).

For every coordinate p of the shared parameters' gradients, the positive sign purity of the T task
gradients decides, with one random draw U_p, which sign survives:

    P_p = (1 + sum_i g_ip / sum_i |g_ip|) / 2,    U_p ~ Uniform(0, 1)
    d_p = sum_i (leak + (1 - leak) M_ip) g_ip,    M_ip = (P_p > U_p and g_ip > 0) or (P_p < U_p and g_ip < 0)

It acts coordinate by coordinate, so it needs the T x P gradients themselves, not their Gram matrix
(common/gradient_rules.py:GradDrop). The draws come from the rule's own generator (--seed, checkpointed).

    python strategies/graddrop.py
    python strategies/graddrop.py --graddrop-leak 0.2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("graddrop", __doc__, aggregator="graddrop")
