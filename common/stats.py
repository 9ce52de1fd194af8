"""Statistics over seeds for make compare: intervals, paired tests against a baseline, Holm's correction,
ranks. The tests are scipy.stats'; this module only says which ones and how they are combined."""
import math
import warnings

import numpy as np
from scipy import stats


def finite(values):
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_interval(values, level=0.95):
    """(mean, std, half-width of the t interval of the mean) over seeds; the std and the interval are nan
    with fewer than two values."""
    v = np.asarray(finite(values))
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan"), float("nan")
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, v.size - 1) * sd / math.sqrt(v.size))
    return float(v.mean()), sd, half


def paired_tests(a, b):
    """Two-sided paired tests of a - b over seeds: {"t": p of Student's paired t-test (scipy ttest_rel),
    "wilcoxon": p of the Wilcoxon signed-rank test (scipy wilcoxon; exact for few seeds, zero differences
    dropped)}. A p is nan where the test is undefined: fewer than two pairs, or every difference 0 (no
    evidence either way). With n seeds the smallest possible Wilcoxon p is 2 / 2^n (0.25 for 3, 0.0625 for 5)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    if d.size < 2 or np.all(d == 0):
        return {"t": float("nan"), "wilcoxon": float("nan")}
    with warnings.catch_warnings():  # identical differences warn about precision; t is then infinite, p = 0
        warnings.simplefilter("ignore", RuntimeWarning)
        t = float(stats.ttest_rel(a, b).pvalue)
    return {"t": t, "wilcoxon": float(stats.wilcoxon(d, zero_method="wilcox").pvalue)}


def holm(pvalues):
    """Holm's step-down adjusted p-values (family-wise error control), same order as given; nan stays nan
    and is not counted in the family. Adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)) over the sorted ps."""
    p = np.asarray([np.nan if v is None else v for v in pvalues], dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="mergesort")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def mean_ranks(table):
    """table: {row: {column: value}} with higher better. Rank the rows within each column (1 = best, ties
    share their mean rank); returns {row: mean rank over the columns where the row has a value}."""
    rows = list(table)
    columns = sorted({c for r in rows for c in table[r]})
    ranks = {r: [] for r in rows}
    for c in columns:
        present = [r for r in rows if c in table[r] and table[r][c] is not None and not math.isnan(table[r][c])]
        if not present:
            continue
        col = stats.rankdata([-table[r][c] for r in present], method="average")
        for r, k in zip(present, col):
            ranks[r].append(float(k))
    return {r: (float(np.mean(v)) if v else float("nan")) for r, v in ranks.items()}


# ---------------------------------------------------------------- issue 25: test-set noise, power, replication
def weighted_average_precision(scores, labels, weights):
    """Average precision of one task for many weightings of the clips at once (a bootstrap over clips: a
    resampled test set is the original one with each clip counted as often as it was drawn).
    scores, labels: [N]; weights: [B, N] clip counts (or [N]). Returns [B] (or a float). Equals
    sklearn.metrics.average_precision_score(labels, scores, sample_weight=w) for each row w, ties included
    (tied scores form one threshold, as there); nan where a row weighs no positive."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    w = np.asarray(weights, np.float64)
    single = w.ndim == 1
    w = np.atleast_2d(w)
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order], w[:, order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]   # the last clip of each tied group
    tp = np.cumsum(w * y, axis=1)[:, ends]
    seen = np.cumsum(w, axis=1)[:, ends]
    positives = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / seen, 0.0)
        recall_step = np.diff(np.concatenate([np.zeros((w.shape[0], 1)), tp], axis=1), axis=1) / positives
        ap = np.sum(recall_step * precision, axis=1)
    ap = np.where(positives[:, 0] > 0, ap, np.nan)
    return float(ap[0]) if single else ap


def clip_weights(n_clips, n_boot, rng):
    """[n_boot, n_clips] counts of each clip in n_boot resamples with replacement (multinomial)."""
    return rng.multinomial(n_clips, np.full(n_clips, 1.0 / n_clips), size=n_boot).astype(np.float32)


def bootstrap_task_ap(scores, labels, weights):
    """[T, B]: each task's AP on each resampled test set; scores, labels [N, T]; weights [B, N]."""
    return np.stack([weighted_average_precision(scores[:, t], labels[:, t], weights) for t in range(labels.shape[1])])


