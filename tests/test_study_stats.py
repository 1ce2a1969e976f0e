"""cfgen.stats: bootstrap intervals checked against known answers on synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from cfgen.stats import Interval, bootstrap, bootstrap_mean, bootstrap_proportion, paired_difference


def _draws(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return 2.0 + 3.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    # Exponential(1) (mean 1, skewed): where BCa's skew correction matters
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log(u)


@pytest.mark.parametrize("method", ["bca", "percentile"])
@pytest.mark.parametrize("kind,true_mean", [("normal", 2.0), ("exponential", 1.0)])
def test_coverage_of_the_true_mean(method, kind, true_mean):
    # 400 synthetic samples of n=60: the binomial sd of the coverage at 0.95 is 0.011; the bootstrap's own
    # small-sample undercoverage is about 1-2 points for the exponential. Accept [0.90, 0.99].
    gen = torch.Generator().manual_seed(123)
    reps, hits = 400, 0
    for r in range(reps):
        iv = bootstrap_mean(_draws(kind, 60, gen), method=method, resamples=2000, seed=r)
        hits += iv.low <= true_mean <= iv.high
    assert 0.90 <= hits / reps <= 0.99, (kind, method, hits / reps)


def test_proportion_coverage():
    # true p = 0.3, n = 100: the normal-theory coverage of a percentile bootstrap is close to 0.95.
    gen = torch.Generator().manual_seed(7)
    reps, hits = 400, 0
    for r in range(reps):
        x = torch.rand(100, generator=gen) < 0.3
        iv = bootstrap_proportion(x, resamples=2000, seed=r)
        hits += iv.low <= 0.3 <= iv.high
    assert 0.90 <= hits / reps <= 0.99, hits / reps


def test_large_sample_matches_the_normal_interval():
    # n = 2000 normal draws: the bootstrap interval of the mean approaches mean +- 1.96 s / sqrt(n).
    gen = torch.Generator().manual_seed(5)
    x = _draws("normal", 2000, gen)
    half = 1.959964 * float(x.std()) / math.sqrt(x.numel())
    for method in ("bca", "percentile"):
        iv = bootstrap_mean(x, method=method, resamples=20000, seed=1)
        assert iv.estimate == pytest.approx(float(x.mean()), abs=1e-12)
        assert iv.low == pytest.approx(iv.estimate - half, abs=0.06 * half)
        assert iv.high == pytest.approx(iv.estimate + half, abs=0.06 * half)


def test_proportion_matches_the_wald_width():
    # 120 successes of 400: sd of the mean is sqrt(p (1 - p) / n) (the bootstrap uses the plug-in p).
    x = torch.zeros(400)
    x[:120] = 1
    iv = bootstrap_proportion(x, resamples=20000, seed=3)
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 400)
    assert iv.estimate == pytest.approx(0.3)
    assert iv.high - iv.low == pytest.approx(2 * half, rel=0.06)


def test_identical_pairs_give_an_exact_zero_width_interval():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=gen, dtype=torch.float64)
    for method in ("bca", "percentile"):
        d = paired_difference(a, a.clone(), method=method)
        assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
        assert not d.excludes(0.0)


def test_constant_data_and_all_or_nothing_proportions():
    assert bootstrap_mean([0.7] * 9) == Interval(0.7, 0.7, 0.7, 9, 0.95, "bca", "mean")
    for v in (0, 1):
        iv = bootstrap_proportion([v] * 30)
        assert (iv.low, iv.estimate, iv.high) == (v, v, v)


def test_paired_difference_removes_shared_variation():
    # a and b share a large per-unit effect; their difference is 0.1 + small noise. The paired interval is
    # narrow and excludes 0; an unpaired comparison of the two means would not be able to tell.
    gen = torch.Generator().manual_seed(11)
    unit = 10 * torch.randn(80, generator=gen, dtype=torch.float64)
    b = unit
    a = unit + 0.1 + 0.05 * torch.randn(80, generator=gen, dtype=torch.float64)
    d = paired_difference(a, b)
    assert d.estimate == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert d.excludes(0.0) and d.low > 0.05 and d.high < 0.15
    # sign: paired_difference(a, b) is a - b
    assert paired_difference(b, a).estimate == pytest.approx(-d.estimate, abs=1e-12)


def test_median_statistic():
    x = [1.0, 2.0, 3.0, 4.0, 100.0]
    iv = bootstrap(x, statistic="median", seed=0)
    assert iv.estimate == 3.0 and iv.low <= 3.0 <= iv.high and iv.high <= 100.0
    assert bootstrap([1.0, 2.0, 3.0, 4.0], statistic="median").estimate == 2.5


def test_deterministic_and_global_rng_untouched():
    x = torch.linspace(0, 1, 37) ** 2
    state = torch.random.get_rng_state()
    a, b = bootstrap_mean(x, seed=4), bootstrap_mean(x, seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == b
    assert bootstrap_mean(x, seed=5) != a  # another seed gives other resamples
    assert a.low <= a.estimate <= a.high


def test_level_widens_the_interval():
    x = torch.arange(40, dtype=torch.float64) % 7
    narrow, wide = bootstrap_mean(x, level=0.8), bootstrap_mean(x, level=0.99)
    assert wide.low < narrow.low and wide.high > narrow.high


@pytest.mark.parametrize("call,match", [
    (lambda: bootstrap_mean([]), "empty"),
    (lambda: bootstrap_mean([1.0, float("nan")]), "NaN"),
    (lambda: bootstrap_mean([1.0, 2.0], level=95), "level"),
    (lambda: bootstrap_mean([1.0, 2.0], method="bootstrap-t"), "method"),
    (lambda: bootstrap([1.0, 2.0], statistic="mode"), "statistic"),
    (lambda: bootstrap_mean([1.0, 2.0], resamples=10), "resamples"),
    (lambda: bootstrap_proportion([0.5, 1.0]), "0 / 1"),
    (lambda: paired_difference([1.0, 2.0], [1.0]), "equal lengths"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
