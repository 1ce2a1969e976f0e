"""The noise, log-softmax and posterior as ``torch.compile`` kernels, for any device (``CFGEN_BACKEND=compiled``).

The compiled functions are ``_ieee``'s whole-tensor formulas (the int64-lane
hash, whose products stay below 2**63: no signed overflow for the generated
code to exploit), so Inductor fuses each into a few kernels: on a GPU, Triton
kernels that read the logits once instead of the eager code's one pass per
operation. Inductor is told to keep eager numerics: no fused multiply-add
(``emulate_precision_casts``), correctly rounded division
(``eager_numerics.division_rounding``; Triton's ``/`` is approximate), no
flush of subnormals to zero (``eager_numerics.disable_ftz``).

Those flags are what makes the bits equal in principle; the proof is a check
per device: before first use the kernels are compared bit for bit with the
eager code on inputs that reach every branch, and any failure (no compiler, a
mismatch) falls back to the eager kernels with one warning. The default
backend (``auto``) does not compile: compiling takes tens of seconds per
process, worth it on a GPU for long runs.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch

from . import _eager, _ieee
from ._native import backend

__all__ = ["kernels", "Kernels"]

# Inductor settings that keep eager IEEE arithmetic (see the module docstring).
OPTIONS = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
           "eager_numerics.disable_ftz": True}

_lock = threading.Lock()
_checked: dict[str, Optional[Kernels]] = {}


def _gumbel(k1: torch.Tensor, k2: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return _ieee.gumbel_from_bits(_eager.bits(k1, k2, token))


def _posterior(z, y, k1, k2, m, token):
    """Everything but ``ensure_argmax``: log-softmax ``a``, the noise ``u`` (observed token set to ``m - a_y``), ``a_y``."""
    a = _ieee.log_softmax32(z)
    a_y = a.gather(1, y[:, None])
    u = _ieee.truncated_gumbel(a, _ieee.gumbel_from_bits(_eager.bits(k1, k2, token)), m[:, None])
    return a, u.scatter(1, y[:, None], m[:, None] - a_y), a_y[:, 0]


class Kernels:
    """The compiled functions, with ``_eager``'s signatures for ``gumbel``, ``log_softmax`` and ``posterior``."""

    def __init__(self) -> None:
        def compiled(fn):
            return torch.compile(fn, dynamic=True, fullgraph=True, options=OPTIONS)

        self._gumbel, self._log_softmax, self._posterior = compiled(_gumbel), compiled(_ieee.log_softmax32), \
            compiled(_posterior)

    def gumbel(self, k1: torch.Tensor, k2: torch.Tensor, vocab: int) -> torch.Tensor:
        """``_eager.gumbel``, a block of rows at a time."""
        out = torch.empty(len(k1), vocab, dtype=torch.float32, device=k1.device)
        token = torch.arange(vocab, dtype=torch.int64, device=k1.device)
        block = _eager._block_rows(k1.device, max(1, len(k1)), vocab)
        for lo in range(0, len(k1), block):
            out[lo:lo + block] = self._gumbel(k1[lo:lo + block], k2[lo:lo + block], token)
        return out

    def log_softmax(self, z: torch.Tensor) -> torch.Tensor:
        """``_eager.log_softmax``."""
        flat = z.reshape(-1, z.shape[-1])
        out = torch.empty(flat.shape, dtype=torch.float32, device=z.device)
        block = _eager._block_rows(z.device, max(1, len(flat)), z.shape[-1])
        for lo in range(0, len(flat), block):
            out[lo:lo + block] = self._log_softmax(flat[lo:lo + block])
        return out.reshape(z.shape)

    def posterior(self, z, y, k1, k2, m) -> tuple[torch.Tensor, torch.Tensor]:
        """``_eager.posterior`` (same contract: the noise, and which rows are impossible)."""
        rows, vocab = z.shape
        out = torch.empty(rows, vocab, dtype=torch.float32, device=z.device)
        impossible = torch.zeros(rows, dtype=torch.bool, device=z.device)
        token = torch.arange(vocab, dtype=torch.int64, device=z.device)
        block = _eager._block_rows(z.device, max(1, rows), vocab)
        for lo in range(0, rows, block):
            hi = min(lo + block, rows)
            a, u, a_y = self._posterior(z[lo:hi], y[lo:hi], k1[lo:hi], k2[lo:hi], m[lo:hi], token)
            bad = torch.isneginf(a_y)
            if bool(bad.any()):
                impossible[lo:hi] = bad
                return torch.empty(0), impossible
            _eager.ensure_argmax(a, u, y[lo:hi])
            out[lo:hi] = u
        return out, impossible


def kernels(device) -> Optional[Kernels]:
    """The checked compiled kernels for ``device``, or None (another backend chosen, or they failed here)."""
    if backend() != "compiled":
        return None
    key = str(torch.device(device))
    if key not in _checked:
        with _lock:
            if key not in _checked:
                try:
                    built = Kernels()
                    _self_check(built, torch.device(device))
                    _checked[key] = built
                except Exception as err:  # no C++ compiler / Triton, an unsupported device, a mismatch
                    _checked[key] = None
                    warnings.warn(
                        f"cfgen: CFGEN_BACKEND=compiled, but the compiled kernels are unavailable on {key} "
                        f"({type(err).__name__}: {str(err)[:300]}); using the eager torch kernels (same bits).",
                        RuntimeWarning, stacklevel=3)
    return _checked[key]


def _self_check(fused: Kernels, device: torch.device) -> None:
    """Compare with the eager code (on the CPU) on inputs that reach every branch."""
    seeds = torch.tensor([0, 1, 2**40 + 3], dtype=torch.int64)
    k1, k2 = _eager.row_keys(seeds, seeds * 7, 0)
    z = torch.linspace(-60.0, 8.0, 3 * 1003).reshape(3, 1003)[
        :, torch.randperm(1003, generator=torch.Generator().manual_seed(0))]
    z[1, ::5] = float("-inf")
    y, m = z.argmax(-1), torch.tensor([0.5, -1.0, 3.0])
    on = lambda t: t.to(device)  # noqa: E731
    same = torch.equal(fused.gumbel(on(k1), on(k2), 1003).cpu(), _eager.gumbel(k1, k2, 1003))
    same = same and torch.equal(fused.log_softmax(on(z)).cpu(), _ieee.log_softmax32(z))
    got = fused.posterior(on(z), on(y), on(k1), on(k2), on(m))[0].cpu()
    same = same and torch.equal(got, _eager.posterior(z, y, k1, k2, m)[0])
    if not same:
        raise RuntimeError("the compiled kernels do not reproduce the eager torch code bit for bit on this device")

