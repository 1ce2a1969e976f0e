"""Exact, sampler-aware posterior of the Gumbel noise given observed tokens.

With ``a = sampler.log_probs(logits)`` and observed token ``y`` (DESIGN §1):
the maximum ``M = max_v a_v + U_v`` is Gumbel(0, 1) and independent of the
argmax; ``U_y = M - a_y``; every other supported token gets a Gumbel(a_v, 1)
truncated below ``M``; tokens outside the support keep their prior noise.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _compiled, _eager, _native
from ._ieee import fixed_point_bits
from .noise import POSTERIOR_MAX, POSTERIOR_TRUNCATED, gumbel_noise
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


def _keys(tokens: torch.Tensor, seed, step) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tokens.shape
    explicit_step = step is not None
    if step is None:
        step = torch.arange(shape[-1], device=tokens.device) if len(shape) else torch.zeros((), dtype=torch.int64)
    elif isinstance(step, bool) or not isinstance(step, (int, torch.Tensor)):
        raise TypeError(f"step must be an int or an int64 tensor broadcastable to tokens {tuple(shape)}, got {step!r}")
    elif isinstance(step, torch.Tensor) and (step.is_floating_point() or step.is_complex() or step.dtype == torch.bool):
        raise TypeError(f"step must hold integers (int64), got dtype {step.dtype}")
    if not len(shape):  # a single observed token
        tokens = tokens.reshape(1)
    step = torch.as_tensor(step, dtype=torch.int64, device=tokens.device)
    int_seed = isinstance(seed, int) and not isinstance(seed, bool)
    if int_seed:
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
    seed, step = seed.reshape(-1), step.reshape(-1)
    if explicit_step and int_seed and torch.unique(step).numel() < step.numel():
        # an int seed with given steps: positions sharing a step would draw the very same noise
        raise ValueError(
            "with an int seed, positions that share a step get identical noise; the row index is folded in only "
            "along the leading axes of tokens [..., T]. For one decode step of R rows (logits [R, V], tokens [R]) "
            "pass one seed per row, seed=<int64 tensor [R]>, with step=<int or int64 tensor [R]>"
        )
    return seed, step


def posterior_noise(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    sampler: Sampler = Sampler(),
    seed: Union[int, torch.Tensor] = 0,
    step: Optional[Union[int, torch.Tensor]] = None,
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
            per position, e.g. ``[B, 1]``). With an int the row index (over the
            leading axes of ``tokens``) is folded into the key so rows draw
            independent noise.
        step: generation step of each position (an int or an int64 tensor),
            broadcastable to ``tokens.shape``; defaults to ``0..T-1`` along the last
            axis of ``tokens``.

    Step indexing: every position's noise is keyed by ``(seed, step)`` of that
    position alone (and the row index, for an int seed), never by where the
    position sits in the call. So a decode loop can draw each step's posterior
    from that step's factual logits, holding ``O(R x V)`` noise at a time: with
    ``seeds`` an int64 tensor ``[R]``,
    ``posterior_noise(logits[:, t], tokens[:, t], seed=seeds, step=t)`` (or
    ``step=`` an int64 tensor ``[R]`` when rows are at different steps) equals
    ``posterior_noise(logits, tokens, seed=seeds[:, None])[:, t]`` bit for bit.
    Use tensor seeds there: an int seed with ``tokens`` ``[R]`` would read the
    ``R`` rows as positions of one sequence (refused when they share a step).

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
        >>> seeds = torch.tensor([5, 6])  # one decode step at a time gives the same noise
        >>> full = cfgen.posterior_noise(logits[:, None], tokens[:, None], seed=seeds[:, None], step=4)
        >>> torch.equal(full[:, 0], cfgen.posterior_noise(logits, tokens, seed=seeds, step=4))
        True
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
    k1, k2 = _eager.row_keys(seeds, steps, POSTERIOR_TRUNCATED)
    lib = _native.library(logits.device)
    z = sampler.support_logits(flat_logits)
    if lib is not None:
        u, impossible = _native.posterior(lib, z, y, k1, k2, m[:, 0], fixed_point_bits(vocab))
    else:
        u, impossible = (_compiled.kernels(z.device) or _eager).posterior(z, y, k1, k2, m[:, 0])
    if bool(impossible.any()):
        i = int(impossible.nonzero()[0])
        given = None if step is None else int(torch.broadcast_to(torch.as_tensor(step), tokens.shape).reshape(-1)[i])
        raise _impossible(flat_logits[i], int(y[i]), _unravel(i, tokens.shape), sampler, given)
    return u.reshape(logits.shape)


def _unravel(i: int, shape) -> tuple:
    return tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(shape))) if len(shape) else ()


def _impossible(
    logits_row: torch.Tensor, token: int, index: tuple, sampler: Sampler, step: Optional[int] = None
) -> ImpossibleObservation:
    z = logits_row.float()
    rank = int((z > z[token]).sum()) + 1
    p = float(torch.softmax(z / (sampler.temperature or 1.0), -1)[token])
    if step is not None:  # the caller numbered the steps (e.g. one decode step of R rows)
        where = f"step {step}" + (f" (index {index} of tokens)" if index else "")
    elif not index:
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
