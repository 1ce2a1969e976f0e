"""The sampler transform: temperature, top-k, top-p, then Gumbel-max.

``Sampler.log_probs`` reproduces the support of transformers'
``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``
chain (the order ``generate`` applies them), renormalised with an
order-independent ``log_softmax`` (``_ieee.log_softmax32``, the same bits on
every backend, run by ``_eager`` or the C kernel); ``Sampler.sample`` takes ``argmax(log_probs + noise)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from . import _compiled, _eager, _native
from ._ieee import fixed_point_bits

__all__ = ["Sampler", "check_logits"]


MIN_TEMPERATURE = 1e-6  # logits up to 1e30 in magnitude stay finite in float32 after the division


def check_logits(logits: torch.Tensor, what: str = "logits") -> None:
    """Raise a ValueError if ``logits`` is not a floating tensor free of NaN and +inf
    with a finite entry in every row."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{what} must have a vocabulary axis last, got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        return
    top = logits.amax(dim=-1)  # one pass: amax propagates NaN, and +inf is its own maximum
    if bool((top == float("-inf")).any()):
        row = tuple(int(i) for i in (top == float("-inf")).nonzero()[0])
        raise ValueError(
            f"{what} at row {row} are all -inf: no token can be sampled there. Mask fewer tokens "
            "(every row needs at least one finite logit)."
        )
    if not bool((torch.isnan(top) | (top == float("inf"))).any()):
        return
    bad = torch.isnan(logits) | (logits == float("inf"))
    idx = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{what} contain NaN or +inf (first at index {idx}, value {logits[idx].item()}); "
        "the model's forward pass overflowed or was fed invalid input. Check the model's dtype "
        "(fp16 overflows easily: try bfloat16 or float32) and the attention mask."
    )


@dataclass(frozen=True)
class Sampler:
    """How a token is drawn from logits: ``argmax(log_probs(logits) + U)``.

    Args:
        temperature: divides the logits; ``0`` means greedy decoding.
        top_k: keep the ``top_k`` largest logits (ties at the boundary kept), ``None`` or ``0`` for all.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (at least one token), ``None`` or ``1.0`` for all.

    This is the distribution ``model.generate(do_sample=True, temperature=...,
    top_k=..., top_p=...)`` samples from; state ``top_k`` explicitly when
    comparing with HF, whose ``GenerationConfig`` defaults to ``top_k=50``.

    Example:
        >>> import torch, cfgen
        >>> s = cfgen.Sampler(temperature=0.7, top_k=2)
        >>> s.log_probs(torch.tensor([2.0, 1.0, 0.0])).exp().round(decimals=3)
        tensor([0.8070, 0.1930, 0.0000])
        >>> int(s.sample(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 5.0, 9.0])))
        1
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:  # logits / t would overflow float32 to inf, and inf - inf is NaN
            raise ValueError(f"temperature={t!r} is below {MIN_TEMPERATURE:g}, where dividing the logits overflows "
                             "float32; use temperature=0 for greedy decoding (the limit of small temperatures)")
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"top_k must be a positive int, or None / 0 for no top-k, got {k!r}")
            object.__setattr__(self, "top_k", k or None)
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], or None for no top-p, got {p!r}")
            object.__setattr__(self, "top_p", None if p == 1.0 else float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        """A one-line description, e.g. ``temperature=0.7, top_k=50, top_p=None``."""
        return f"temperature={self.temperature:g}, top_k={self.top_k}, top_p={self.top_p}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings; ``Sampler(**s.to_dict()) == s``."""
        return asdict(self)

    def generate_kwargs(self) -> dict[str, Any]:
        """The HF ``generate`` keyword arguments that sample from the same distribution."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or 0, "top_p": self.top_p or 1.0}

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Masked, normalised log-probabilities (float32, ``-inf`` outside the support).

        Args:
            logits: ``[..., V]``, any floating dtype; NaN or ``+inf`` raise a ValueError.

        Example:
            >>> import torch, cfgen
            >>> cfgen.Sampler(top_p=0.5).log_probs(torch.tensor([0.0, 3.0, 1.0]))
            tensor([-inf, 0., -inf])
        """
        z = self.support_logits(logits)
        if not z.numel():
            return _eager.log_softmax(z)
        lib = _native.library(z.device)
        if lib is not None:
            return _native.log_softmax(lib, z.reshape(-1, z.shape[-1]), fixed_point_bits(z.shape[-1])).reshape(z.shape)
        return (_compiled.kernels(z.device) or _eager).log_softmax(z)

    def support_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits after the temperature, ``-inf`` outside the support (not normalised).

        ``log_probs`` is ``log_softmax`` of these; greedy gives 0 at the argmax.

        Example:
            >>> import torch, cfgen
            >>> cfgen.Sampler(temperature=0.5, top_k=2).support_logits(torch.tensor([2.0, 1.0, 0.0]))
            tensor([4., 2., -inf])
        """
        check_logits(logits)
        z = logits.to(torch.float32)
        if self.greedy:
            keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.argmax(-1, keepdim=True), True)
            return torch.zeros_like(z).masked_fill_(~keep, float("-inf"))
        if self.temperature != 1.0:
            z = z / self.temperature
        if self.top_k is not None and self.top_k < z.shape[-1]:
            kth = torch.topk(z, self.top_k, dim=-1).values[..., -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p is not None:
            z = z.masked_fill(_top_p_removed(z, self.top_p), float("-inf"))
        return z

    def sample(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``argmax(log_probs(logits) + noise)`` over the last axis (int64).

        Example:
            >>> import torch, cfgen
            >>> logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
            >>> cfgen.Sampler().sample(logits, cfgen.gumbel_noise(torch.tensor([0, 1]), 0, 10)).shape
            torch.Size([2])
        """
        if noise.shape != logits.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal logits shape {tuple(logits.shape)}")
        return (self.log_probs(logits) + noise.to(torch.float32)).argmax(-1)


def _top_p_removed(z: torch.Tensor, top_p: float) -> torch.Tensor:
    # transformers' TopPLogitsWarper, call for call: tied logits at the
    # boundary are kept or dropped exactly as HF's generate does on this device.
    sorted_z, order = torch.sort(z, dim=-1, descending=False)
    cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    removed_sorted = cumulative <= (1 - top_p)
    removed_sorted[..., -1:] = False
    return removed_sorted.scatter(-1, order, removed_sorted)
