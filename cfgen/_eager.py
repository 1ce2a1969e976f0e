"""The eager (pure torch) kernels: key derivation, Gumbel noise and the hindsight posterior.

This module sits below ``noise``, ``posterior``, ``sampler`` and ``_native``
(it imports only ``_ieee``), so the native self-check and the public modules
can all use it without an import circle.

``_ieee`` states the arithmetic as readable whole-tensor expressions; the
fast functions here perform the very same IEEE-754 operations on the same
operands in the same order, so they give the same bits (tests compare them
with ``_ieee`` and with the C kernel), but

* on 32-bit integer lanes instead of int64 (the hash multiplies wrap modulo
  2**32; ``_int32_wraps`` checks once per device type that they do, else the
  int64 hash is used),
* with selects as integer bit masks (``torch.where`` and boolean tensors cost
  several times an arithmetic pass),
* in place, in preallocated buffers, one cache-sized block of rows at a time
  on CPU (each pass then reads and writes cache, not main memory),
* and, in the posterior, with the exact softplus only on the tokens above
  ``TAIL`` (gathered, computed by ``_ieee``'s own formula, put back); every
  other token takes the series tail (the formula is elementwise, so this
  changes no value).

Every torch call here is one correctly rounded IEEE operation per element (no
``addcmul`` / ``lerp`` style fused calls whose kernels may contract into an
FMA).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _ieee
from ._ieee import (
    C3,
    C5,
    C7,
    C9,
    E2,
    E3,
    E4,
    E5,
    E6,
    E7,
    EXP_FLOOR,
    LN2_HI,
    LN2_LO,
    LOG2E,
    SQRT2_BITS,
    TAIL,
    fixed_point_bits,
)

__all__ = ["row_keys", "bits", "gumbel", "log_softmax", "posterior", "ensure_argmax"]

_M32 = 0xFFFFFFFF
# Multipliers of a low-bias 32-bit integer hash (shift 16 / 15 / 15); both are
# below 2**31, so a 32-bit value times either stays below 2**63.
_C1 = 0x21F0AAAD
_C2 = 0x735A2D97
_GOLDEN = 0x1E3779B9  # an odd constant below 2**31 that breaks the mix's fixed point at 0
_INT32_MIN = -(2**31)


def _f32_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


_ONE_MINUS_SQRT_HALF_BITS = _f32_bits(_ieee.ONE_MINUS_SQRT_HALF)
_SQRT2M1_BITS = _f32_bits(_ieee.SQRT2M1)
# Elements per block of rows: on CPU about 1 MiB per buffer, so the eight scratch buffers stay in
# cache (measured best between 2**17 and 2**20 on a 2-core EPYC); on GPUs large, to bound scratch memory.
_BLOCK = 1 << 18
_DEVICE_BLOCK = 1 << 24


def _block_rows(device: torch.device, rows: int, vocab: int) -> int:
    return max(1, min(rows, (_BLOCK if device.type == "cpu" else _DEVICE_BLOCK) // vocab))


# ---------------------------------------------------------------- keys (small tensors, int64)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def _absorb(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _mix32((key + (value & _M32) + _GOLDEN) & _M32)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit row keys (int64 in [0, 2**32)) of each (seed, step) under ``stream``."""
    key = _absorb(torch.zeros_like(seeds), seeds & _M32)
    key = _absorb(key, (seeds >> 32) & _M32)
    if stream:  # absorbed on its own, after the seed: (seed s, stream k) must not alias (seed s + k, stream 0)
        key = _absorb(key, torch.full_like(key, stream & _M32))
    key = _absorb(key, steps & _M32)
    key = _absorb(key, (steps >> 32) & _M32)
    return key, _absorb(key, torch.full_like(key, 0x5BD1E995 & 0x7FFFFFFF))


# ---------------------------------------------------------------- the hash, int64 lanes (reference)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    x ^= x >> 16
    x.mul_(_C1).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(_C2).bitwise_and_(_M32)
    x ^= x >> 15
    return x


