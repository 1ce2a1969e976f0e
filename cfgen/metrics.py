"""Effect metrics: how far a counterfactual continuation moved from the factual one.

Every function compares a factual sequence ``a`` with a counterfactual
sequence ``b``. A sequence is either a ``str`` (compared character by
character) or a sequence of token ids (``list`` / ``tuple`` of ints, a 1-D
integer tensor or array; compared token by token). Keep token ids wherever
you have them: decoded text hides tokenisation changes.

Batches. The pair functions also take two equally long *batches*, a list of
strings or a list of token-id lists (or a 2-D integer tensor), and then
return a list with one value per pair. A list whose items are ints is one
token sequence; a list whose items are strings or sequences is a batch. An
empty list is one empty sequence when the other argument is a single sequence
and an empty batch when the other argument is a batch.

``start`` (where accepted) is the intervention point: both sequences are cut to
``a[start:]`` and ``b[start:]`` before comparing; a ``start`` beyond a
sequence's length leaves it empty. In a batch ``start`` may also be a list
with one value per pair.

Nothing here imports a model or a tokenizer; :func:`sequence_log_prob` is
the only function that needs torch.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Optional, Union

import torch

from .sampler import Sampler, check_logits

__all__ = [
    "shared_prefix",
    "normalized_shared_prefix",
    "first_divergence",
    "levenshtein",
    "normalized_levenshtein",
    "changed_fraction",
    "sequence_log_prob",
    "SequenceLogProb",
    "effect_summary",
    "EffectSummary",
]

Tokens = Union[str, Sequence[int]]
Start = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- input handling


def _is_array(x: Any) -> bool:
    # torch tensors and numpy arrays (duck-typed so numpy is never imported)
    return isinstance(x, torch.Tensor) or (hasattr(x, "ndim") and hasattr(x, "tolist") and hasattr(x, "dtype"))


def _kind(x: Any, what: str) -> str:
    """'single', 'batch' or 'empty' (an empty list or tuple, either one)."""
    if isinstance(x, str):
        return "single"
    if _is_array(x):
        if x.ndim == 1:
            return "single"
        if x.ndim == 2:
            return "batch"
        raise ValueError(f"{what} must be 1-D (one sequence) or 2-D (a batch), got shape {tuple(x.shape)}")
    if isinstance(x, (bytes, bytearray)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{what} must be a string, a sequence of token ids, or a list of those (a batch); "
            f"got {type(x).__name__}"
        )
    if len(x) == 0:
        return "empty"
    nested = [isinstance(v, (str, Sequence)) or (_is_array(v) and v.ndim > 0) for v in x]
    if all(nested):
        return "batch"
    if not any(nested):
        return "single"
    raise TypeError(f"{what} mixes token ids with nested sequences or strings; pass one sequence or a list of sequences")


def _seq(x: Any, what: str) -> Union[str, tuple[int, ...]]:
    """One sequence as a ``str`` or a tuple of Python ints."""
    if isinstance(x, str):
        return x
    if _is_array(x):
        if x.ndim != 1:
            raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(x.shape)}")
        dtype = str(x.dtype)
        if "int" not in dtype and "bool" not in dtype:
            raise TypeError(f"{what} must hold integer token ids, got dtype {dtype}")
        return tuple(int(v) for v in x.tolist())
    if isinstance(x, (bytes, bytearray)) or not isinstance(x, Sequence):
        raise TypeError(f"{what} must be a string or a sequence of token ids, got {type(x).__name__}")
    out = []
    for i, v in enumerate(x):
        try:
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{what}[{i}] must be an integer token id, got {type(v).__name__} {v!r}") from None
    return tuple(out)


def _pair(a: Any, b: Any, what: str = "") -> tuple[Union[str, tuple[int, ...]], Union[str, tuple[int, ...]]]:
    sa, sb = _seq(a, f"a{what}"), _seq(b, f"b{what}")
    if isinstance(sa, str) != isinstance(sb, str):
        raise TypeError(
            f"a{what} and b{what} must both be strings or both be token-id sequences, "
            f"got {type(a).__name__} and {type(b).__name__}"
        )
    return sa, sb


def _pairs(a: Any, b: Any) -> tuple[bool, list]:
    """``(is_batch, [(a_i, b_i), ...])`` with every item normalised by :func:`_seq`."""
    ka, kb = _kind(a, "a"), _kind(b, "b")
    if "batch" not in (ka, kb):
        return False, [_pair(a, b)]
    if "single" in (ka, kb):
        raise TypeError(
            "a and b must both be single sequences or both be batches (lists of sequences); "
            f"got a {ka} and a {kb} one"
        )
    la, lb = len(a), len(b)
    if la != lb:
        raise ValueError(f"batch lengths differ: {la} factual and {lb} counterfactual sequences")
    return True, [_pair(x, y, f"[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]


def _starts(start: Any, n: int, batch: bool) -> list[int]:
    def one(s: Any, what: str) -> int:
        if isinstance(s, bool):
            raise TypeError(f"{what} must be a non-negative int, got {s!r}")
        try:
            s = operator.index(s)
        except TypeError:
            raise TypeError(f"{what} must be a non-negative int, got {type(s).__name__} {s!r}") from None
        if s < 0:
            raise ValueError(f"{what} must be >= 0 (the intervention point), got {s}")
        return s

    if start is None:
        return [0] * n
    if (isinstance(start, Sequence) and not isinstance(start, str)) or (_is_array(start) and start.ndim > 0):
        if not batch:
            raise TypeError("a list of start positions needs batches of sequences, not a single pair")
        if len(start) != n:
            raise ValueError(f"start has {len(start)} values for a batch of {n} pairs")
        return [one(s, f"start[{i}]") for i, s in enumerate(start)]
    return [one(start, "start")] * n


def _apply(fn: Callable, a: Any, b: Any, start: Any = None) -> Any:
    batch, pairs = _pairs(a, b)
    starts = _starts(start, len(pairs), batch)
    out = [fn(x[s:], y[s:]) for (x, y), s in zip(pairs, starts, strict=True)]
    return out if batch else out[0]


# --------------------------------------------------------------------------- per-pair kernels


def _shared(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _norm_shared(a, b) -> float:
    m = max(len(a), len(b))
    return 1.0 if m == 0 else _shared(a, b) / m


def _divergence(a, b) -> Optional[int]:
    k = _shared(a, b)
    return None if k == len(a) == len(b) else k


def _lev(a, b) -> int:
    # Strip the common prefix and suffix: they never cost anything.
    p = _shared(a, b)
    a, b = a[p:], b[p:]
    s = 0
    while s < len(a) and s < len(b) and a[-1 - s] == b[-1 - s]:
        s += 1
    if s:
        a, b = a[:-s], b[:-s]
    if len(a) < len(b):
        a, b = b, a  # a: the longer one (the bit vector), b: the shorter (the loop)
    m = len(a)
    if not b:
        return m
    # Myers (1999) / Hyyro (2001) bit-parallel edit distance with Python ints
    # as unbounded bit vectors: bit i of the vertical deltas describes row i + 1
    # of the DP matrix for the column being processed; O(len(b)) big-int ops.
    peq: dict = {}
    for i, c in enumerate(a):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask = (1 << m) - 1
    top = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for c in b:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = (ph << 1) | 1  # row 0 of the matrix is 0, 1, 2, ...: its horizontal delta is +1
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return score


def _norm_lev(a, b) -> float:
    m = max(len(a), len(b))
    return 0.0 if m == 0 else _lev(a, b) / m


def _changed(a, b) -> float:
    m = max(len(a), len(b))
    if m == 0:
        return 0.0
    same = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    return (m - same) / m


# --------------------------------------------------------------------------- public pair metrics


def shared_prefix(a: Any, b: Any, start: Start = 0) -> Union[int, list[int]]:
    """Number of leading positions where ``a`` and ``b`` agree.

    ``shared_prefix(a, b) = max { k : a[i] == b[i] for all i < k }`` (so at most
    ``min(len(a), len(b))``), over tokens for token ids and characters for
    strings, computed on ``a[start:]`` and ``b[start:]``.

    Example:
        >>> shared_prefix([5, 6, 7, 8], [5, 6, 9])
        2
        >>> shared_prefix("the cat", "the dog")
        4
        >>> shared_prefix([[1, 2], [3]], [[1, 2], [4]])  # a batch of two pairs
        [2, 0]
    """
    return _apply(_shared, a, b, start)


def normalized_shared_prefix(a: Any, b: Any, start: Start = 0) -> Union[float, list[float]]:
    """Shared prefix as a fraction of the longer sequence, in ``[0, 1]``.

    ``normalized_shared_prefix(a, b) = shared_prefix(a, b) / max(len(a), len(b))``
    on ``a[start:]`` and ``b[start:]``; two empty sequences are identical, so
    the empty-empty case is defined as ``1.0``. ``1.0`` means identical.

    Example:
        >>> normalized_shared_prefix([5, 6, 7, 8], [5, 6, 9])
        0.5
        >>> normalized_shared_prefix("", "")
        1.0
        >>> normalized_shared_prefix(["abcd", "xy"], ["abXd", "xy"])
        [0.5, 1.0]
    """
    return _apply(_norm_shared, a, b, start)


def first_divergence(a: Any, b: Any) -> Union[Optional[int], list[Optional[int]]]:
    """Index of the first position where ``a`` and ``b`` differ, ``None`` if identical.

    ``first_divergence(a, b) = min { i : a[i] != b[i] }``; when one sequence is
    a proper prefix of the other the length difference is a divergence at the
    shorter length, ``min(len(a), len(b))``. Equivalently: ``shared_prefix(a, b)``
    unless ``a == b``.

    Example:
        >>> first_divergence([5, 6, 7], [5, 6, 9, 1])
        2
        >>> first_divergence([5, 6], [5, 6, 7])
        2
        >>> first_divergence("same", "same") is None
        True
        >>> first_divergence([[1], [2]], [[1], [3]])
        [None, 0]
    """
    return _apply(_divergence, a, b)


def levenshtein(a: Any, b: Any, start: Start = 0) -> Union[int, list[int]]:
    """Edit distance with unit costs (insertion, deletion, substitution).

    ``D(i, j) = min(D(i-1, j) + 1, D(i, j-1) + 1, D(i-1, j-1) + [a[i-1] != b[j-1]])``
    with ``D(i, 0) = i`` and ``D(0, j) = j``; ``levenshtein(a, b) = D(len(a), len(b))``
    on ``a[start:]`` and ``b[start:]``. Token-level for token ids, character-level
    for strings. Computed with the bit-parallel algorithm of Myers / Hyyro on
    Python integers after stripping the common prefix and suffix: ``O(n)``
    big-integer operations of ``m`` bits each (1000-token pairs take about a
    millisecond).

    Example:
        >>> levenshtein("kitten", "sitting")
        3
        >>> levenshtein([1, 2, 3, 4], [1, 3, 4, 5])
        2
        >>> levenshtein([[1, 2], []], [[2, 1], [7]])
        [2, 1]
    """
    return _apply(_lev, a, b, start)


def normalized_levenshtein(a: Any, b: Any, start: Start = 0) -> Union[float, list[float]]:
    """Edit distance after the intervention point, normalised to ``[0, 1]``.

    ``normalized_levenshtein(a, b, start) = levenshtein(a[start:], b[start:]) /
    max(len(a[start:]), len(b[start:]))``, and ``0.0`` when both suffixes are
    empty (nothing after the intervention point, nothing changed).

    Example:
        >>> normalized_levenshtein([1, 2, 3, 4], [1, 3, 4, 5])
        0.5
        >>> normalized_levenshtein([9, 9, 1, 2], [8, 8, 1, 3], start=2)
        0.5
        >>> normalized_levenshtein([1, 2], [1, 2], start=5)
        0.0
    """
    return _apply(_norm_lev, a, b, start)


def changed_fraction(a: Any, b: Any, start: Start = 0) -> Union[float, list[float]]:
    """Fraction of aligned positions after ``start`` whose tokens differ.

    With ``a' = a[start:]``, ``b' = b[start:]`` and ``n = max(len(a'), len(b'))``:
    ``changed_fraction = #{ i < n : i >= min(len(a'), len(b')) or a'[i] != b'[i] } / n``,
    i.e. positions present in only one sequence count as changed; ``0.0`` when
    both suffixes are empty. Unlike :func:`levenshtein` it does not re-align, so
    one inserted token early on changes every later position.

    Example:
        >>> changed_fraction([1, 2, 3, 4], [1, 9, 3])
        0.5
        >>> changed_fraction("abcd", "abXd", start=2)
        0.5
        >>> changed_fraction([[1, 2], [1]], [[1, 2], [2]])
        [0.0, 1.0]
    """
    return _apply(_changed, a, b, start)


# --------------------------------------------------------------------------- log-probabilities


class SequenceLogProb(NamedTuple):
    """``total``: summed log-probability, shape ``[]`` or ``[B]``; ``per_token``: ``[T]`` or ``[B, T]``
    (``0.0`` at padded positions)."""

    total: torch.Tensor
    per_token: torch.Tensor


def sequence_log_prob(
    logits: torch.Tensor,
    tokens: Any,
    sampler: Optional[Sampler] = None,
    *,
    mask: Optional[Any] = None,
) -> SequenceLogProb:
    """Log-probability of a continuation given the logits that produced it.

    ``per_token[t] = log p_t(tokens[t])`` and ``total = sum_t mask[t] * per_token[t]``
    where ``log p_t = log_softmax(logits[t])`` (float32, or float64 for float64
    logits) or, with a sampler, ``sampler.log_probs(logits[t])``: the masked
    temperature / top-k / top-p distribution actually sampled from, which is
    ``-inf`` for a token outside the support.

    Alignment: ``logits[t]`` must be the logits *from which* ``tokens[t]`` was
    drawn (per-step generation scores). From a teacher-forced forward pass over
    ``prompt + continuation`` with ``P`` prompt tokens, pass
    ``outputs.logits[..., P - 1 : -1, :]``.

    Args:
        logits: ``[T, V]`` or ``[B, T, V]`` floating tensor.
        tokens: ``[T]`` or ``[B, T]`` token ids (tensor or lists). For a batch,
            a list of token lists of different lengths (at most ``T``) is padded
            on the right and ``mask`` is built from the lengths.
        sampler: a :class:`cfgen.Sampler`; ``None`` for the model's plain distribution.
        mask: ``[B, T]`` (or ``[T]``) bool / 0-1; ``True`` marks real tokens.
            Padded positions get ``per_token == 0`` and do not enter ``total``.

    Returns:
        ``SequenceLogProb(total, per_token)``.

    Example:
        >>> import torch, cfgen
        >>> logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
        >>> lp = sequence_log_prob(logits, [0, 2])
        >>> round(lp.total.exp().item(), 4)  # 0.5 * 0.8
        0.4
        >>> sequence_log_prob(logits, [1, 2], cfgen.Sampler(top_k=1)).total  # token 1 is outside top-1
        tensor(-inf)
        >>> batch = torch.stack([logits, logits])
        >>> sequence_log_prob(batch, [[0, 2], [0]]).total.exp().round(decimals=4)
        tensor([0.4000, 0.5000])
    """
    check_logits(logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [T, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if sampler is not None and not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a cfgen.Sampler or None, got {type(sampler).__name__}")
    shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    device = logits.device

    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        tok = tokens.to(device=device, dtype=torch.int64)
    else:
        if logits.dim() == 3 and mask is None and isinstance(tokens, Sequence) and _kind(tokens, "tokens") == "batch":
            rows = [_seq(r, f"tokens[{i}]") for i, r in enumerate(tokens)]
            if any(isinstance(r, str) for r in rows):
                raise TypeError("tokens must be token ids, not strings (tokenize first)")
            if len(rows) != shape[0]:
                raise ValueError(f"tokens has {len(rows)} rows but logits has batch size {shape[0]}")
            too_long = [i for i, r in enumerate(rows) if len(r) > shape[1]]
            if too_long:
                raise ValueError(f"tokens[{too_long[0]}] has {len(rows[too_long[0]])} tokens but logits only {shape[1]} steps")
            tok = torch.zeros(shape, dtype=torch.int64)
            mask = torch.zeros(shape, dtype=torch.bool)
            for i, r in enumerate(rows):
                tok[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
                mask[i, : len(r)] = True
            tok = tok.to(device)
        else:
            if isinstance(tokens, str):
                raise TypeError("tokens must be token ids, not a string (tokenize first)")
            try:
                tok = torch.as_tensor(tokens, dtype=torch.int64, device=device)
            except (TypeError, ValueError) as e:
                raise TypeError(f"tokens must be token ids (a tensor or a rectangular list of ints): {e}") from None
    if tok.shape != shape:
        raise ValueError(f"tokens shape {tuple(tok.shape)} must equal logits shape without the vocabulary axis {tuple(shape)}")
    if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= vocab):
        bad = int(tok[(tok < 0) | (tok >= vocab)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    if mask is not None:
        m = torch.as_tensor(mask, device=device)
        if m.shape != shape:
            raise ValueError(f"mask shape {tuple(m.shape)} must equal tokens shape {tuple(shape)}")
        m = m.bool()
    else:
        m = None

    if sampler is None:
        z = logits if logits.dtype == torch.float64 else logits.to(torch.float32)
        logp = torch.log_softmax(z, dim=-1)
    else:
        logp = sampler.log_probs(logits)
    per_token = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    if m is not None:
        per_token = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=device))
    return SequenceLogProb(per_token.sum(-1), per_token)


# --------------------------------------------------------------------------- summary


def _mean(xs: list) -> Optional[float]:
    return float(statistics.fmean(xs)) if xs else None


@dataclass(frozen=True)
class EffectSummary:
    """Per-pair effect metrics of a batch and their aggregates (see :func:`effect_summary`).

    Every list field has one entry per (factual, counterfactual) pair; the
    metrics are computed after each pair's ``start``. ``aggregate()`` gives the
    batch means (and the median normalised shared prefix, the statistic
    Ravfogel et al. report); ``to_dict()`` both, JSON-serialisable.
    """

    start: list[int]
    factual_length: list[int]
    counterfactual_length: list[int]
    identical: list[bool]
    first_divergence: list[Optional[int]]
    shared_prefix: list[int]
    normalized_shared_prefix: list[float]
    levenshtein: list[int]
    normalized_levenshtein: list[float]
    changed_fraction: list[float]

    def __len__(self) -> int:
        return len(self.start)

    def aggregate(self) -> dict[str, Optional[float]]:
        """Batch statistics; ``None`` for an empty batch (and ``mean_first_divergence`` when no pair diverges).

        ``fraction_identical`` = mean of ``identical``; ``mean_X`` = mean of field ``X``;
        ``mean_first_divergence`` = mean over the diverging pairs only.
        """
        out: dict[str, Optional[float]] = {"fraction_identical": _mean([float(x) for x in self.identical])}
        for name in ("shared_prefix", "normalized_shared_prefix", "levenshtein", "normalized_levenshtein", "changed_fraction"):
            out[f"mean_{name}"] = _mean(getattr(self, name))
        nsp = self.normalized_shared_prefix
        out["median_normalized_shared_prefix"] = float(statistics.median(nsp)) if nsp else None
        out["mean_first_divergence"] = _mean([d for d in self.first_divergence if d is not None])
        return out

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per pair."""
        names = [f.name for f in fields(self)]
        return [{n: getattr(self, n)[i] for n in names} for i in range(len(self))]

    def to_dict(self) -> dict[str, Any]:
        """``{"n": ..., **aggregate(), "per_row": {field: list}}`` (JSON-serialisable)."""
        return {"n": len(self), **self.aggregate(), "per_row": {f.name: list(getattr(self, f.name)) for f in fields(self)}}


