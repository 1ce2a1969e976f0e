"""The pyvene intervention type for the sampling site.

``CounterfactualSampling`` sits on the logits (``lm_head.output``) inside an
``IntervenableConfig`` and declares *how to sample*: temperature, top-k,
top-p and the seed. It leaves the logits untouched (cfgen's decode loop does
the sampling), so adding it changes no activation, and it travels with
pyvene's own config files: its settings are buffers, saved with the state dict
(pyvene drops constructor arguments on load).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .engine import import_pyvene
from .sampler import Sampler

pv = import_pyvene()  # without its import-time print

__all__ = ["CounterfactualSampling", "sampling_site", "SAMPLING_COMPONENT"]

SAMPLING_COMPONENT = "lm_head.output"


class CounterfactualSampling(pv.TrainableIntervention):
    """Marks the logits as the sampling site and records the sampler and seed.

    Example:
        >>> import cfgen
        >>> site = cfgen.CounterfactualSampling(temperature=0.7, top_k=50, seed=3)
        >>> site.sampler, site.seed
        (Sampler(temperature=0.7, top_k=50, top_p=None), 3)
    """

    def __init__(self, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        Sampler(temperature, top_k, top_p)  # validate early, with the sampler's messages
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float64))
        self.register_buffer("top_k", torch.tensor(int(top_k or 0)))
        self.register_buffer("top_p", torch.tensor(float(top_p or 1.0), dtype=torch.float64))
        self.register_buffer("seed_value", torch.tensor(int(seed)))

    @property
    def sampler(self) -> Sampler:
        return Sampler(float(self.temperature), int(self.top_k) or None, float(self.top_p))

    @property
    def seed(self) -> int:
        return int(self.seed_value)

    def forward(self, base, source=None, subspaces=None, **kwargs):
        return base

    def __str__(self) -> str:
        return f"CounterfactualSampling({self.sampler.describe()}, seed={self.seed})"


def sampling_site(sampler: Sampler = Sampler(), seed: int = 0) -> dict:
    """A representation entry for ``pv.IntervenableConfig`` declaring the sampling site.

    Example:
        >>> import cfgen, pyvene as pv
        >>> entry = cfgen.sampling_site(cfgen.Sampler(temperature=0.7), seed=1)
        >>> entry["component"]
        'lm_head.output'
    """
    return {
        "component": SAMPLING_COMPONENT,
        "intervention": CounterfactualSampling(sampler.temperature, sampler.top_k, sampler.top_p, seed=seed),
    }
