"""Exact, sampler-aware posterior of the Gumbel noise given observed tokens.

With ``a = sampler.log_probs(logits)`` and observed token ``y`` (DESIGN §1):
the maximum ``M = max_v a_v + U_v`` is Gumbel(0, 1) and independent of the
argmax; ``U_y = M - a_y``; every other supported token gets a Gumbel(a_v, 1)
truncated below ``M``; tokens outside the support keep their prior noise.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _native
from ._ieee import fixed_point_bits, log_softmax32, truncated_gumbel
from .noise import POSTERIOR_MAX, POSTERIOR_TRUNCATED, _eager_gumbel, _row_keys, gumbel_noise
from .sampler import Sampler

__all__ = ["posterior_noise", "ImpossibleObservation"]


class ImpossibleObservation(ValueError):
    """An observed token lies outside the sampler's support, so no noise explains it.

    Attributes ``index`` (position in ``tokens``), ``token`` and ``sampler`` say which.
    """

    def __init__(self, message: str, *, index: tuple = (), token: int = -1, sampler: Optional[Sampler] = None):
        super().__init__(message)
        self.index = index
        self.token = token
        self.sampler = sampler


_BLOCK = 1 << 20  # elements per CPU block of the eager path


def _keys(tokens: torch.Tensor, seed, step) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tokens.shape
    if step is None:
        step = torch.arange(shape[-1], device=tokens.device) if len(shape) else torch.zeros((), dtype=torch.int64)
    if not len(shape):  # a single observed token
        tokens = tokens.reshape(1)
    step = torch.as_tensor(step, dtype=torch.int64, device=tokens.device)
    if isinstance(seed, int) and not isinstance(seed, bool):
        # One int for many rows: fold the row index into the step key so rows
        # draw independent noise. Pass a tensor of seeds for batch invariance.
        rows = torch.arange(max(1, tokens[..., :1].numel()), device=tokens.device)
        rows = rows.reshape(shape[:-1] + (1,)) if len(shape) else rows.reshape(())
        step = step + (rows << 32)
        seed = torch.tensor(seed, dtype=torch.int64, device=tokens.device)
    elif isinstance(seed, torch.Tensor) and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = seed.to(device=tokens.device, dtype=torch.int64)
    else:
        raise TypeError(f"seed must be an int or an int64 tensor broadcastable to tokens {tuple(shape)}, got {seed!r}")
    try:
        seed, step = torch.broadcast_to(seed, shape), torch.broadcast_to(step, shape)
    except RuntimeError:
        raise ValueError(
            f"seed {tuple(seed.shape)} and step {tuple(step.shape)} must broadcast to tokens {tuple(shape)}"
        ) from None
    return seed.reshape(-1), step.reshape(-1)


def posterior_noise(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    sampler: Sampler = Sampler(),
    seed: Union[int, torch.Tensor] = 0,
    step: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw Gumbel noise from its exact posterior given the observed ``tokens``.

    ``sampler.sample(logits, posterior_noise(logits, tokens, sampler=sampler))``
    returns ``tokens``, and running other logits with this noise gives a draw of
    the hindsight counterfactual. Vectorised over all positions.

    Args:
        logits: ``[..., V]`` factual logits (any float dtype; NaN / +inf rejected).
        tokens: ``[...]`` observed token ids.
        sampler: the sampler that produced (or is assumed to have produced) ``tokens``.
        seed: an int, or an int64 tensor broadcastable to ``tokens.shape`` (one seed
            per position, e.g. ``[B, 1]``). With an int the row index is folded into
            the key so rows draw independent noise.
        step: generation step of each position, broadcastable to ``tokens.shape``;
            defaults to ``0..T-1`` along the last axis of ``tokens``.

    Returns:
        float32 noise of ``logits``' shape, finite inside the sampler's support.

    Raises:
        ImpossibleObservation: a token lies outside the sampler's support.

    Example:
        >>> import torch, cfgen
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
        >>> tokens = torch.tensor([1, 0])
        >>> noise = cfgen.posterior_noise(logits, tokens, seed=3)
        >>> cfgen.Sampler().sample(logits, noise).tolist()
        [1, 0]
    """
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tuple(logits.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocabulary axis; "
            "pass the logits that predicted each observed token (shifted by one position)"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    y = tokens.reshape(-1).to(device=logits.device, dtype=torch.int64)
    out_of_range = (y < 0) | (y >= vocab)
    if bool(out_of_range.any()):
        i = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"token id {int(y[i])} at index {_unravel(i, tokens.shape)} is outside the vocabulary [0, {vocab}); "
            "do the tokenizer and the model agree?"
        )
    seeds, steps = _keys(tokens.to(logits.device), seed, step)
    m = gumbel_noise(seeds, steps, 1, stream=POSTERIOR_MAX)  # [n, 1]: the maximum, Gumbel(0, 1)
    k1, k2 = _row_keys(seeds, steps, POSTERIOR_TRUNCATED)
    lib = _native.library(logits.device)
    if lib is not None:
        z = sampler.support_logits(flat_logits)
        u, impossible = _native.posterior(lib, z, y, k1, k2, m[:, 0], fixed_point_bits(vocab))
        if bool(impossible.any()):
            i = int(impossible.nonzero()[0])
            raise _impossible(flat_logits[i], int(y[i]), _unravel(i, tokens.shape), sampler)
        return u.reshape(logits.shape)
    u = torch.empty(flat_logits.shape, dtype=torch.float32, device=logits.device)
    # Row blocks that stay in cache; every operation below is row-wise, so blocking changes no value.
    rows = len(y) if logits.device.type != "cpu" else max(1, _BLOCK // vocab)
    for lo in range(0, len(y), rows):
        hi = min(lo + rows, len(y))
        z = sampler.support_logits(flat_logits[lo:hi])
        block, impossible = _eager_posterior(z, y[lo:hi], k1[lo:hi], k2[lo:hi], m[lo:hi, 0])
        if bool(impossible.any()):
            i = lo + int(impossible.nonzero()[0])
            raise _impossible(flat_logits[i], int(y[i]), _unravel(i, tokens.shape), sampler)
        u[lo:hi] = block
    return u.reshape(logits.shape)


def _eager_posterior(z, y, k1, k2, m) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of ``_native.posterior``: noise for support logits ``z`` [n, V], and impossible rows."""
    a = log_softmax32(z)
    a_y = a.gather(1, y[:, None])[:, 0]
    impossible = torch.isneginf(a_y)
    if bool(impossible.any()):
        return torch.empty(0), impossible
    u = truncated_gumbel(a, _eager_gumbel(k1, k2, z.shape[1]), m[:, None])
    u.scatter_(1, y[:, None], (m - a_y)[:, None])
    _ensure_argmax(a, u, y)
    return u, impossible


def _ensure_argmax(a: torch.Tensor, u: torch.Tensor, y: torch.Tensor) -> None:
    """Make ``argmax(a + u) == y`` hold exactly in float32, in place.

    Mathematically every competitor sits strictly below ``M``; in float32 a
    truncated value can round onto ``M``, and ``a_y + (M - a_y)`` may round below
    it. Lift the observed token a hair (2**-20 relative) above its best rival so
    that a last-bit difference in ``log_softmax`` elsewhere cannot flip it.
    """
    rows = torch.arange(len(y), device=y.device)
    for _ in range(64):
        s = a + u
        s_y = s[rows, y]
        if s.shape[1] == 1:
            return
        top2 = s.topk(2, dim=-1)  # the best token other than y is the first of the top two that is not y
        rival = torch.where(top2.indices[:, 0] == y, top2.values[:, 1], top2.values[:, 0])
        target = rival + rival.abs().clamp(min=1.0) * 2.0**-20
        bad = s_y < target
        if not bool(bad.any()):
            return
        idx = bad.nonzero()[:, 0]
        lifted = torch.maximum(target[idx] - a[idx, y[idx]], torch.nextafter(u[idx, y[idx]], torch.tensor(float("inf"))))
        u[idx, y[idx]] = lifted
    raise RuntimeError("cfgen internal error: could not make the posterior noise reproduce the observed tokens")


def _unravel(i: int, shape) -> tuple:
    return tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(shape))) if len(shape) else ()


def _impossible(logits_row: torch.Tensor, token: int, index: tuple, sampler: Sampler) -> ImpossibleObservation:
    z = logits_row.float()
    rank = int((z > z[token]).sum()) + 1
    p = float(torch.softmax(z / (sampler.temperature or 1.0), -1)[token])
    if not index:
        where = "the single observed position"
    else:
        where = f"step {index[-1]}" + (f" of batch row {index[:-1] if len(index) > 2 else index[0]}" if len(index) > 1 else "")
    return ImpossibleObservation(
        f"observed token {token} at {where} is outside the support of Sampler({sampler.describe()}): "
        f"it ranks {rank} with probability {p:.3g} before truncation. The text cannot have been sampled "
        "with these settings; loosen top_k / top_p (or use temperature > 0) to explain it.",
        index=index,
        token=token,
        sampler=sampler,
    )
