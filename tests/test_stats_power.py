"""Issue 25's statistics against scipy / sklearn on known cases: the weighted AP of a clip resample, the
hierarchical bootstrap at each of its two levels alone, rliable's probability of improvement, the
replication rule and the minimum detectable effect."""
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import average_precision_score

from common import stats


def test_weighted_average_precision_is_sklearns_with_sample_weights_ties_included():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.15).astype(int)
    s = np.round(rng.random(400) + 0.4 * y, 1)          # rounded: many ties
    w = stats.clip_weights(400, 6, rng)
    ours = stats.weighted_average_precision(s, y, w)
    ref = [average_precision_score(y, s, sample_weight=row) for row in w]
    assert np.max(np.abs(ours - ref)) < 1e-12
    assert stats.weighted_average_precision(s, y, np.ones(400)) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert math.isnan(stats.weighted_average_precision(s, np.zeros(400), np.ones(400)))


def test_bootstrap_over_clips_alone_matches_scipy_bootstrap():
    # one seed: only the test clips vary, so the interval is scipy's paired percentile bootstrap of the AP difference
    rng = np.random.default_rng(1)
    n = 600
    y = (rng.random(n) < 0.2).astype(int)
    a, b = rng.random(n) + 0.8 * y, rng.random(n) + 0.6 * y
    w = stats.clip_weights(n, 4000, np.random.default_rng(2))
    ap_a = stats.bootstrap_task_ap(a[:, None], y[:, None], w)[None]      # [S=1, T=1, B]
    ap_b = stats.bootstrap_task_ap(b[:, None], y[:, None], w)[None]
    ours = stats.hierarchical_bootstrap(ap_a, ap_b, np.random.default_rng(3))

    def diff(idx):
        idx = idx.astype(int)
        return average_precision_score(y[idx], a[idx]) - average_precision_score(y[idx], b[idx])
    ref = sps.bootstrap((np.arange(n),), diff, vectorized=False, n_resamples=1500, method="percentile",
                        random_state=np.random.default_rng(4)).confidence_interval
    assert ours["low"] == pytest.approx(ref.low, abs=0.01) and ours["high"] == pytest.approx(ref.high, abs=0.01)
    assert ours["diff"] == pytest.approx(average_precision_score(y, a) - average_precision_score(y, b), abs=0.01)


def test_bootstrap_over_seeds_alone_matches_scipy_bootstrap():
    # no clip noise (every replicate the full test set): the interval is scipy's bootstrap of the mean over seeds
    rng = np.random.default_rng(5)
    d = rng.normal(0.02, 0.03, size=10)
    B = 4000
    a = np.repeat((0.5 + d)[:, None, None], B, axis=2)    # [S, T=1, B]
    b = np.full_like(a, 0.5)
    ours = stats.hierarchical_bootstrap(a, b, np.random.default_rng(6))
    ref = sps.bootstrap((d,), np.mean, n_resamples=B, method="percentile",
                        random_state=np.random.default_rng(7)).confidence_interval
    assert ours["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert ours["low"] == pytest.approx(ref.low, abs=0.002) and ours["high"] == pytest.approx(ref.high, abs=0.002)
    # a difference of one sign on every seed: p at its floor; none at all: p near 1
    assert ours["p"] < 0.1
    flat = stats.hierarchical_bootstrap(b + rng.normal(0, 1e-3, size=(10, 1, 1)), b, np.random.default_rng(8))
    assert flat["p"] > 0.05


def test_probability_of_improvement_is_mann_whitney_u_over_nm_averaged_over_tasks():
    rng = np.random.default_rng(9)
    x, y = rng.normal(0.1, 1, (10, 5)), rng.normal(0, 1, (12, 5))
    x[0, 0] = y[0, 0]                                    # a tie counts half
    per_task = [sps.mannwhitneyu(x[:, t], y[:, t]).statistic / (10 * 12) for t in range(5)]
    assert stats.probability_of_improvement(x, y) == pytest.approx(np.mean(per_task), abs=1e-12)
    p, low, high = stats.probability_of_improvement_interval(x, y, np.random.default_rng(10), n_boot=500)
    assert low <= p <= high and 0 <= low and high <= 1
    assert stats.probability_of_improvement(y + 100, y) == 1.0 and stats.probability_of_improvement(y, y + 100) == 0.0


def test_replication_needs_a_call_and_the_same_sign_on_both_halves():
    assert stats.replicated([0.02, 0.01], [0.03, 0.0], called=True)
    assert not stats.replicated([0.02, 0.01], [-0.03, 0.0], called=True)
    assert not stats.replicated([0.02, 0.01], [0.03, 0.01], called=False)


def test_minimum_detectable_effect_has_the_stated_power_by_the_noncentral_t_and_by_simulation():
    sd, n, alpha = 0.045, 10, 0.05 / 20
    mde = stats.minimum_detectable_effect(sd, n, alpha)
    df, crit = n - 1, sps.t.ppf(1 - alpha / 2, n - 1)
    nc = mde / sd * math.sqrt(n)
    assert sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc) == pytest.approx(0.8, abs=1e-6)
    rng = np.random.default_rng(11)
    diffs = rng.normal(mde, sd, size=(20000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > crit) == pytest.approx(0.8, abs=0.012)
    # many seeds: the t test approaches the normal formula (z_{1-a/2} + z_{0.8}) sd / sqrt(n)
    normal = (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(0.8)) * sd / math.sqrt(400)
    assert stats.minimum_detectable_effect(sd, 400, alpha) == pytest.approx(normal, rel=0.01)