def effect_summary(factual_ids: Any, counterfactual_ids: Any, start: Optional[Start] = None) -> EffectSummary:
    """All pair metrics for a batch of (factual, counterfactual) continuations.

    For each pair ``i`` with ``s = start[i]`` (``start=None`` means 0; an int
    applies to every pair): ``identical = a[s:] == b[s:]``,
    ``first_divergence`` (absolute index into the full sequences, ``None`` if the
    suffixes are identical), and :func:`shared_prefix`,
    :func:`normalized_shared_prefix`, :func:`levenshtein`,
    :func:`normalized_levenshtein`, :func:`changed_fraction` of ``a[s:]`` and
    ``b[s:]``. ``factual_length`` / ``counterfactual_length`` are full lengths.
    A single pair is treated as a batch of one.

    Example:
        >>> s = effect_summary([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
        >>> s.levenshtein, s.first_divergence
        ([1, 0], [2, None])
        >>> s.aggregate()["fraction_identical"], s.aggregate()["mean_normalized_shared_prefix"]
        (0.5, 0.75)
        >>> effect_summary([1, 2, 3], [1, 2, 4], start=2).to_records()[0]["changed_fraction"]
        1.0
    """
    batch, pairs = _pairs(factual_ids, counterfactual_ids)
    starts = _starts(start, len(pairs), batch)
    cols: dict[str, list] = {f.name: [] for f in fields(EffectSummary)}
    for (a, b), s in zip(pairs, starts, strict=True):
        x, y = a[s:], b[s:]
        d = _divergence(x, y)
        vals = {
            "start": s,
            "factual_length": len(a),
            "counterfactual_length": len(b),
            "identical": d is None,
            "first_divergence": None if d is None else d + s,
            "shared_prefix": _shared(x, y),
            "normalized_shared_prefix": _norm_shared(x, y),
            "levenshtein": _lev(x, y),
            "normalized_levenshtein": _norm_lev(x, y),
            "changed_fraction": _changed(x, y),
        }
        for k, v in vals.items():
            cols[k].append(v)
    return EffectSummary(**cols)
