"""Small-sample statistics for paired comparisons over seeds (scipy; no protocol here).

Every function takes arrays (one entry per group, e.g. per task) so that a report of thousands
of simulated tasks is computed in one call. The choices, measured by the A/A simulation
(benchmarks/aa_simulation.py, numbers in benchmarks/README.md):

- per group: the paired t-interval and t-test of the mean difference (a percentile bootstrap
  over 3-5 seeds has 10-126 distinct resamples and covers only 60-80 %);
- several groups averaged (the Avg row): a t-interval on the mean of the group means, its
  standard error from the per-group variances and a Welch-Satterthwaite df, so a group with
  few seeds counts with its own uncertainty;
- power: the minimum detectable effect at 80 % power, alpha 0.05, from the noncentral t;
- probability of improvement: the share of seed pairs where a beats b, with a Clopper-Pearson
  ("exact") interval, which never covers less than its level.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 100_000


def t_tests(
    mean: np.ndarray, se: np.ndarray, df: np.ndarray, level: float = 1 - ALPHA
) -> dict[str, np.ndarray]:
    """Per group: t, two-sided p and the ``level`` t-interval of a mean with standard error
    ``se`` and ``df`` degrees of freedom. NaN where ``se`` is not positive or ``df`` < 1 (a
    single seed, or identical differences whose t would be rounding noise)."""
    mean, se, df = (np.asarray(x, dtype=float) for x in (mean, se, df))
    ok = np.isfinite(mean) & (se > 0) & (df >= 1)
    nan = np.full(mean.shape, np.nan)
    t, p, lo, hi = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    if ok.any():
        t[ok] = mean[ok] / se[ok]
        p[ok] = 2 * stats.t.sf(np.abs(t[ok]), df[ok])
        lo[ok], hi[ok] = stats.t.interval(level, df[ok], loc=mean[ok], scale=se[ok])
    return {"t": t, "p": p, "ci_low": lo, "ci_high": hi}


def paired(n: np.ndarray, mean: np.ndarray, sd: np.ndarray, level: float = 1 - ALPHA
           ) -> dict[str, np.ndarray]:
    """The paired t-test and t-interval per group from its n differences' mean and sample sd
    (``scipy.stats.ttest_1samp`` on each group's differences, without a Python loop)."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(n >= 2, np.asarray(sd, dtype=float) / np.sqrt(n), np.nan)
    return {"se": se, "df": n - 1, **t_tests(mean, se, n - 1, level)}


def welch_average(mean: np.ndarray, se: np.ndarray, df: np.ndarray) -> tuple[float, float, float]:
    """(mean, se, df) of the average of independent group means: ``se`` from the per-group
    standard errors, df by Welch-Satterthwaite. NaN se when a group has none."""
    mean, se, df = (np.asarray(x, dtype=float) for x in (mean, se, df))
    k = mean.size
    if not k or not np.all(np.isfinite(se) & (df >= 1)):
        return (float(mean.mean()) if k else np.nan), np.nan, np.nan
    var = se**2
    total = var.sum()
    df_w = total**2 / np.sum(var**2 / df) if total > 0 else np.nan
    return float(mean.mean()), float(np.sqrt(total) / k), float(df_w)


def holm(p_values: np.ndarray | list[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values; NaN stays NaN and is not counted as a test.
    (scipy has Benjamini-Hochberg, ``false_discovery_control``, but not Holm.)"""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        adj = np.maximum.accumulate((m - np.arange(m)) * q[order]).clip(max=1.0)
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


def power(effect_over_se: np.ndarray | float, df: np.ndarray | float, alpha: float = ALPHA
          ) -> np.ndarray:
    """Power of the two-sided t-test at ``alpha`` when the true mean is ``effect_over_se``
    standard errors from 0 (noncentral t)."""
    crit = stats.t.ppf(1 - alpha / 2, df)
    # The far lower tail is ~1e-16 and scipy's nct sometimes returns NaN for it: count it 0.
    lower = np.nan_to_num(stats.nct.cdf(-crit, df, effect_over_se))
    return stats.nct.sf(crit, df, effect_over_se) + lower


@functools.lru_cache(maxsize=4096)
def detectable_multiple(df: float, target: float = POWER, alpha: float = ALPHA) -> float:
    """The true mean, in standard errors, that the t-test with ``df`` finds with probability
    ``target`` (2.80 for large df; df >= 1, where it is below 50)."""
    return optimize.brentq(lambda d: float(power(d, df, alpha)) - target, 0.0, 50.0, xtol=1e-6)


def mde(se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Minimum detectable effect (80 % power, alpha 0.05) per group: NaN without a standard
    error."""
    se, df = np.asarray(se, dtype=float), np.asarray(df, dtype=float)
    out = np.full(se.shape, np.nan)
    ok = np.isfinite(se) & (df >= 1)
    if ok.any():
        mult = {d: detectable_multiple(float(d)) for d in np.unique(df[ok])}
        out[ok] = se[ok] * np.array([mult[d] for d in df[ok]])
    return out


def seeds_needed(effect: float, sd: np.ndarray, df_per_seed: np.ndarray | float = 1.0
                 ) -> np.ndarray:
    """Per group, the smallest number of seeds n at which ``effect`` is detected with 80 %
    power: the standard error is ``sd / sqrt(n)`` and the test has ``df_per_seed * (n - 1)``
    degrees of freedom (1 for one paired t-test; more for an average of several). NaN where
    ``sd`` is unknown, inf beyond :data:`MAX_SEEDS`; 2 at least (a t-test needs two)."""
    sd = np.asarray(sd, dtype=float)
    factor = np.broadcast_to(np.asarray(df_per_seed, dtype=float), sd.shape)
    out = np.full(sd.shape, np.nan)
    ok = np.isfinite(sd) & (sd >= 0) & np.isfinite(factor) & (factor > 0)
    if not ok.any() or effect == 0:
        return np.where(ok, np.inf, np.nan) if effect == 0 else out
    sd_ok, f_ok = sd[ok], factor[ok]
    # The normal approximation is a lower bound (t's tails are heavier): count up from it.
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    n = np.clip(np.ceil((z * sd_ok / abs(effect)) ** 2), 2, MAX_SEEDS + 1)
    todo = (sd_ok > 0) & (n <= MAX_SEEDS)
    while todo.any():
        with np.errstate(divide="ignore"):
            ratio = abs(effect) * np.sqrt(n[todo]) / sd_ok[todo]
        short = power(ratio, f_ok[todo] * (n[todo] - 1)) < POWER
        idx = np.flatnonzero(todo)
        n[idx[short]] += 1
        todo[idx[~short]] = False
        todo &= n <= MAX_SEEDS
    out[ok] = np.where(n > MAX_SEEDS, np.inf, n)
    return out


@functools.lru_cache(maxsize=4096)
def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return ci.low, ci.high


def prob_improvement(wins: np.ndarray, n: np.ndarray, level: float = 1 - ALPHA
                     ) -> dict[str, np.ndarray]:
    """Share of ``n`` seed pairs where a beats b (``wins``; a tie counts a half), with its
    Clopper-Pearson interval (half a win widens it: the low end of the wins rounded down, the
    high end of the wins rounded up). NaN without pairs."""
    wins, n = np.asarray(wins, dtype=float), np.asarray(n, dtype=int)
    share, lo, hi = (np.full(n.shape, np.nan) for _ in range(3))
    for i in np.flatnonzero(n > 0):
        share[i] = wins[i] / n[i]
        lo[i] = _clopper_pearson(int(np.floor(wins[i])), int(n[i]), level)[0]
        hi[i] = _clopper_pearson(int(np.ceil(wins[i])), int(n[i]), level)[1]
    return {"p_improve": share, "p_improve_low": lo, "p_improve_high": hi}
