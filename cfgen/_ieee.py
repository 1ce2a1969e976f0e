"""float32 log / exp / log-softmax built only from IEEE-754 basic operations.

Every function here uses +, -, *, /, comparisons, selects, exact integer
arithmetic and int <-> float conversions, each correctly rounded by IEEE-754 on
every CPU and GPU. No library ``log`` or ``exp`` (whose last bits differ
between libm, SLEEF and CUDA) and no reduction whose result depends on
summation order. So the eager torch code below and its C twin in
``_native.c`` give the same bits on any device; ``tests/test_ieee.py`` checks
both against float64 references (a few ulps) and against each other (exactly).

Edits here must be mirrored in ``_native.c`` operation for operation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["log32", "exp32", "log1p32", "gumbel_from_bits", "log_softmax32", "truncated_gumbel"]


def _f32(x: float) -> float:
    # The float32 value nearest to x, as a Python float, so torch scalars and C literals agree.
    return torch.tensor(x, dtype=torch.float32).item()


LN2_HI = 0.693145751953125  # ln 2 rounded to 16 bits: n * LN2_HI is exact for |n| < 256
LN2_LO = _f32(math.log(2) - LN2_HI)
LOG2E = _f32(1 / math.log(2))
C3, C5, C7, C9 = (_f32(1 / k) for k in (3, 5, 7, 9))
E2, E3, E4, E5, E6, E7 = (_f32(1 / math.factorial(k)) for k in range(2, 8))
SQRT2_BITS = 0x3FB504F3  # float32 sqrt(2)
SQRT2M1 = _f32(math.sqrt(2) - 1)
ONE_MINUS_SQRT_HALF = _f32(1 - math.sqrt(0.5))
EXP_FLOOR = -86.0  # exp32(x) is 0 below this, so every result is a normal float32
TAIL = -9.0  # softplus(z) by its series below this


def _log_core(f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    # log(2**e * (1 + f)) for f in [sqrt(1/2) - 1, sqrt(2) - 1]: 2 atanh(s) with
    # s = f / (2 + f), |s| <= 0.172, as 2s(1 + s^2/3 + ... + s^8/9) (next term < 3e-9).
    s = f / (f + 2.0)
    z = s * s
    p = (((z * C9 + C7) * z + C5) * z + C3) * z + 1.0
    ef = e.to(torch.float32)
    return ef * LN2_HI + (ef * LN2_LO + (s + s) * p)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x = 2**e * (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)); x positive and normal.
    bits = x.view(torch.int32)
    big = ((bits & 0x7FFFFF) | 0x3F800000) > SQRT2_BITS
    e = (bits >> 23) - 127 + big.to(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000) - (big.to(torch.int32) << 23)
    return m.view(torch.float32) - 1.0, e


def log32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive, normal float32 values (within 3 ulp)."""
    return _log_core(*_split(x))


def log1p32(t: torch.Tensor) -> torch.Tensor:
    """log(1 + t) for float32 t in [0, 1], accurate for tiny t."""
    f, e = _split(t + 1.0)
    small = t <= SQRT2M1
    return _log_core(torch.where(small, t, f), torch.where(small, 0, e))


def exp32(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for float32 x <= 0 (``-inf`` allowed); exactly 0 below -86."""
    xc = x.clamp(min=EXP_FLOOR)
    n = torch.round(xc * LOG2E)  # round half to even, as C's rintf
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = (((((r * E7 + E6) * r + E5) * r + E4) * r + E3) * r + E2) * r + 1.0
    p = p * r + 1.0
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(x < EXP_FLOOR, 0.0, p * scale)


def gumbel_from_bits(x: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) values from 32-bit hash values (int64 in [0, 2**32)).

    The top bit picks the side of u = 1/2 and the low 31 bits the distance t
    from the near end, so both u and 1 - u keep full relative precision:
    E = -log(1 - u) is Exp(1) and G = -log(E).
    """
    t = ((x & 0x7FFFFFFF).to(torch.int32).to(torch.float32) + 0.5) * 2.0**-32  # (0, 1/2]
    low = (x >> 31) == 0  # u = t; otherwise 1 - u = t
    series = low & (t <= ONE_MINUS_SQRT_HALF)  # log(1 - t) = log(1 + f) with f = -t exactly
    f, e = _split(torch.where(low, 1.0 - t, t))
    e_ = _log_core(torch.where(series, -t, f), torch.where(series, 0, e)).neg()
    return log32(e_).neg()


def log_softmax32(z: torch.Tensor) -> torch.Tensor:
    """``z - logsumexp(z)`` over the last axis, independent of summation order.

    The sum of ``exp32(z - max)`` is taken in 64-bit fixed point (exact,
    associative), so every backend and block size gives the same bits.
    ``-inf`` entries stay ``-inf``; every row needs one finite entry.
    """
    d = z - z.amax(dim=-1, keepdim=True)
    return d - log32(fixed_point_sum(exp32(d)))[..., None]


def fixed_point_sum(p: torch.Tensor) -> torch.Tensor:
    """Sum of float32 values in [0, 1] along the last axis, in exact fixed point.

    Each value is truncated to a multiple of ``2**-fixed_point_bits(V)`` (far
    below float32 resolution), the integers are added exactly, and the total
    is rounded to float32 (via float64, as the C twin does).
    """
    bits = fixed_point_bits(p.shape[-1])
    total = (p * 2.0**bits).to(torch.int64).sum(dim=-1)
    return total.to(torch.float64).to(torch.float32) * 2.0**-bits


def fixed_point_bits(vocab: int) -> int:
    """Fraction bits of the fixed-point sum: 46, fewer for vocabularies over 2**16 (no int64 overflow)."""
    if vocab > 2**23:
        raise ValueError(f"a vocabulary of {vocab} entries is larger than cfgen supports (2**23)")
    return min(46, 62 - max(1, (vocab - 1).bit_length()))


def truncated_gumbel(a: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Noise ``U`` with ``a + U`` a Gumbel(a, 1) truncated below ``m`` (``g`` the untruncated noise).

    ``g - softplus(a + g - m)``: no cancellation for large ``|a|``; ``a = -inf``
    gives ``g``. Below ``z = -9`` softplus is ``log1p(e^z)`` by its series to t^3
    (relative error under 1e-12), which most of the vocabulary takes.
    """
    z = (a + g) - m
    t = exp32(-z.abs())
    series = ((t * C3 - 0.5) * t + 1.0) * t
    return g - torch.where(z <= TAIL, series, z.clamp(min=0.0) + log1p32(t))
