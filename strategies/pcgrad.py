"""pcgrad: projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman, Finn, NeurIPS 2020,
"Gradient Surgery for Multi-Task Learning").

For each task i, over the other tasks j in a random order: if g_i . g_j < 0, remove from g_i its
component along g_j:  g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j.  The shared update is sum_i g_i; the
task heads get their own gradients.

Each projected g_i is a combination of the original gradients, so the projections are done on the
T x T Gram matrix: one pass over the T x P gradients forms the Gram matrix, PCGrad runs in T x T
coefficient space, one pass writes sum_i c_i g_i into .grad (common/gradagg.py; the csrc/ kernel
where built).

--grad-space params (default, the published method): per-task gradients of all shared parameters.
--grad-space representation: per-task gradients of the fused representation z [B, 3H], one backward
through the trunk with the combined gradient: much cheaper, but there the per-task gradients are nearly
orthogonal (|cos| <= 0.05 measured), so PCGrad projects almost nothing and becomes close to the plain sum.
make compare shows both; make bench measures their cost. --pcgrad-reduction mean divides by T.

    python strategies/pcgrad.py
    python strategies/pcgrad.py --grad-space params --weighting uncertainty
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("pcgrad", __doc__, aggregator="pcgrad")
