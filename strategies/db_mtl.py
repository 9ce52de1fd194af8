"""db_mtl: DB-MTL, dual balancing (Lin et al., 2023, "Dual-Balancing for Multi-Task Learning"), as
LibMTL (LibMTL/weighting/DB_MTL.py).

Loss scale: the per-task gradients are those of log(L_t + 1e-8) (the heads train on them too).
Gradient magnitude: an EMA m_t of each task's log-loss gradient, then every task is rescaled to the
largest norm:

    m_t <- g_t + beta / k^beta_sigma * (m_t - g_t),    d = sum_t (max_s ||m_s|| / ||m_t||) m_t

The EMA lives on the gradients ([T, P], in the checkpoint): common/gradient_rules.py:DBMTL.

    python strategies/db_mtl.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULE_VERSION = 1  # stored in run records (common/versions.py): bump when this rule's results change

from common.multitask import run_every_task  # noqa: E402

if __name__ == "__main__":
    run_every_task("db_mtl", __doc__, aggregator="db_mtl")
