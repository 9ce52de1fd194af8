"""gradnorm: GradNorm (Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018, "GradNorm: Gradient
Normalization for Adaptive Loss Balancing in Deep Multitask Networks").

Task weights w_t (summing to T) are learned so that each task's gradient norm on the last shared layer W
follows its relative training rate:

    G_t  = || grad_W (w_t L_t) ||                     per-task norms: the diagonal of the Gram matrix
    r_t  = (L_t / L_t(0)) / mean_s (L_s / L_s(0))     of the per-task gradients (common/gradagg.py,
    G_t* = mean(G) * r_t ** alpha   (constant)        the csrc/ kernel where built)
    w   <- Adam step on sum_t |G_t - G_t*|, then renormalise to sum T
    model update: sum_t w_t L_t

--grad-space params (default) takes W = the last shared layer (the LayerNorms after the pooling, see
HCAModel.last_shared_parameters), as the paper; its per-task gradients only need backward passes through
the heads, so it costs little. --grad-space representation uses the fused representation instead.

    python strategies/gradnorm.py
    python strategies/gradnorm.py --gradnorm-alpha 0.5
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change
# make compare --grid full tunes this flag with the learning rate (the default value first)
TUNE_GRID = ("--gradnorm-alpha", ["1.5", "0.5"])

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("gradnorm", __doc__, weighting="gradnorm")