def bits(k1: torch.Tensor, k2: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash (int64 in [0, 2**32)) of each row key pair and token id: ``[len(k1), len(token)]``."""
    # Two keyed rounds: with one, rows whose keys differ in low bits would share
    # a permuted copy of each other's noise.
    x = token[None, :] ^ k1[:, None]
    _mix32_(x)
    x ^= k2[:, None]
    return _mix32_(x)


# ---------------------------------------------------------------- the hash, int32 lanes


def _as_int32(k: torch.Tensor) -> torch.Tensor:
    # [0, 2**32) -> the int32 with the same 32 bits, by exact int64 arithmetic
    return (k - ((k >> 31) << 32)).to(torch.int32)


def _mix32_i32_(x: torch.Tensor, s: torch.Tensor) -> None:
    # _mix32 on the 32 bits of int32 lanes: arithmetic shifts masked to logical ones,
    # products taken modulo 2**32 by int32 wrap-around (checked by _int32_wraps).
    torch.bitwise_right_shift(x, 16, out=s)
    x ^= s.bitwise_and_(0xFFFF)
    x.mul_(_C1)
    torch.bitwise_right_shift(x, 15, out=s)
    x ^= s.bitwise_and_(0x1FFFF)
    x.mul_(_C2)
    torch.bitwise_right_shift(x, 15, out=s)
    x ^= s.bitwise_and_(0x1FFFF)


def _bits_i32_(k1: torch.Tensor, k2: torch.Tensor, token: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> None:
    """``bits`` as int32 lanes into ``x`` ([n, V] int32); k1, k2 int32 [n], token int32 [V]."""
    torch.bitwise_xor(token[None, :], k1[:, None], out=x)
    _mix32_i32_(x, s)
    x ^= k2[:, None]
    _mix32_i32_(x, s)


@functools.cache
def _int32_wraps(device_type: str) -> bool:
    """Whether int32 products wrap modulo 2**32 on this device type (then the int32 hash equals the int64 one)."""
    device = torch.device(device_type)
    g = torch.Generator().manual_seed(0)
    k = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1]), torch.randint(0, 2**32, (1019,), generator=g)])
    k1, k2 = k.to(device), k.flip(0).to(device)
    token = torch.arange(67, device=device)
    x = torch.empty(len(k), 67, dtype=torch.int32, device=device)
    _bits_i32_(_as_int32(k1), _as_int32(k2), token.to(torch.int32), x, torch.empty_like(x))
    return torch.equal(x.to(torch.int64) & _M32, bits(k1, k2, token))


# ---------------------------------------------------------------- IEEE functions on buffers


class _Work:
    """Scratch buffers for one block shape, reused across blocks (fresh memory costs page faults)."""

    def __init__(self, shape, device):
        self.shape = tuple(shape)
        self.f = [torch.empty(self.shape, dtype=torch.float32, device=device) for _ in range(5)]
        self.i = [torch.empty(self.shape, dtype=torch.int32, device=device) for _ in range(3)]

    def fit(self, rows: int) -> _Work:
        if rows == self.shape[0]:
            return self
        view = _Work.__new__(_Work)
        view.shape = (rows,) + self.shape[1:]
        view.f = [b[:rows] for b in self.f]
        view.i = [b[:rows] for b in self.i]
        return view


def _i(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _split_(x: torch.Tensor, f: torch.Tensor, e: torch.Tensor, s: torch.Tensor) -> None:
    """``_ieee._split`` of positive normal ``x``: ``f`` (float32) and ``e`` (int32); ``s`` int32 scratch."""
    xi, fi = _i(x), _i(f)
    torch.bitwise_and(xi, 0x7FFFFF, out=fi)
    fi.bitwise_or_(0x3F800000)  # the mantissa as a float in [1, 2)
    torch.sub(fi, SQRT2_BITS + 1, out=s)
    s.bitwise_right_shift_(31)  # -1 where the mantissa <= sqrt(2) ("not big"), else 0
    torch.bitwise_right_shift(xi, 23, out=e)
    e.add_(s).sub_(126)  # (bits >> 23) - 127 + big
    fi.sub_(0x800000).add_(s.bitwise_and_(0x800000))  # mantissa - (big << 23)
    f.sub_(1.0)


def _log_core_(f: torch.Tensor, e: torch.Tensor, out: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """``_ieee._log_core(f, e)`` into ``out``; ``f`` is overwritten, ``w1``, ``w2`` float32 scratch."""
    s = w1
    torch.add(f, 2.0, out=s)
    torch.div(f, s, out=s)
    z = f
    torch.mul(s, s, out=z)
    p = w2
    torch.mul(z, C9, out=p)
    p.add_(C7).mul_(z).add_(C5).mul_(z).add_(C3).mul_(z).add_(1.0)
    ef = z
    ef.copy_(e)  # int32 -> float32, exact
    torch.mul(ef, LN2_HI, out=out)
    ef.mul_(LN2_LO)
    s.add_(s).mul_(p)
    ef.add_(s)
    out.add_(ef)


def _log32_(x: torch.Tensor, out: torch.Tensor, wf: list, wi: list) -> None:
    """``_ieee.log32(x)`` into ``out`` (may be ``x``); ``wf`` three float32, ``wi`` two int32 scratch buffers."""
    f, e, s = wf[0], wi[0], wi[1]
    _split_(x, f, e, s)
    _log_core_(f, e, out, wf[1], wf[2])


def _gumbel_from_bits_i32_(x: torch.Tensor, out: torch.Tensor, w: _Work) -> None:
    """``_ieee.gumbel_from_bits`` of int32 hash lanes ``x`` (consumed) into float32 ``out``."""
    t, r, f1 = w.f[0], w.f[1], w.f[2]
    e, s = w.i[1], w.i[2]
    ti, ri = _i(t), _i(r)
    torch.bitwise_and(x, 0x7FFFFFFF, out=e)
    t.copy_(e)  # int32 -> float32, rounded as .to(float32)
    t.add_(0.5).mul_(2.0**-32)
    x.bitwise_right_shift_(31).bitwise_not_()  # -1 where the top bit is 0 ("low": u = t), else 0
    torch.neg(t, out=r)
    r.add_(1.0)  # 1 - t
    ri ^= ti
    ri &= x
    ri ^= ti  # low ? 1 - t : t
    # series = low & (t <= 1 - sqrt(1/2)): t is positive, so its bits order as integers
    torch.sub(ti, _ONE_MINUS_SQRT_HALF_BITS + 1, out=s)
    s.bitwise_right_shift_(31).bitwise_and_(x)
    ser = x
    ser.copy_(s)
    _split_(r, f1, e, s)  # f1, e
    t.neg_()  # -t
    ti ^= _i(f1)
    ti &= ser
    _i(f1).bitwise_xor_(ti)  # series ? -t : f
    e &= ser.bitwise_not_()  # series ? 0 : e
    _log_core_(f1, e, out, t, r)
    out.neg_()
    _log32_(out, out, [f1, t, r], [e, s])
    out.neg_()


def _exp32_(x: torch.Tensor, out: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: torch.Tensor) -> None:
    """``_ieee.exp32(x)`` (x <= 0, -inf allowed) into ``out``; ``x`` kept; float32 ``w1``, ``w2``, int32 ``s`` scratch."""
    xc, n = w1, w2
    torch.clamp(x, min=EXP_FLOOR, out=xc)
    torch.mul(xc, LOG2E, out=n)
    torch.round(n, out=n)  # half to even
    torch.mul(n, LN2_HI, out=out)
    xc.sub_(out)
    torch.mul(n, LN2_LO, out=out)
    r = xc
    r.sub_(out)
    p = out
    torch.mul(r, E7, out=p)
    p.add_(E6).mul_(r).add_(E5).mul_(r).add_(E4).mul_(r).add_(E3).mul_(r).add_(E2).mul_(r).add_(1.0)
    p.mul_(r).add_(1.0)
    s.copy_(n)  # exact: n is an integer in [-124, 0]
    s.add_(127).bitwise_left_shift_(23)
    p.mul_(s.view(torch.float32))
    # zero below the floor: x < -86 exactly when x + 86 is negative (-inf included; -86 gives +0)
    torch.add(x, -EXP_FLOOR, out=w1)
    torch.bitwise_right_shift(_i(w1), 31, out=s)
    _i(p).bitwise_and_(s.bitwise_not_())


# ---------------------------------------------------------------- Gumbel noise


def gumbel(k1: torch.Tensor, k2: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[len(k1), vocab_size]`` float32 Gumbel noise for row keys ``k1``, ``k2`` (int64 in [0, 2**32))."""
    device = k1.device
    rows = len(k1)
    out = torch.empty(rows, vocab_size, dtype=torch.float32, device=device)
    if rows == 0:
        return out
    block = _block_rows(device, rows, vocab_size)
    work = _Work((block, vocab_size), device)
    token = torch.arange(vocab_size, dtype=torch.int64, device=device)
    fast = _int32_wraps(device.type)
    k1_32, k2_32, token32 = _as_int32(k1), _as_int32(k2), token.to(torch.int32)
    for lo in range(0, rows, block):
        hi = min(lo + block, rows)
        w = work.fit(hi - lo)
        _block_gumbel(k1, k2, token, k1_32, k2_32, token32, lo, hi, fast, out[lo:hi], w)
    return out


def _block_gumbel(k1, k2, token, k1_32, k2_32, token32, lo, hi, fast, out, w: _Work) -> None:
    x = w.i[0]
    if fast:
        _bits_i32_(k1_32[lo:hi], k2_32[lo:hi], token32, x, w.i[1])
    else:
        x.copy_(_as_int32(bits(k1[lo:hi], k2[lo:hi], token)))
    _gumbel_from_bits_i32_(x, out, w)


# ---------------------------------------------------------------- the posterior


def posterior(
    z: torch.Tensor, y: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of ``_native.posterior``: noise for support logits ``z`` [n, V] (float32), and impossible rows.

    ``y`` observed ids [n], ``k1``, ``k2`` the truncated stream's row keys, ``m`` the maxima [n].
    Returns ``(noise, impossible)``; when a row is impossible the noise is empty.
    """
    rows, vocab = z.shape
    device = z.device
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    impossible = torch.zeros(rows, dtype=torch.bool, device=device)
    if rows == 0:
        return out, impossible
    block = _block_rows(device, rows, vocab)
    work = _Work((block, vocab), device)
    token = torch.arange(vocab, dtype=torch.int64, device=device)
    fast = _int32_wraps(device.type)
    k1_32, k2_32, token32 = _as_int32(k1), _as_int32(k2), token.to(torch.int32)
    bits_ = fixed_point_bits(vocab)
    for lo in range(0, rows, block):
        hi = min(lo + block, rows)
        w = work.fit(hi - lo)
        a = w.f[4]
        _log_softmax_(z[lo:hi], a, w, bits_)
        a_y = a.gather(1, y[lo:hi, None])[:, 0]
        bad = torch.isneginf(a_y)
        if bool(bad.any()):
            impossible[lo:hi] = bad
            return torch.empty(0), impossible
        u = out[lo:hi]
        _block_gumbel(k1, k2, token, k1_32, k2_32, token32, lo, hi, fast, u, w)
        mb = m[lo:hi, None]
        _truncated_(a, u, mb, w)
        u.scatter_(1, y[lo:hi, None], (m[lo:hi] - a_y)[:, None])
        ensure_argmax(a, u, y[lo:hi], w.f[0])
    return out, impossible


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """``_ieee.log_softmax32`` of float32 ``z`` ``[..., V]`` (same bits), block by block."""
    vocab = z.shape[-1]
    flat = z.reshape(-1, vocab)
    rows = len(flat)
    out = torch.empty(flat.shape, dtype=torch.float32, device=z.device)
    if rows:
        block = _block_rows(z.device, rows, vocab)
        work = _Work((block, vocab), z.device)
        bits_ = fixed_point_bits(vocab)
        for lo in range(0, rows, block):
            hi = min(lo + block, rows)
            _log_softmax_(flat[lo:hi], out[lo:hi], work.fit(hi - lo), bits_)
    return out.reshape(z.shape)


def _log_softmax_(z: torch.Tensor, out: torch.Tensor, w: _Work, bits_: int) -> None:
    """``_ieee.log_softmax32(z)`` into ``out`` (uses ``w.f[0:4]``, ``w.i[0:2]``)."""
    d, p = w.f[0], w.f[1]
    torch.sub(z, z.amax(dim=-1, keepdim=True), out=d)
    _exp32_(d, p, w.f[2], w.f[3], w.i[0])
    p.mul_(2.0**bits_)
    total = p.to(torch.int64).sum(dim=-1)
    ls = _ieee.log32(total.to(torch.float64).to(torch.float32) * 2.0**-bits_)
    torch.sub(d, ls[:, None], out=out)


def _truncated_(a: torch.Tensor, g: torch.Tensor, m: torch.Tensor, w: _Work) -> None:
    """``g = _ieee.truncated_gumbel(a, g, m)`` in place (uses ``w.f[0:4]``, ``w.i[0]``; ``a`` kept)."""
    z, t = w.f[0], w.f[1]
    torch.add(a, g, out=z)
    z.sub_(m)
    # The few tokens above the tail (about 1% of a model's vocabulary) need the exact
    # softplus: take them through _ieee's formula on copies, before g is overwritten.
    hot = (z > TAIL).view(-1).nonzero()[:, 0]
    exact = None
    if len(hot):
        rows = hot // z.shape[1]
        exact = _ieee.truncated_gumbel(a.view(-1)[hot], g.view(-1)[hot], m.expand(len(z), 1)[rows, 0])
    # Everywhere else z <= TAIL: g - series(exp32(-|z|)).
    torch.bitwise_or(_i(z), _INT32_MIN, out=_i(t))  # -|z|
    ex = w.f[2]
    _exp32_(t, ex, w.f[3], z, w.i[0])
    torch.mul(ex, C3, out=t)
    t.sub_(0.5).mul_(ex).add_(1.0).mul_(ex)  # ((t C3 - 1/2) t + 1) t
    g.sub_(t)
    if exact is not None:
        g.view(-1)[hot] = exact


# ---------------------------------------------------------------- the observed token's lift


def ensure_argmax(a: torch.Tensor, u: torch.Tensor, y: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> None:
    """Make ``argmax(a + u) == y`` hold exactly in float32, in place.

    Mathematically every competitor sits strictly below ``M``; in float32 a
    truncated value can round onto ``M``, and ``a_y + (M - a_y)`` may round below
    it. Lift the observed token a hair (2**-20 relative) above its best rival so
    that a last-bit difference in ``log_softmax`` elsewhere cannot flip it.
    """
    rows = torch.arange(len(y), device=y.device)
    for _ in range(64):
        s = a + u if scratch is None else torch.add(a, u, out=scratch)
        s_y = s[rows, y]
        if s.shape[1] == 1:
            return
        s[rows, y] = float("-inf")
        rival = s.amax(dim=-1)  # the best token other than y (topk(2) gives the same value, slower)
        target = rival + rival.abs().clamp(min=1.0) * 2.0**-20
        bad = s_y < target
        if not bool(bad.any()):
            return
        idx = bad.nonzero()[:, 0]
        lifted = torch.maximum(target[idx] - a[idx, y[idx]], torch.nextafter(u[idx, y[idx]], torch.tensor(float("inf"))))
        u[idx, y[idx]] = lifted
    raise RuntimeError("cfgen internal error: could not make the posterior noise reproduce the observed tokens")
