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
