"""Bootstrap confidence intervals for the studies (means, proportions, paired differences).

Small and dependency-free beyond torch: the studies in ``bench/`` report every
rate or mean with a 95 % interval, and a paired difference (the same story or
profile measured twice) with an interval that says whether the gap is real.
Randomness comes only from a local ``torch.Generator`` seeded by ``seed``: the
same data and seed give the same interval, and torch's global RNG is never used.

Example:
    >>> from cfgen.stats import bootstrap_mean, bootstrap_proportion, paired_difference
    >>> bootstrap_mean([1.0, 2.0, 3.0, 4.0], seed=0).estimate
    2.5
    >>> bootstrap_proportion([True, False, True, True]).estimate
    0.75
    >>> d = paired_difference([0.3, 0.5, 0.4], [0.3, 0.5, 0.4])
    >>> (d.estimate, d.low, d.high)
    (0.0, 0.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch

__all__ = ["Interval", "bootstrap", "bootstrap_mean", "bootstrap_proportion", "paired_difference"]

_METHODS = ("bca", "percentile")
_STATISTICS = ("mean", "median")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval ``[low, high]``.

    Example:
        >>> iv = Interval(estimate=0.1, low=0.02, high=0.18, n=50, level=0.95, method="bca", statistic="mean")
        >>> iv.excludes(0.0), str(iv)
        (True, '0.100 [0.020, 0.180]')
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float
    method: str
    statistic: str

    def excludes(self, value: float = 0.0) -> bool:
        """True when ``value`` lies outside the interval (e.g. a difference whose interval excludes 0)."""
        return value < self.low or value > self.high

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _values(x: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: a bootstrap interval needs at least one observation")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values: drop unparseable observations before calling")
    return t


def _statistic(x: torch.Tensor, statistic: str) -> torch.Tensor:
    """The statistic along the last dimension (median: the midpoint of the two middle values)."""
    if statistic == "mean":
        return x.mean(-1)
    return torch.quantile(x, 0.5, dim=-1)


def bootstrap(
    x: Sequence[float] | torch.Tensor,
    *,
    statistic: str = "mean",
    level: float = 0.95,
    resamples: int = 10_000,
    method: str = "bca",
    seed: int = 0,
) -> Interval:
    """Bootstrap interval for the mean or median of ``x`` (``method`` ``"bca"`` or ``"percentile"``).

    BCa (Efron 1987) corrects the percentile interval for bias (``z0``, from the
    share of resampled statistics below the estimate) and skew (acceleration
    ``a``, from the jackknife). When every observation is equal the interval has
    zero width at that value. Resampling indices come from a local
    ``torch.Generator(seed)``.

    Example:
        >>> iv = bootstrap([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], statistic="mean", seed=1)
        >>> iv.estimate, iv.low < 0.625 < iv.high
        (0.625, True)
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    if not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100 (10000 is usual), got {resamples!r}")
    values = _values(x, "x")
    n = values.numel()
    estimate = float(_statistic(values, statistic))
    if bool((values == values[0]).all()):
        # exact, not the rounded float sum: every resample equals the data, so the interval has zero width
        only = float(values[0])
        return Interval(only, only, only, n, level, method, statistic)

    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    boot = _statistic(values[idx], statistic)
    alpha = (1.0 - level) / 2.0
    probs = [alpha, 1.0 - alpha]
    if method == "bca":
        normal = NormalDist()
        # ties count half, so a statistic whose resamples often equal the estimate is not biased
        below = float((boot < estimate).double().mean() + 0.5 * (boot == estimate).double().mean())
        below = min(max(below, 1.0 / (resamples + 1)), resamples / (resamples + 1))
        z0 = normal.inv_cdf(below)
        # jackknife: the statistic with each observation left out
        if n > 1:
            keep = ~torch.eye(n, dtype=torch.bool)
            jack = _statistic(values.expand(n, n)[keep].view(n, n - 1), statistic)
            dev = jack.mean() - jack
            denom = 6.0 * float((dev**2).sum()) ** 1.5
            accel = float((dev**3).sum()) / denom if denom > 0 else 0.0
        else:
            accel = 0.0
        probs = []
        for p in (alpha, 1.0 - alpha):
            z = normal.inv_cdf(p)
            probs.append(normal.cdf(z0 + (z0 + z) / (1.0 - accel * (z0 + z))))
    q = torch.quantile(boot, torch.tensor(probs, dtype=torch.float64))
    low, high = float(q[0]), float(q[1])
    # an interval must contain its own estimate (BCa can push both ends past it for tiny, extreme samples)
    low, high = min(low, estimate), max(high, estimate)
    return Interval(estimate, low, high, n, level, method, statistic)


def bootstrap_mean(x: Sequence[float] | torch.Tensor, **kwargs) -> Interval:
    """Bootstrap interval for the mean of ``x`` (keywords as for :func:`bootstrap`).

    Example:
        >>> bootstrap_mean([2.0, 2.0, 2.0])
        Interval(estimate=2.0, low=2.0, high=2.0, n=3, level=0.95, method='bca', statistic='mean')
    """
    return bootstrap(x, statistic="mean", **kwargs)


def bootstrap_proportion(successes: Sequence[bool] | torch.Tensor, **kwargs) -> Interval:
    """Bootstrap interval for the share of true values in ``successes`` (booleans or 0 / 1).

    Example:
        >>> bootstrap_proportion([1, 1, 0, 1]).estimate
        0.75
    """
    values = _values(successes, "successes")
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("successes must be booleans or 0 / 1 values; use bootstrap_mean for other numbers")
    return bootstrap(values, statistic="mean", **kwargs)


def paired_difference(
    a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor, *, statistic: str = "mean", **kwargs
) -> Interval:
    """Bootstrap interval for the mean (or median) of the per-unit differences ``a[i] - b[i]``.

    ``a`` and ``b`` measure the same units (stories, profiles) under two
    conditions; resampling units keeps each pair together, so the shared
    per-unit variation cancels.

    Example:
        >>> d = paired_difference([0.9, 0.8, 0.7, 0.95], [0.6, 0.5, 0.7, 0.5])
        >>> round(d.estimate, 4), d.excludes(0.0)
        (0.2625, True)
    """
    va, vb = _values(a, "a"), _values(b, "b")
    if va.numel() != vb.numel():
        raise ValueError(f"paired samples must have equal lengths, got {va.numel()} and {vb.numel()}")
    return bootstrap(va - vb, statistic=statistic, **kwargs)