def hierarchical_bootstrap(strategy_ap, baseline_ap, rng, level=0.95, observed=None):
    """The paired difference strategy - baseline over seeds and test clips, resampled at both levels.

    strategy_ap, baseline_ap: [S, T, B] per-task AP of each seed's run on each of B test-clip resamples
    (the same resamples for both: bootstrap_task_ap with shared weights); observed: [S, T] per-task
    differences on the full test set (default: their mean over the resamples). Each replicate b draws S seeds with replacement (pairs stay together) and uses clip resample
    b, so the interval holds both the seed-to-seed (training) noise and the test-set sampling noise.
    Returns {"diff": the observed mean difference of mean AP (full test set, all seeds), "low", "high": the
    percentile interval, "p": two-sided bootstrap p (twice the smaller tail beyond 0), "per_task": {t: (diff,
    low, high)} by index, "replicates": [B] mean-AP differences}."""
    a, b = np.asarray(strategy_ap, float), np.asarray(baseline_ap, float)
    S, T, B = a.shape
    d = a - b                                         # [S, T, B]
    seeds = rng.integers(0, S, size=(B, S))          # seed resample of each replicate
    per_task_reps = np.take_along_axis(d.transpose(2, 0, 1), seeds[:, :, None], axis=1).mean(axis=1)  # [B, T]
    reps = np.nanmean(per_task_reps, axis=1)        # mean AP over tasks
    observed_tasks = (d.mean(axis=2) if observed is None else np.asarray(observed, float)).mean(axis=0)   # [T]
    alpha = (1 - level) / 2

    def interval(x):
        return float(np.nanquantile(x, alpha)), float(np.nanquantile(x, 1 - alpha))
    low, high = interval(reps)
    tail = min(np.mean(reps <= 0), np.mean(reps >= 0))
    return {"diff": float(np.nanmean(observed_tasks)), "low": low, "high": high,
            "p": float(min(1.0, 2 * max(tail, 1.0 / B))),
            "per_task": [(float(observed_tasks[t]), *interval(per_task_reps[:, t])) for t in range(T)],
            "replicates": reps}


def probability_of_improvement(x, y):
    """P(X > Y) as rliable defines it (Agarwal et al., NeurIPS 2021): for each task the probability that a
    run of X scores above a run of Y (ties count half; the Mann-Whitney U over n*m), averaged over tasks.
    x: [n, T], y: [m, T] per-task scores of the runs (seeds)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    per_task = [(np.sum(x[:, None, t] > y[None, :, t]) + 0.5 * np.sum(x[:, None, t] == y[None, :, t]))
                / (x.shape[0] * y.shape[0]) for t in range(x.shape[1])]
    return float(np.mean(per_task))


def probability_of_improvement_interval(x, y, rng, n_boot=2000, level=0.95):
    """(P(X > Y), low, high): rliable's stratified bootstrap, the runs of X and of Y resampled separately."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    reps = [probability_of_improvement(x[rng.integers(0, len(x), len(x))], y[rng.integers(0, len(y), len(y))])
            for _ in range(n_boot)]
    alpha = (1 - level) / 2
    return probability_of_improvement(x, y), float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))


def replicated(diffs_first, diffs_second, called):
    """The replication rule of issue 25: a called difference (Holm-significant) holds only when the mean
    difference has the same sign on both halves of the seeds (two independent replications)."""
    if not called:
        return False
    m1, m2 = float(np.mean(diffs_first)), float(np.mean(diffs_second))
    return bool(m1 != 0 and np.sign(m1) == np.sign(m2))


def paired_t_power(effect, sd, n, alpha):
    """Power of the two-sided paired t-test at level alpha with n pairs, a true mean difference `effect` and
    a per-pair standard deviation sd (the noncentral t distribution)."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect / sd * math.sqrt(n)
    upper, lower = stats.nct.sf(crit, df, nc), stats.nct.cdf(-crit, df, nc)
    # scipy's nct gives nan far in a tail, where the probability is 0 (lower, nc > 0) or 1 (upper)
    lower = 0.0 if math.isnan(lower) else lower
    upper = (1.0 if nc > crit else 0.0) if math.isnan(upper) else upper
    return float(upper + lower)


def minimum_detectable_effect(sd, n, alpha, power=0.8):
    """The smallest true mean difference that the paired t-test with n seeds detects with this power at
    level alpha (for Holm over m comparisons the first step's alpha / m is the strictest: use that)."""
    from scipy.optimize import brentq
    if n < 2 or not sd > 0:
        return float("nan")
    guess = (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / math.sqrt(n)   # the normal formula
    high = guess
    while paired_t_power(high, sd, n, alpha) < power:   # the t test needs a little more than the normal one
        high *= 2
    return float(brentq(lambda e: paired_t_power(e, sd, n, alpha) - power, 1e-9 * guess, high))
