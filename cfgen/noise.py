"""Counter-based Gumbel noise: a pure function of (seed, step, token id).

The hash is a 32-bit integer mix (``_eager.py``: in int64 lanes with
multipliers below 2**31, so no intermediate exceeds 2**63, or in int32 lanes
where products are checked to wrap modulo 2**32). The Gumbel transform uses
only IEEE-754 basic operations (``_ieee.py``). So the eager torch code, on any
device, and the fused C kernel (``_native.c``, used on CPU) give the same bits.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _compiled, _eager, _native

__all__ = ["gumbel_noise", "uniform_bits", "PRIOR", "POSTERIOR_MAX", "POSTERIOR_TRUNCATED", "ALTERNATIVE"]

# Streams separate independent uses of the same (seed, step) so that, e.g., the
# posterior's auxiliary randomness never coincides with the prior noise.
PRIOR = 0
POSTERIOR_MAX = 1
POSTERIOR_TRUNCATED = 2
ALTERNATIVE = 3

SeedLike = Union[int, torch.Tensor]


def _as_int64(x: SeedLike, name: str, device) -> torch.Tensor:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int or an int64 tensor, got a bool")
    if isinstance(x, int):
        return torch.tensor([x], dtype=torch.int64, device=device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int or an int64 tensor of shape [B], got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (int64), got dtype {x.dtype}")
    if x.dim() > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D tensor [B], got shape {tuple(x.shape)}")
    return x.reshape(-1).to(device=device, dtype=torch.int64)


def _broadcast_rows(seeds: SeedLike, step: SeedLike, device) -> tuple[torch.Tensor, torch.Tensor]:
    if device is None:
        device = next((t.device for t in (seeds, step) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    s = _as_int64(seeds, "seeds", device)
    t = _as_int64(step, "step", device)
    if s.numel() != t.numel() and 1 not in (s.numel(), t.numel()):
        raise ValueError(
            f"seeds has {s.numel()} rows and step has {t.numel()}; give one value per row "
            "(both shaped [B]) or a single int for either"
        )
    s, t = torch.broadcast_tensors(s, t)
    return s.contiguous(), t.contiguous()


def uniform_bits(seeds: SeedLike, step: SeedLike, vocab_size: int, *, stream: int = PRIOR, device=None) -> torch.Tensor:
    """The raw 32-bit hash values (int64 in [0, 2**32)) behind :func:`gumbel_noise`.

    Example:
        >>> bits = uniform_bits(0, 0, 4)
        >>> bool(((bits >= 0) & (bits < 2**32)).all())
        True
    """
    _check_vocab(vocab_size)
    s, t = _broadcast_rows(seeds, step, device)
    k1, k2 = _eager.row_keys(s, t, stream)
    return _eager.bits(k1, k2, torch.arange(vocab_size, dtype=torch.int64, device=s.device))


def _check_vocab(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")


def gumbel_noise(
    seeds: SeedLike,
    step: SeedLike,
    vocab_size: int,
    *,
    device: Optional[Union[str, torch.device]] = None,
    stream: int = PRIOR,
) -> torch.Tensor:
    """Standard Gumbel noise ``U[b, v]`` keyed by ``(seeds[b], step[b], v)``.

    A pure function: row ``b`` depends only on ``(seeds[b], step[b])`` (and
    ``stream``), so the same seed gives the same noise at any batch size or
    batch position, on any device, and torch's global RNG is never touched.

    Args:
        seeds: an int, or an int64 tensor ``[B]`` (one seed per sequence).
        step: the generation step, an int or an int64 tensor ``[B]``.
        vocab_size: number of token ids ``V``.
        device: where to compute; defaults to the device of a tensor argument, else CPU.
        stream: independent noise streams for the same keys (0 is the sampling noise).

    Returns:
        float32 tensor ``[B, V]``, finite, Gumbel(0, 1) distributed.

    Example:
        >>> import torch, cfgen
        >>> u = cfgen.gumbel_noise(torch.tensor([7, 8]), 3, 5)
        >>> u.shape, u.dtype
        (torch.Size([2, 5]), torch.float32)
        >>> torch.equal(u[1], cfgen.gumbel_noise(8, 3, 5)[0])
        True
    """
    _check_vocab(vocab_size)
    s, t = _broadcast_rows(seeds, step, device)
    k1, k2 = _eager.row_keys(s, t, stream)
    lib = _native.library(s.device)
    if lib is not None:
        return _native.gumbel(lib, k1, k2, vocab_size)
    return (_compiled.kernels(s.device) or _eager).gumbel(k1, k2, vocab_size)
