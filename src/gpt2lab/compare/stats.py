"""Statistics over seeds (or timing rounds): the unit of replication is the seed, and a comparison is paired.

For a metric m and seeds s = 1..n, d_s = m(variant, s) - m(reference, s). ``paired`` reports the mean of d,
its 95% t-interval ``mean ± t(0.975, n-1) sd / sqrt(n)``, the minimal detectable difference at 80% power
``MDD80 = (t(0.975, n-1) + t(0.80, n-1)) sd / sqrt(n)`` (the true difference a two-sided 5% paired t-test finds
about four times in five: the usual approximation, 79% exactly at n = 5 and 73% at n = 2), and a verdict: the
interval entirely on one side of 0 names that side; otherwise "no difference detected", never "the same".
Differences without spread (the same in every seed, as accuracies at their ceiling) admit no t-test: no
p-value, no MDD80, and the verdict says so (with the side, if any). ``holm`` marks which of a family of
verdicts survive Holm's correction. A share (a ratio of two paired means, such as the part of a gap that
training closed) has Fieller's interval: the ratios R that a paired t-test of numerator - R x denominator does
not reject.
"""

from __future__ import annotations

import math
import statistics

from scipy.special import stdtr, stdtrit  # Student t CDF and quantile (scipy.stats imports far more)

NO_DIFFERENCE = "no difference detected"
LEVEL = 0.05  # two-sided test level of every interval and verdict


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    return float(stdtrit(df, p))


def interval(values: list[float], bounds: tuple[float, float] | None = None) -> dict:
    """Mean of ``values`` with its 95% t-interval (none when n = 1), sd and n. ``bounds``: the range the
    quantity cannot leave (a fraction: (0, 1)); the interval is cut to it, which keeps its coverage."""
    n = len(values)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"cannot take an interval of values that are not all finite: {values}")
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(values)
    half = t_quantile(1 - LEVEL / 2, n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"n": n, "mean": mean, "sd": sd, "lo": lo, "hi": hi}


def paired(
    variant: list[float],
    reference: list[float],
    below: str = "better",
    above: str = "worse",
    bounds: tuple[float, float] | None = None,
) -> dict:
    """Paired comparison of ``variant`` with ``reference`` (same seeds, same order): mean difference, 95%
    interval, MDD80, two-sided p-value, and the verdict (``below`` when the whole interval is below 0,
    ``above`` when above, else "no difference detected"). Fewer than two pairs give no interval.
    ``bounds``: the range a difference cannot leave (of two fractions: (-1, 1)), as in ``interval``."""
    if len(variant) != len(reference):
        raise ValueError(f"paired values need the same seeds: {len(variant)} vs {len(reference)}")
    return differences([v - r for v, r in zip(variant, reference, strict=True)], below, above, bounds)


def differences(
    d: list[float], below: str = "better", above: str = "worse", bounds: tuple[float, float] | None = None
) -> dict:
    """``paired`` for differences already taken (e.g. log-ratios of alternated timings)."""
    out = interval(d, bounds) | {"values": d}
    n = len(d)
    if n < 2:
        return out | {"mdd80": None, "p": None, "verdict": "n/a (one pair: no interval)"}
    se = out["sd"] / math.sqrt(n)
    if se == 0:  # every difference the same: no spread to test against
        side = "the same" if out["mean"] == 0 else f"{below if out['mean'] < 0 else above} by the same amount"
        return out | {"mdd80": None, "p": None, "verdict": f"{side} in every seed (no spread: untested)"}
    out["mdd80"] = (t_quantile(1 - LEVEL / 2, n - 1) + t_quantile(0.80, n - 1)) * se
    out["p"] = 2 * float(stdtr(n - 1, -abs(out["mean"]) / se))
    if out["hi"] < 0:
        out["verdict"] = below
    elif out["lo"] > 0:
        out["verdict"] = above
    else:
        out["verdict"] = NO_DIFFERENCE
    return out


def ratio_of_means(numerator: list[float], denominator: list[float]) -> dict:
    """mean(numerator) / mean(denominator), both paired over the same seeds, with Fieller's 95% interval: every
    R for which the differences numerator - R x denominator have a t-interval that holds 0, i.e. the R with
    (m_a - R m_b)^2 <= q (S_aa - 2 R S_ab + R^2 S_bb), q = t^2 / n. The interval is bounded only where the
    denominator's own t-interval excludes 0; otherwise (and with one seed) lo and hi are None."""
    n = len(numerator)
    if n != len(denominator):
        raise ValueError(f"a ratio of paired means needs the same seeds: {n} vs {len(denominator)}")
    ma, mb = statistics.fmean(numerator), statistics.fmean(denominator)
    out = {"n": n, "mean": ma / mb, "lo": None, "hi": None}
    if n < 2:
        return out
    saa, sbb = statistics.variance(numerator), statistics.variance(denominator)
    sab = statistics.covariance(numerator, denominator)
    q = t_quantile(1 - LEVEL / 2, n - 1) ** 2 / n
    a, b, c = mb * mb - q * sbb, ma * mb - q * sab, ma * ma - q * saa
    if a <= 0:  # the denominator is not detected away from 0: no bounded interval
        return out
    root = math.sqrt(max(b * b - a * c, 0.0))  # >= 0 whenever a > 0: R = m_a / m_b satisfies the inequality
    return out | {"lo": (b - root) / a, "hi": (b + root) / a}


def holm(p_values: list[float | None], level: float = LEVEL) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family level ``level`` (None or NaN: not
    tested, never rejected)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    rejected = [False] * len(p_values)
    m = len(tested)
    for rank, (p, i) in enumerate(tested):
        if p > level / (m - rank):
            break
        rejected[i] = True
    return rejected
