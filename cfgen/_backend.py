"""Run an elementwise tensor function fused by torch.compile, or eagerly.

``CFGEN_BACKEND=eager|compiled|auto`` (default ``auto``: compile, and fall back
to eager for good, with one warning, if compilation fails on this machine).
The functions given here are written so both paths give identical bits.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

_CHOICES = ("auto", "compiled", "eager")


def backend() -> str:
    choice = os.environ.get("CFGEN_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"CFGEN_BACKEND={choice!r}; use one of {', '.join(_CHOICES)}")
    return choice


class Fused:
    """Wrap ``fn`` so calls go to ``torch.compile(fn)`` where that works."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled = None
        self._broken = False

    def __call__(self, *args):
        choice = backend()
        if choice == "eager" or self._broken:
            return self.fn(*args)
        try:
            if self._compiled is None:
                import torch

                self._compiled = torch.compile(self.fn, dynamic=True)
            return self._compiled(*args)
        except Exception as err:  # a missing C++ compiler, an unsupported device, ...
            if choice == "compiled":
                raise
            self._broken = True
            warnings.warn(
                f"cfgen: torch.compile failed ({type(err).__name__}: {err}); using eager kernels "
                "(same results, slower). Set CFGEN_BACKEND=eager to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args)
