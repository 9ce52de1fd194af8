"""aligned_mtl: Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, CVPR 2023, "Independent Component
Alignment for Multi-Task Learning").

The per-task gradients are aligned so that their matrix has condition number 1: from the eigen-
decomposition of the Gram matrix G = V diag(lambda) V^T, the aligned gradients are the principal
components rescaled to the smallest singular value sqrt(lambda_min); the update is their sum, which is
a combination sum_t w_t g_t of the original gradients (common/aggregators.py:aligned_mtl_weights).

    python strategies/aligned_mtl.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("aligned_mtl", __doc__, aggregator="aligned_mtl")
