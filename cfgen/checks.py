"""Argument checks shared by every front-end: a clear error before any model work.

Each function takes the user's value and the argument's name, and returns the
value in the one form the engine uses, or raises ``TypeError`` / ``ValueError``
saying what was wrong and what is accepted. Nothing is coerced silently:
``True`` is not a seed, ``"12"`` is not a seed, ``1.0`` is not a token id.
"""

from __future__ import annotations

import numbers
import os
import secrets
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["positive_int", "seeds", "fresh_seed", "token_ids", "text", "stop_strings", "check_memory",
           "available_memory", "MAX_SEED"]

MAX_SEED = 2**63 - 1  # noise keys are int64


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int >= 1.

    >>> positive_int(3, "num_samples")
    3
    >>> positive_int(True, "num_samples")
    Traceback (most recent call last):
    ...
    TypeError: num_samples must be a positive int, got True (bool)
    """
    if value is None and allow_none:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def fresh_seed() -> int:
    """A seed from the operating system's randomness (torch's global RNG is not touched)."""
    return secrets.randbits(62)


def seeds(seed: Any, n: int, *, span: int = 1, name: str = "seed") -> list[int]:
    """One seed per prompt: an int for all, or a sequence of ``n`` ints.

    ``span`` seeds are used from each (sample ``j`` uses ``seed + j``), so each
    must leave room for them below 2**63.

    >>> seeds(5, 2)
    [5, 5]
    >>> seeds([1, 2], 2)
    [1, 2]
    >>> seeds("12", 1)
    Traceback (most recent call last):
    ...
    TypeError: seed must be an int or a sequence of ints (one per prompt), got '12' (str)
    """
    accepted = "an int or a sequence of ints (one per prompt)"
    if _is_int(seed):
        values = [int(seed)] * n
    elif isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence) and not hasattr(seed, "tolist"):
        raise TypeError(f"{name} must be {accepted}, got {seed!r} ({type(seed).__name__})")
    else:
        raw = seed.tolist() if hasattr(seed, "tolist") else list(seed)
        bad = [s for s in raw if not _is_int(s)]
        if bad:
            raise TypeError(f"{name} must be {accepted}; {bad[0]!r} ({type(bad[0]).__name__}) is not an int")
        values = [int(s) for s in raw]
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} values for {n} prompts; give one int or one per prompt")
    for s in values:
        if not 0 <= s <= MAX_SEED - (span - 1):
            raise ValueError(
                f"{name} {s} is outside [0, 2**63 - {span}]: seeds key int64 noise and sample j uses seed + j"
            )
    return values


def token_ids(ids: Any, name: str, vocab_size: Optional[int] = None) -> list[int]:
    """A sequence of token ids as a list of ints, checked against the vocabulary.

    Bytes, bools and floats are refused (they are not token ids, whatever they
    would convert to).

    >>> token_ids([3, 4], "observed[0]", vocab_size=10)
    [3, 4]
    >>> token_ids([1.0], "observed[0]")
    Traceback (most recent call last):
    ...
    TypeError: observed[0] must hold int token ids; 1.0 (float) is not one
    """
    if isinstance(ids, (bytes, bytearray, str)):
        raise TypeError(f"{name} must be a list of int token ids or a string, got {type(ids).__name__}")
    if hasattr(ids, "tolist") and not isinstance(ids, list):
        dtype = getattr(ids, "dtype", None)
        if dtype is not None and getattr(dtype, "is_floating_point", False):
            raise TypeError(f"{name} is a floating-point tensor; token ids must be integers")
        ids = ids.tolist()
    out = []
    for v in ids:
        if not _is_int(v):
            raise TypeError(f"{name} must hold int token ids; {v!r} ({type(v).__name__}) is not one")
        out.append(int(v))
    if vocab_size is not None:
        bad = [t for t in out if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"{name} holds token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab_size}): "
                "the tokenizer does not belong to this model"
            )
    return out


def text(value: str, name: str) -> str:
    """A prompt or continuation string that a tokenizer can encode (non-empty, valid Unicode).

    >>> text("hi", "prompts[0]")
    'hi'
    >>> text("a\\ud800", "prompts[0]")
    Traceback (most recent call last):
    ...
    ValueError: prompts[0] holds a lone surrogate '\\ud800' at character 1, which is not valid Unicode text; decode the source bytes with errors='replace' or remove it
    """
    if not value:
        raise ValueError(f"{name} is empty: give at least one token of text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} holds a lone surrogate {value[err.start]!r} at character {err.start}, which is not valid "
            "Unicode text; decode the source bytes with errors='replace' or remove it"
        ) from None
    return value


def stop_strings(value: Any) -> list[str]:
    """``stop_strings`` as a list of non-empty strings.

    >>> stop_strings("\\n")
    ['\\n']
    >>> stop_strings([""])
    Traceback (most recent call last):
    ...
    ValueError: stop_strings[0] is empty: an empty string is in every text, so every row would stop after one token
    """
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, Sequence):
        raise TypeError(f"stop_strings must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for i, s in enumerate(values):
        if not isinstance(s, str):
            raise TypeError(f"stop_strings[{i}] must be a string, got {type(s).__name__}")
        if not s:
            raise ValueError(
                f"stop_strings[{i}] is empty: an empty string is in every text, so every row would stop after "
                "one token"
            )
        out.append(s)
    return out


def available_memory() -> Optional[int]:
    """Bytes of memory the OS says are available now (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, what: str, *, available: Optional[int] = None) -> None:
    """Refuse up front a call whose largest allocation cannot fit, with the numbers.

    >>> check_memory(10, "the logits", available=100)
    >>> check_memory(200 * 2**30, "the logits", available=2**30)
    Traceback (most recent call last):
    ...
    MemoryError: the logits need about 200.0 GiB but only 1.0 GiB of memory is available; use fewer prompts, samples or tokens per call (split the call)
    """
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} need about {needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is "
            "available; use fewer prompts, samples or tokens per call (split the call)"
        )
