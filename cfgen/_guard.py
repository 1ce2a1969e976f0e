"""Shared state left as found: one call at a time per model, user hooks kept.

pyvene starts every forward by removing *all* forward hooks on the wrapped
model (``remove_forward_hooks``): a user's activation logger, and the hooks
transformers 5 uses for ``output_hidden_states``, would silently stop firing
after one cfgen call. :func:`model_guard` snapshots every module's hook
dictionaries and puts the same entries back (in the same dict objects, so the
user's ``RemovableHandle`` still removes them) when the call ends, normally or
not.

Two calls that share a wrapped model (two threads on one
``IntervenableModel``, or on two that wrap one cached model) would interleave
pyvene's hooks and cfgen's patched intervention forwards. The guard holds one
re-entrant lock per underlying torch model for the whole call, so such calls
run one after the other and each gets its serial result.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch

__all__ = ["model_guard", "model_lock"]

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()
# torch keeps a module's hooks in these dicts; the *_with_kwargs / *_always_called ones are flags keyed by hook id.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises cfgen calls on ``model`` (shared by every wrapper of it)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _snapshot(model: torch.nn.Module) -> list[tuple[dict, dict]]:
    return [(d, dict(d)) for d in _hook_dicts(model) if d]


def _hook_dicts(model: torch.nn.Module) -> Iterator[dict]:
    for module in model.modules():
        for name in _HOOK_DICTS:
            d = getattr(module, name, None)
            if d is not None:
                yield d


@contextlib.contextmanager
def model_guard(*models: torch.nn.Module) -> Iterator[None]:
    """Hold each model's lock for the block and leave its forward hooks exactly as they were.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> calls = []
        >>> h = lin.register_forward_hook(lambda m, i, o: calls.append(1))
        >>> with model_guard(lin):
        ...     lin._forward_hooks.clear()        # what pyvene's cleanup does
        >>> _ = lin(torch.zeros(1, 2)); calls
        [1]
    """
    unique = list({id(m): m for m in models if m is not None}.values())
    with contextlib.ExitStack() as stack:
        for m in sorted(unique, key=id):  # one global order: two calls on the same pair cannot deadlock
            stack.enter_context(model_lock(m))
        saved = [(m, _snapshot(m)) for m in unique]
        try:
            yield
        finally:
            for m, snap in saved:
                for d in _hook_dicts(m):  # whatever was added during the call (pyvene's hooks) goes
                    d.clear()
                for d, entries in snap:
                    d.update(entries)
