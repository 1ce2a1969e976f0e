"""cfgen: noise-matched counterfactual text for language-model interventions.

The core (``gumbel_noise``, ``Sampler``, ``posterior_noise``) is pure tensor
code; model glue is imported lazily so ``import cfgen`` stays cheap.
"""

from __future__ import annotations

import importlib

from .noise import gumbel_noise
from .posterior import ImpossibleObservation, posterior_noise
from .sampler import Sampler

__version__ = "0.1.0"

_LAZY = {
    "SamplerHook": "cfgen.hook",
    "load_default_model": "cfgen.models",
    "generate": "cfgen.api",
    "counterfactual": "cfgen.api",
    "CounterfactualResult": "cfgen.results",
    "CounterfactualSampling": "cfgen.intervention",
    "sampling_site": "cfgen.intervention",
    "FormatError": "cfgen.persist",
    "register_intervention": "cfgen.persist",
    "metrics": "cfgen.metrics",
    "stats": "cfgen.stats",
    "ScopeResult": "cfgen.scopes",
    "DivergenceAttribution": "cfgen.scopes",
    "semantic_scope": "cfgen.scopes",
    "temperature_scope": "cfgen.scopes",
    "fisher_scope": "cfgen.scopes",
    "jacobian_scopes": "cfgen.scopes",
    "divergence_attribution": "cfgen.scopes",
    "divergence_from_result": "cfgen.scopes",
    "tokens": "cfgen.tokens",
    "structured": "cfgen.structured",
    "abstraction": "cfgen.abstraction",
    "do": "cfgen.tokens",
    "edit_prompt": "cfgen.tokens",
    "Alternative": "cfgen.tokens",
    "train_das": "cfgen.abstraction",
    "train_mdas": "cfgen.abstraction",
    "rotation_config": "cfgen.abstraction",
    "rank_one_edit": "cfgen.edits",
    "save": "cfgen.persist",
    "load": "cfgen.persist",
    "catalogue": "cfgen.catalogue",
    "processors": "cfgen.processors",
    "provenance": "cfgen.provenance",
}

__all__ = ["gumbel_noise", "Sampler", "posterior_noise", "ImpossibleObservation", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__ == f"cfgen.{name}" else getattr(module, name)
    raise AttributeError(f"module 'cfgen' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
