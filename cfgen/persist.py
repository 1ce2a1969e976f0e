"""Save and load pyvene interventions on any device (CPU included), safely.

A saved intervention folder is *data*: loading it never imports a module or
calls a function named in it. Two layouts are read:

* cfgen's own (written by :func:`save`): ``cfgen_intervention.json`` (format
  version, mode, and per intervention its key, representation fields, class,
  constructor kwargs, ``interchange_dim``, whether its source is a constant and
  its state file) plus one state dict per intervention:
  ``intkey_<key>.safetensors`` (format 2, the default) or
  ``intkey_<key>.bin`` (format 1, the catalogue's; read with
  ``torch.load(weights_only=True)``);
* pyvene's (written by ``pv.IntervenableModel.save`` or ``save(..., format="pyvene")``):
  ``config.json`` plus ``intkey_<key>.bin``.

Classes are looked up in an allow-list (pyvene 0.1.8's intervention classes,
:class:`cfgen.CounterfactualSampling`, and classes passed to
:func:`register_intervention` or ``load(..., classes=[...])``); constructor
kwargs are checked against the class's signature and JSON types; state files
must lie inside the folder; their keys, shapes and dtypes must match the
rebuilt intervention. Anything else raises :class:`FormatError`.

>>> import tempfile, torch, transformers
>>> from cfgen.abstraction import make_intervenable, rotation_config
>>> from cfgen import persist
>>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
...     vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
>>> trained = make_intervenable(gpt2, rotation_config(0, rank=2), seed=3)
>>> with tempfile.TemporaryDirectory() as folder:
...     _ = persist.save(trained, folder + "/rotation")
...     loaded = persist.load(folder + "/rotation", gpt2)
>>> a, b = (next(iter(m.interventions.values())).rotate_layer.weight for m in (trained, loaded))
>>> torch.equal(a, b)
True
"""

from __future__ import annotations

import errno
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
import typing
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    import pyvene as pv

__all__ = ["save", "load", "register_intervention", "FormatError", "MANIFEST", "PYVENE_CONFIG"]

MANIFEST = "cfgen_intervention.json"
PYVENE_CONFIG = "config.json"
_FORMAT = 2
_FORMATS = (1, 2)
_MAX_JSON_BYTES = 8 * 2**20
_MAX_DEPTH = 32
# RepresentationConfig fields that are objects (rebuilt from the class + state dict), not JSON.
_OBJECT_FIELDS = ("intervention", "intervention_type", "source_representation")
# pyvene 0.1.8's own intervention classes that can be rebuilt from JSON kwargs (PCARotatedSpaceIntervention
# needs a fitted sklearn PCA object at construction, so it cannot be).
_PYVENE_CLASSES = (
    "VanillaIntervention", "AdditionIntervention", "SubtractionIntervention", "ZeroIntervention",
    "CollectIntervention", "SkipIntervention", "NoiseIntervention", "SigmoidMaskIntervention",
    "RotatedSpaceIntervention", "BoundlessRotatedSpaceIntervention", "SigmoidMaskRotatedSpaceIntervention",
    "LowRankRotatedSpaceIntervention", "AutoencoderIntervention", "JumpReLUAutoencoderIntervention",
)
_CFGEN_CLASSES = (("cfgen.intervention", "CounterfactualSampling"),)
_REGISTERED: dict[str, type] = {}
_MANIFEST_KEYS = {"format", "library", "pyvene_version", "mode", "model_class", "use_fast", "interventions"}
_ENTRY_KEYS = {"key", "class", "representation", "init_kwargs", "interchange_dim", "is_source_constant",
               "state_file"}
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class FormatError(ValueError):
    """A saved intervention folder that cfgen refuses to load; names the folder, file, entry and problem.

    Example:
        >>> import cfgen
        >>> err = cfgen.FormatError("/data/iv", "cfgen_intervention.json", "interventions[0]", "no 'class'")
        >>> str(err)
        "/data/iv/cfgen_intervention.json, interventions[0]: no 'class'"
        >>> isinstance(err, ValueError)
        True
    """

    def __init__(self, folder: Any, file: Optional[str], entry: Optional[str], problem: str):
        self.folder, self.file, self.entry, self.problem = str(folder), file, entry, problem
        where = self.folder + (f"/{file}" if file else "") + (f", {entry}" if entry else "")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep it picklable (multiprocessing, pytest-xdist) despite the keyword-rich __init__
        return (type(self), (self.folder, self.file, self.entry, self.problem))


# ---------------------------------------------------------------------------------------------- allow-list


def _pyvene():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import pyvene
    return pyvene


def _class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_intervention(cls: type) -> type:
    """Allow ``cls`` (a pyvene ``Intervention`` subclass) to be named by folders loaded in this process.

    cfgen never imports a class named in a folder; a class of your own must be
    imported by you and registered (or passed as ``cfgen.load(..., classes=[cls])``).
    Returns ``cls``, so it also works as a class decorator.

    Example:
        >>> import cfgen, pyvene as pv
        >>> class Scale(pv.VanillaIntervention):
        ...     pass
        >>> cfgen.register_intervention(Scale) is Scale
        True
    """
    pv = _pyvene()
    if not (isinstance(cls, type) and issubclass(cls, pv.Intervention)):
        raise TypeError(f"register_intervention expects a subclass of pyvene.Intervention, got {cls!r}")
    _REGISTERED[_class_key(cls)] = cls
    return cls


def _allowed(extra: Iterable[type] = ()) -> dict[str, type]:
    """Every allowed class under both spellings: cfgen's ``module:Qualname`` and pyvene's dotted ``module.Qualname``."""
    import importlib

    pv = _pyvene()
    classes = [getattr(pv.models.interventions, name) for name in _PYVENE_CLASSES]
    classes += [getattr(importlib.import_module(mod), name) for mod, name in _CFGEN_CLASSES]  # fixed names only
    classes += list(_REGISTERED.values())
    for cls in extra:
        if not (isinstance(cls, type) and issubclass(cls, pv.Intervention)):
            raise TypeError(f"classes= expects subclasses of pyvene.Intervention, got {cls!r}")
        classes.append(cls)
    table: dict[str, type] = {}
    for cls in classes:
        table[_class_key(cls)] = cls
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return table


def _refused(name: str) -> str:
    short = name.replace(":", ".").rsplit(".", 1)[-1]
    return (
        f"intervention class {name!r} is not allowed: cfgen loads only pyvene's own intervention classes, "
        f"cfgen's, and classes registered in this process, and never imports a class named in a folder. If you "
        f"trust this folder, import {short} yourself and call cfgen.register_intervention({short}) or pass "
        f"cfgen.load(..., classes=[{short}])"
    )


# ---------------------------------------------------------------------------------------------- JSON checks


def _read_json_object(folder: Path, name: str, what: str) -> dict:
    """The file's JSON object (``what`` names it in errors), size- and depth-limited."""
    path = _inside(folder, name, None, folder)
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
        raise FormatError(folder, name, None, f"{size} bytes is too large for a manifest (limit {_MAX_JSON_BYTES})")
    raw = path.read_bytes()
    if not raw.strip():
        raise FormatError(folder, name, None, "the file is empty")

    def constant(token: str) -> Any:
        raise ValueError(f"{token} is not a JSON number")

    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise FormatError(folder, name, None, "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(folder, name, None, f"invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(folder, name, None, f"the {what} must be a JSON object, got {type(value).__name__}")
    if _depth(value) > _MAX_DEPTH:
        raise FormatError(folder, name, None, f"JSON nested deeper than {_MAX_DEPTH} levels")
    return value


def _depth(value: Any, limit: int = _MAX_DEPTH) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:  # iterative: a hostile manifest must not overflow the interpreter's stack
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
        elif isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _partition(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(s, list) and len(s) > 0 and all(_is_int(i) and i >= 0 for i in s) for s in v
    )


def _name(v: Any) -> bool:
    # Module paths and units are walked with getattr by pyvene: plain dotted identifiers, no dunders.
    return isinstance(v, str) and bool(_NAME.fullmatch(v)) and not any(p.startswith("__") for p in v.split("."))


def _key_like(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, str) and len(v) < 256)


_KNOWN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "layer": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "component": (_name, "a dotted module path (letters, digits, _ and .)"),
    "unit": (_name, "a unit name such as 'pos', 'h' or 'h.pos'"),
    "max_number_of_units": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "low_rank_dimension": (_opt(lambda v: _is_int(v) and v >= 1), "null or an int >= 1"),
    "subspace_partition": (_opt(_partition), "null or a non-empty list of non-empty lists of ints >= 0"),
    "group_key": (_opt(_key_like), "null, an int or a short string"),
    "intervention_link_key": (_opt(_key_like), "null, an int or a short string"),
    "moe_key": (_opt(_key_like), "null, an int or a short string"),
    "hidden_source_representation": (_opt(lambda v: isinstance(v, bool)), "null or a bool"),
    "latent_dim": (_opt(lambda v: _is_int(v) and v >= 1), "null or an int >= 1"),
    "embed_dim": (_opt(lambda v: _is_int(v) and v >= 1), "null or an int >= 1"),
    "keep_last_dim": (lambda v: isinstance(v, bool), "a bool"),
    "use_fast": (lambda v: isinstance(v, bool), "a bool"),
    "noise_leve": (_is_number, "a finite number"),  # sic: pyvene's NoiseIntervention spells it so
}
_ANNOTATION_CHECKS: dict[Any, tuple[Callable[[Any], bool], str]] = {
    int: (_is_int, "an int"),
    float: (_is_number, "a finite number"),
    bool: (lambda v: isinstance(v, bool), "a bool"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _annotation_check(annotation: Any) -> Optional[tuple[Callable[[Any], bool], str]]:
    """A checker for simple annotations (int, float, bool, str, Optional of those); None when not checkable."""
    if annotation in _ANNOTATION_CHECKS:
        return _ANNOTATION_CHECKS[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in _ANNOTATION_CHECKS:
            check, what = _ANNOTATION_CHECKS[inner[0]]
            return _opt(check), f"null or {what}"
    return None


def _plain_json(v: Any) -> bool:
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, (int, float)):
        return _is_number(v)
    if isinstance(v, list):
        return all(_plain_json(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain_json(x) for k, x in v.items())
    return False


def _kwargs_problem(cls: type, kwargs: Any) -> Optional[str]:
    """Why ``cls(**kwargs)`` is not an acceptable call from JSON data, or None."""
    if not isinstance(kwargs, dict):
        return f"constructor kwargs must be a JSON object, got {type(kwargs).__name__}"
    if _depth(kwargs) > 8 or not _plain_json(kwargs):
        return "constructor kwargs must be plain JSON values (no NaN or infinity, nested at most 8 levels)"
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return f"cannot read the constructor signature of {cls.__qualname__}"
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the known-name checks only
        hints = {}
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    accepted = set(named) | (set(_KNOWN) if open_kwargs else set())
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        return f"{cls.__qualname__} does not take the argument(s) {unknown} (it accepts {sorted(accepted)})"
    missing = sorted(n for n, p in named.items() if p.default is p.empty and n not in kwargs)
    if missing:
        return f"{cls.__qualname__} needs the argument(s) {missing}, which are missing"
    for name, value in kwargs.items():
        checks = [_KNOWN[name]] if name in _KNOWN else []
        hinted = _annotation_check(hints[name]) if name in hints else None
        if hinted is not None:
            checks.append(hinted)
        for check, what in checks:
            if not check(value):
                return f"argument {name!r} of {cls.__qualname__} must be {what}, got {value!r:.80}"
    return None


def _representation_problem(rep: Any) -> Optional[str]:
    pv = _pyvene()
    fields = [f for f in pv.RepresentationConfig._fields if f not in _OBJECT_FIELDS]
    if not isinstance(rep, dict):
        return f"'representation' must be a JSON object, got {type(rep).__name__}"
    unknown = sorted(set(rep) - set(fields))
    if unknown:
        return f"unknown representation field(s) {unknown} (pyvene's are {fields})"
    for name, value in rep.items():
        check, what = _KNOWN[name]
        if not check(value):
            return f"representation field {name!r} must be {what}, got {value!r:.80}"
    return None


# ---------------------------------------------------------------------------------------------- files and tensors


def _inside(folder: Path, name: Any, entry: Optional[str], shown: Path, named_in: Optional[str] = None) -> Path:
    """``folder/name`` if it is a plain file name of a regular file whose real path lies inside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise FormatError(shown, named_in, entry, f"file name {name!r} is not a plain file name inside the folder")
    path = folder / name
    try:
        real, root = path.resolve(strict=True), folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise FormatError(shown, name, entry, "the file does not exist") from None
    if real.parent != root:
        raise FormatError(shown, name, entry, f"the file resolves to {real}, outside the folder")
    if not real.is_file():
        raise FormatError(shown, name, entry, "not a regular file")
    return real


def _read_state(folder: Path, name: str, entry: str, device: torch.device) -> dict[str, torch.Tensor]:
    path = _inside(folder, name, entry, folder)
    if path.stat().st_size == 0:
        raise FormatError(folder, name, entry, "the tensor file is empty")
    try:
        if name.endswith(".safetensors"):
            import safetensors.torch

            state = safetensors.torch.load_file(str(path), device=str(device))
        elif name.endswith(".bin"):
            # weights_only: torch's restricted unpickler, which builds tensors and containers but calls nothing else.
            state = torch.load(path, map_location=device, weights_only=True)
        else:
            raise FormatError(folder, name, entry, "state files must end in .safetensors or .bin")
    except FormatError:
        raise
    except Exception as exc:  # any reader failure (truncated, corrupt, disallowed pickle) is a bad folder
        raise FormatError(folder, name, entry, f"cannot read the tensors ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise FormatError(folder, name, entry, "the file does not hold a state dict (names -> tensors)")
    return dict(state)


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


def _check_state(state: dict[str, torch.Tensor], intervention: torch.nn.Module) -> Optional[str]:
    """Why ``state`` does not fit ``intervention`` (keys, shapes, dtypes), or None."""
    expected = intervention.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return f"state keys differ from the rebuilt intervention's: missing {missing}, unexpected {extra}"
    for k, want in expected.items():
        got = state[k]
        if got.shape != want.shape:
            return f"tensor {k!r} has shape {list(got.shape)}, the rebuilt intervention needs {list(want.shape)}"
        if not _same_kind(got.dtype, want.dtype):
            return f"tensor {k!r} has dtype {got.dtype}, the rebuilt intervention needs {want.dtype}"
    source = state.get("source_representation")
    if source is not None:  # its buffer is made from the file, so check it against the site's size instead
        embed = getattr(intervention, "embed_dim", None)
        if not source.is_floating_point():
            return f"tensor 'source_representation' has dtype {source.dtype}, a floating dtype is needed"
        if isinstance(embed, torch.Tensor) and (source.dim() == 0 or source.shape[-1] != int(embed)):
            return (f"tensor 'source_representation' has shape {list(source.shape)}, its last dimension must be the "
                    f"intervention's embed_dim {int(embed)}")
    return None


def _attach_source(intervention: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    # A constant source vector is a buffer only once set; pyvene rebuilds it the same way.
    if "source_representation" in state and not isinstance(
        getattr(intervention, "source_representation", None), torch.Tensor
    ):
        if hasattr(intervention, "source_representation"):  # a plain ``None`` attribute blocks register_buffer
            delattr(intervention, "source_representation")
        intervention.register_buffer("source_representation", torch.empty_like(state["source_representation"]))


def _load_state(intervention: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` in, keeping the saved floating dtypes (a bf16 intervention stays bf16).

    Copying (not assigning) keeps the rebuilt tensors' memory layout, which the orthogonal parametrisation's
    numerics depend on: an assigned contiguous copy of a transposed parameter gives weights that differ in the last bit.
    """
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = intervention.get_submodule(owner_name)
        current = getattr(owner, attr)
        if current.dtype != value.dtype:
            fresh = torch.empty_like(current, dtype=value.dtype)
            setattr(owner, attr, torch.nn.Parameter(fresh, current.requires_grad)
                    if isinstance(current, torch.nn.Parameter) else fresh)
    intervention.load_state_dict(state, strict=True)


def _construct(cls: type, kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # constructors may draw random inits; keep the caller's RNG untouched
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- save


def _class_path(cls: type) -> str:
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(
            f"intervention class {cls.__qualname__} is defined in {cls.__module__!r} (or inside a function); "
            "define it at the top level of an importable module so that it can be named when loading"
        )
    obj: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    if obj is not cls:
        raise ValueError(f"intervention class {cls.__qualname__} is not reachable as {_class_key(cls)}")
    return _class_key(cls)


def _compress_partition(expanded: list[list[int]]) -> list[list[int]]:
    """pyvene expands ``[a, b]`` pairs into ``range(a, b)`` at construction; undo it so the rebuild is identical."""
    out = []
    for sub in expanded:
        sub = [int(i) for i in sub]
        if sub and sub == list(range(sub[0], sub[0] + len(sub))):
            out.append([sub[0], sub[0] + len(sub)])
        else:
            out.append(sub)  # a 2-element non-range would be re-expanded: caught by the rebuild comparison
    return out


def _instance_kwargs(intervention: torch.nn.Module) -> dict[str, Any]:
    """Constructor arguments that live only on the instance (pyvene's own save drops them)."""
    found: dict[str, Any] = {}
    rotate = getattr(intervention, "rotate_layer", None)
    weight = getattr(rotate, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] != weight.shape[1]:
        found["low_rank_dimension"] = int(weight.shape[1])
    w_enc = getattr(intervention, "W_enc", None)
    if isinstance(w_enc, torch.Tensor) and w_enc.dim() == 2:
        found["low_rank_dimension"] = int(w_enc.shape[1])
    latent = getattr(getattr(intervention, "autoencoder", None), "latent_dim", None)
    if latent is not None:
        found["latent_dim"] = int(latent)
    partition = getattr(intervention, "subspace_partition", None)
    if partition is not None:
        found["subspace_partition"] = _compress_partition(partition)
    return found


def _plan(key: str, rep: Any, intervention: torch.nn.Module, fmt: str) -> dict[str, Any]:
    """Validate one intervention for saving and compute what is written; nothing touches the disk."""
    pv = _pyvene()
    cls = type(intervention)
    if isinstance(intervention, pv.PCARotatedSpaceIntervention) or not isinstance(intervention, pv.Intervention):
        raise ValueError(
            f"intervention {key!r} ({cls.__qualname__}) cannot be rebuilt from JSON arguments: "
            + ("its constructor needs a fitted PCA object" if isinstance(intervention, pv.Intervention)
               else "it is not a pyvene Intervention (a lambda or plain module)")
        )
    path = _class_path(cls)
    constant = isinstance(getattr(intervention, "source_representation", None), torch.Tensor)
    fields = {k: v for k, v in rep._asdict().items() if k not in _OBJECT_FIELDS}
    fields.update({k: v for k, v in _instance_kwargs(intervention).items() if k in fields})
    fields["hidden_source_representation"] = True if constant or fields["hidden_source_representation"] else None
    embed = getattr(intervention, "embed_dim", None)
    embed = int(embed) if isinstance(embed, torch.Tensor) else embed
    if fmt == "pyvene":
        # pyvene rebuilds from the representation fields plus the component's size: nothing else travels.
        kwargs = {**fields, "embed_dim": embed, "use_fast": bool(getattr(intervention, "use_fast", False))}
    else:
        kwargs = dict(fields)
        if fields["hidden_source_representation"] is None:
            del kwargs["hidden_source_representation"]  # pyvene reads any non-None value as "constant source"
        kwargs["embed_dim"] = embed
        extra = getattr(intervention, "init_kwargs", None)  # what an intervention records of its own construction
        if isinstance(extra, dict):
            kwargs.update(extra)
        params = inspect.signature(cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    problem = _representation_problem(fields) or _kwargs_problem(cls, kwargs)
    if problem:
        raise ValueError(f"cannot save intervention {key!r}: {problem}")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in intervention.state_dict().items()}
    dim = getattr(intervention, "interchange_dim", None)
    dim = dim.tolist() if isinstance(dim, torch.Tensor) else dim
    # Rebuild it now, as load will, so that a folder that would not load is never written.
    if fmt == "cfgen":
        rebuilt = _rebuild_for_save(key, cls, kwargs, state, dim)
        for name in ("keep_last_dim", "use_fast"):  # only when the constructor does not already set it so
            value = getattr(intervention, name, None)
            if isinstance(value, bool) and getattr(rebuilt, name, None) != value and name not in kwargs:
                kwargs[name] = value
                rebuilt = _rebuild_for_save(key, cls, kwargs, state, dim)
    else:  # what pyvene's IntervenableModel passes to the class it names
        dry = {**rep._asdict(), **fields, "intervention": None, "intervention_type": cls,
               "source_representation": None, "embed_dim": embed, "use_fast": kwargs["use_fast"]}
        rebuilt = _rebuild_for_save(key, cls, dry, state, dim)
    problem = _check_state(state, rebuilt)
    if fmt == "pyvene" and problem is None and not (isinstance(intervention, pv.TrainableIntervention) or constant):
        # pyvene's save writes no tensors for this one: its state must be what the constructor makes anyway.
        fresh = rebuilt.state_dict()
        changed = sorted(k for k, v in state.items() if not torch.equal(v, fresh[k].cpu()))
        if changed:
            problem = f"pyvene's format stores no tensors for a non-trainable intervention, and {changed} differ " \
                      "from a freshly built one"
    for name in ("subspace_partition", "keep_last_dim", "use_fast"):
        if problem is None and getattr(rebuilt, name, None) != getattr(intervention, name, None):
            problem = (f"its {name} ({getattr(intervention, name, None)!r}) would be rebuilt as "
                       f"{getattr(rebuilt, name, None)!r}")
    if problem:
        hint = (" pyvene's format cannot carry it: save with format='cfgen'" if fmt == "pyvene"
                else " give the class an `init_kwargs` dict of its constructor arguments")
        raise ValueError(f"cannot save intervention {key!r} ({cls.__qualname__}) faithfully: {problem};{hint}")
    return {"key": key, "class": path, "cls": cls, "representation": fields, "init_kwargs": kwargs,
            "interchange_dim": dim, "is_source_constant": bool(getattr(intervention, "is_source_constant", False)),
            "state": state, "constant": constant}


def _rebuild_for_save(key: str, cls: type, kwargs: dict[str, Any], state: dict[str, torch.Tensor], dim: Any):
    try:
        rebuilt = _construct(cls, kwargs)
    except Exception as exc:
        raise ValueError(f"cannot save intervention {key!r}: {cls.__qualname__}(**{kwargs}) fails ({exc})") from None
    _finish(rebuilt, state, dim)
    return rebuilt


def _finish(intervention: torch.nn.Module, state: dict[str, torch.Tensor], dim: Any) -> None:
    """What a rebuilt intervention gets before its state is compared: the interchange dim and a source buffer."""
    if dim is not None:
        intervention.set_interchange_dim(dim)
    _attach_source(intervention, state)


def _replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary folder beside ``folder``, then swap it into place; on failure ``folder`` is untouched."""
    parent = folder.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.exists():
        foreign = sorted(p.name for p in folder.iterdir()
                         if p.name not in (MANIFEST, PYVENE_CONFIG) and not p.name.startswith("intkey_"))
        config = folder / PYVENE_CONFIG
        if config.is_file() and not (folder / MANIFEST).exists() and b'"intervention_types"' not in config.read_bytes():
            foreign.append(PYVENE_CONFIG)  # a model's config.json, not pyvene's intervention config
        if foreign:
            raise ValueError(f"{folder} holds files that are not part of a saved intervention ({foreign[:5]}): "
                             "saving replaces the whole folder; move them or save elsewhere")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".saving", dir=parent))
    try:
        write(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        probe = tmp / ".mode"
        probe.touch()
        mode = probe.stat().st_mode & 0o777
        probe.unlink()
        os.chmod(tmp, mode | (mode & 0o444) >> 2)  # mkdtemp makes 0700; give the folder the umask's usual mode
        if folder.exists() and _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        elif folder.exists():  # no atomic exchange here: two renames, the old folder restored on failure
            old = parent / f".{folder.name}.{uuid.uuid4().hex}.old"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available.

    Readers then see the old folder or the new one, never no folder. Python's os module has no binding for it.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without it: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _write_state(path: Path, state: dict[str, torch.Tensor], fmt: str) -> None:
    if fmt == "pyvene":
        torch.save(state, path)  # pyvene's loader reads intkey_*.bin with torch.load
    else:
        import safetensors.torch

        safetensors.torch.save_file(state, str(path))


def save(
    intervenable: pv.IntervenableModel, directory: str | os.PathLike, *, format: Literal["cfgen", "pyvene"] = "cfgen"
) -> Path:
    """Write ``intervenable``'s interventions (not the model) to the folder ``directory``; returns it.

    Everything is checked first (each class is importable by name, its
    constructor arguments are JSON and rebuild an intervention with the same
    state shapes and settings); the files are written into a temporary folder
    beside ``directory`` and swapped into place, so a failed save leaves an
    existing folder exactly as it was. ``format="pyvene"`` writes
    ``IntervenableModel.save``'s layout (``config.json`` + ``intkey_*.bin``),
    which ``pyvene.IntervenableModel.load`` reads too.

    Example:
        >>> import tempfile, transformers, pyvene as pv, cfgen
        >>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
        >>> iv = pv.IntervenableModel(pv.IntervenableConfig(pv.RepresentationConfig(
        ...     0, "block_output", intervention=pv.AutoencoderIntervention(embed_dim=8, latent_dim=4))), gpt2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = cfgen.save(iv, tmp + "/ae")
        ...     sorted(p.name for p in folder.iterdir())[0]
        'cfgen_intervention.json'
    """
    pv = _pyvene()
    if not isinstance(intervenable, pv.IntervenableModel):
        raise TypeError(f"expected a pyvene IntervenableModel, got {type(intervenable).__name__}")
    if format not in ("cfgen", "pyvene"):
        raise ValueError(f"format must be 'cfgen' or 'pyvene', got {format!r}")
    folder = Path(directory)
    plans = [_plan(key, intervenable.representations[key], iv, format) for key, iv in intervenable.interventions.items()]
    if format == "pyvene":
        config = pv.IntervenableConfig(
            representations=[pv.RepresentationConfig(**p["representation"]) for p in plans], mode=intervenable.mode
        )
        config.sorted_keys = list(intervenable.sorted_keys)
        config.model_type = str(type(intervenable.model))
        config.intervention_types = [str(p["cls"]) for p in plans]
        config.intervention_dimensions = [p["interchange_dim"] for p in plans]
        config.intervention_constant_sources = [p["is_source_constant"] for p in plans]
        trainable = (pv.TrainableIntervention,)

        def write(tmp: Path) -> None:
            for p, iv in zip(plans, intervenable.interventions.values()):
                # the files pyvene's own save writes: trainable interventions and stored source vectors
                if isinstance(iv, trainable) or p["constant"]:
                    _write_state(tmp / f"intkey_{p['key']}.bin", p["state"], format)
            config.to_json_file(str(tmp / PYVENE_CONFIG), use_diff=True)

    else:
        manifest = {
            "format": _FORMAT,
            "library": "cfgen",
            "pyvene_version": getattr(pv, "__version__", None),
            "mode": intervenable.mode,
            "use_fast": bool(intervenable.use_fast),
            "model_class": f"{type(intervenable.model).__module__}.{type(intervenable.model).__qualname__}",
            "interventions": [
                {k: p[k] for k in ("key", "class", "representation", "init_kwargs", "interchange_dim",
                                   "is_source_constant")} | {"state_file": f"intkey_{p['key']}.safetensors"}
                for p in plans
            ],
        }
        for entry in manifest["interventions"]:
            _inside_name_ok(entry["state_file"], entry["key"])

        def write(tmp: Path) -> None:
            for p, entry in zip(plans, manifest["interventions"]):
                _write_state(tmp / entry["state_file"], p["state"], format)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    _replace_folder(Path(os.path.abspath(folder)), write)  # abspath: "." and "a/.." name a real folder to swap
    return folder


def _inside_name_ok(name: str, key: str) -> None:
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"intervention key {key!r} cannot be used as a file name")


# ---------------------------------------------------------------------------------------------- load


def _device(model: torch.nn.Module, device: Any) -> torch.device:
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    return torch.device(device)


def _entry_name(i: int, entry: Any) -> str:
    key = entry.get("key") if isinstance(entry, dict) else None
    return f"interventions[{i}]" + (f" ({key!r:.120})" if isinstance(key, str) else "")


def _load_cfgen(folder: Path, model: torch.nn.Module, device: torch.device, allowed: dict[str, type]):
    pv = _pyvene()
    manifest = _read_json_object(folder, MANIFEST, "manifest")

    def bad(entry: Optional[str], problem: str) -> FormatError:
        return FormatError(folder, MANIFEST, entry, problem)

    unknown = sorted(set(manifest) - _MANIFEST_KEYS)
    if unknown:
        raise bad(None, f"unknown top-level key(s) {unknown}")
    if not _is_int(manifest.get("format")) or manifest["format"] not in _FORMATS:  # true == 1 in Python
        raise bad(None, f"unsupported format {manifest.get('format')!r} (this cfgen reads {list(_FORMATS)})")
    mode = manifest.get("mode", "parallel")
    if mode not in ("parallel", "serial"):
        raise bad(None, f"'mode' must be 'parallel' or 'serial', got {mode!r:.80}")
    use_fast = manifest.get("use_fast", False)
    if not isinstance(use_fast, bool):
        raise bad(None, f"'use_fast' must be a bool, got {use_fast!r:.80}")
    entries = manifest.get("interventions")
    if not isinstance(entries, list) or not entries:
        raise bad(None, "'interventions' must be a non-empty list")
    # First pass: every entry's data, before any constructor runs.
    for i, entry in enumerate(entries):
        where = _entry_name(i, entry)
        if not isinstance(entry, dict):
            raise bad(where, f"each intervention must be a JSON object, got {type(entry).__name__}")
        missing, unknown = sorted(_ENTRY_KEYS - set(entry)), sorted(set(entry) - _ENTRY_KEYS)
        if missing or unknown:
            raise bad(where, f"missing key(s) {missing}, unknown key(s) {unknown}")
        if not isinstance(entry["key"], str) or not entry["key"]:
            raise bad(where, "'key' must be a non-empty string")
        name = entry["class"]
        if not isinstance(name, str):
            raise bad(where, f"'class' must be a string, got {type(name).__name__}")
        if name not in allowed or ":" not in name:
            raise bad(where, _refused(name))
        problem = (_representation_problem(entry["representation"])
                   or _kwargs_problem(allowed[name], entry["init_kwargs"]))
        if problem:
            raise bad(where, problem)
        dim = entry["interchange_dim"]
        if not (dim is None or (_is_int(dim) and dim >= 0)
                or (isinstance(dim, list) and all(_is_int(d) and d >= 0 for d in dim))):
            raise bad(where, f"'interchange_dim' must be null, an int or a list of ints, got {dim!r:.80}")
        if not isinstance(entry["is_source_constant"], bool):
            raise bad(where, "'is_source_constant' must be a bool")
        suffix = ".bin" if manifest["format"] == 1 else ".safetensors"
        if not (isinstance(entry["state_file"], str) and entry["state_file"].endswith(suffix)):
            raise bad(where, f"'state_file' must be a {suffix} file name for format {manifest['format']}")
        _inside(folder, entry["state_file"], where, folder, MANIFEST)
    keys = [e["key"] for e in entries]
    if len(set(keys)) != len(keys):
        raise bad(None, f"duplicate intervention keys {sorted({k for k in keys if keys.count(k) > 1})}")
    representations, states = [], []
    for i, entry in enumerate(entries):
        where = _entry_name(i, entry)
        cls = allowed[entry["class"]]
        state = _read_state(folder, entry["state_file"], where, device)
        try:
            intervention = _construct(cls, entry["init_kwargs"])
        except Exception as exc:
            raise bad(where, f"{cls.__qualname__}(**init_kwargs) failed: {type(exc).__name__}: {exc}") from None
        _finish(intervention, state, entry["interchange_dim"])
        problem = _check_state(state, intervention)
        if problem:
            raise FormatError(folder, entry["state_file"], where, problem)
        representations.append(pv.RepresentationConfig(**entry["representation"], intervention=intervention))
        states.append(state)
    intervenable = _build(folder, MANIFEST, pv.IntervenableConfig(representations=representations, mode=mode),
                          model, use_fast=use_fast)
    rebuilt = list(intervenable.interventions.keys())
    if rebuilt != keys:
        raise bad(None, f"intervention keys differ after rebuild: saved {keys}, rebuilt {rebuilt}")
    for entry, state, key in zip(entries, states, keys):
        intervention = intervenable.interventions[key]
        _load_state(intervention, state)
        if entry["interchange_dim"] is not None:
            intervention.set_interchange_dim(entry["interchange_dim"])
        intervention.is_source_constant = entry["is_source_constant"]
        intervention.to(device)
    return intervenable


def _build(folder: Path, file: str, config: Any, model: torch.nn.Module, **kwargs: Any):
    pv = _pyvene()
    try:
        with torch.random.fork_rng(devices=[]):
            return pv.IntervenableModel(config, model, **kwargs)
    except Exception as exc:  # wrong component / layer for this model and the like: the folder does not fit it
        raise FormatError(folder, file, None, f"cannot place the interventions on this model "
                                              f"({type(exc).__name__}: {exc})") from None


def _load_pyvene(folder: Path, model: torch.nn.Module, device: torch.device, allowed: dict[str, type]):
    pv = _pyvene()
    config = _read_json_object(folder, PYVENE_CONFIG, "config")

    def bad(entry: Optional[str], problem: str) -> FormatError:
        return FormatError(folder, PYVENE_CONFIG, entry, problem)

    if "intervention_types" not in config or "representations" not in config:
        raise bad(None, "not a pyvene intervention config (no 'intervention_types' / 'representations'); "
                        "is this a model folder?")
    reps, types = config["representations"], config["intervention_types"]
    if not isinstance(reps, list) or not reps or not isinstance(types, list) or len(types) != len(reps):
        raise bad(None, "'representations' and 'intervention_types' must be non-empty lists of the same length")
    n = len(reps)
    dims = config.get("intervention_dimensions") or [None] * n
    constants = config.get("intervention_constant_sources") or [False] * n
    if not (isinstance(dims, list) and len(dims) == n and isinstance(constants, list) and len(constants) == n):
        raise bad(None, "'intervention_dimensions' and 'intervention_constant_sources' must have one entry each")
    mode = config.get("mode", "parallel")
    if mode not in ("parallel", "serial"):
        raise bad(None, f"'mode' must be 'parallel' or 'serial', got {mode!r:.80}")
    fields = pv.RepresentationConfig._fields
    representations, classes = [], []
    for i, (rep, type_name, dim, constant) in enumerate(zip(reps, types, dims, constants)):
        where = f"representations[{i}]"
        if isinstance(rep, list):
            if len(rep) > len(fields):
                raise bad(where, f"{len(rep)} values for {len(fields)} RepresentationConfig fields")
            rep = dict(zip(fields, rep))
        if not isinstance(rep, dict):
            raise bad(where, f"each representation must be a list or an object, got {type(rep).__name__}")
        if any(rep.get(f) is not None for f in _OBJECT_FIELDS):
            raise bad(where, f"the object fields {list(_OBJECT_FIELDS)} must be null in a saved config")
        rep = {k: v for k, v in rep.items() if k not in _OBJECT_FIELDS}
        problem = _representation_problem(rep)
        if problem:
            raise bad(where, problem)
        if not isinstance(type_name, str):
            raise bad(f"intervention_types[{i}]", "must be a string such as \"<class 'pyvene...Intervention'>\"")
        dotted = type_name.removeprefix("<class '").removesuffix("'>")
        if dotted not in allowed or ":" in dotted:
            raise bad(f"intervention_types[{i}]", _refused(dotted))
        cls = allowed[dotted]
        params = inspect.signature(cls).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise bad(f"intervention_types[{i}]", f"{cls.__qualname__} takes no **kwargs, so pyvene cannot build it")
        if not (dim is None or _is_int(dim) or (isinstance(dim, list) and all(_is_int(d) for d in dim))):
            raise bad(f"intervention_dimensions[{i}]", f"must be null, an int or a list of ints, got {dim!r:.80}")
        if not isinstance(constant, bool):
            raise bad(f"intervention_constant_sources[{i}]", "must be a bool")
        representations.append(pv.RepresentationConfig(**rep, intervention_type=cls))
        classes.append(cls)
    intervenable = _build(folder, PYVENE_CONFIG, pv.IntervenableConfig(representations=representations, mode=mode),
                          model)
    keys = list(intervenable.interventions.keys())
    sorted_keys = config.get("sorted_keys")
    if sorted_keys is not None and sorted_keys != keys:
        raise bad("sorted_keys", f"saved keys {sorted_keys!r:.300} differ from the rebuilt {keys}")
    for i, key in enumerate(keys):
        where = f"intervention {key!r}"
        intervention = intervenable.interventions[key]
        dim = dims[i]
        if dim is None:  # pyvene's rule for configs written before it recorded dimensions
            cfg = getattr(model, "config", None)
            try:
                dim = cfg.hidden_size // (cfg.num_attention_heads if representations[i].component.startswith("head_")
                                          else 1)
            except (AttributeError, TypeError, ZeroDivisionError):
                raise bad(f"intervention_dimensions[{i}]",
                          "null, and the model has no hidden_size to infer it from") from None
        name = f"intkey_{key}.bin"
        needs = isinstance(intervention, pv.TrainableIntervention) or bool(representations[i].hidden_source_representation)
        if not ((folder / name).exists() or (folder / name).is_symlink()):
            if needs:
                raise FormatError(folder, name, where, "the state file is missing")
            intervention.set_interchange_dim(dim)
        else:
            state = _read_state(folder, name, where, device)
            _finish(intervention, state, dim)
            problem = _check_state(state, intervention)
            if problem:
                raise FormatError(folder, name, where, problem)
            _load_state(intervention, state)
        intervention.is_source_constant = constants[i]
        intervention.to(device)
    return intervenable


def load(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    *,
    device: str | torch.device | None = None,
    classes: Iterable[type] = (),
) -> pv.IntervenableModel:
    """Rebuild the ``pv.IntervenableModel`` saved in ``directory`` (by :func:`save` or pyvene's own save).

    Nothing named in the folder is imported or run: classes come from the
    allow-list (pyvene's, cfgen's, :func:`register_intervention` and
    ``classes``), tensors from a non-executing reader, files only from inside
    the folder. Tensors are mapped to ``device`` (default: the model's
    device). A malformed folder raises :class:`FormatError`; a path that is not
    a saved folder at all raises ``FileNotFoundError``.

    Example:
        >>> import tempfile, torch, transformers, pyvene as pv, cfgen
        >>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        ...     vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
        >>> iv = pv.IntervenableModel(pv.IntervenableConfig(pv.RepresentationConfig(
        ...     0, "block_output", low_rank_dimension=2, intervention_type=pv.LowRankRotatedSpaceIntervention)), gpt2)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     iv.save(tmp + "/pv")                        # pyvene's own layout # doctest: +ELLIPSIS
        ...     loaded = cfgen.load(tmp + "/pv", gpt2)
        Directory '...' created successfully.
        >>> w = [next(iter(m.interventions.values())).rotate_layer.weight for m in (iv, loaded)]
        >>> torch.equal(*w)
        True
    """
    folder = Path(directory)
    if not folder.is_dir() or not ((folder / MANIFEST).exists() or (folder / PYVENE_CONFIG).exists()
                                   or (folder / MANIFEST).is_symlink() or (folder / PYVENE_CONFIG).is_symlink()):
        raise FileNotFoundError(
            f"{folder / MANIFEST} not found: not a folder written by cfgen.persist.save "
            f"(nor {PYVENE_CONFIG} from pyvene's IntervenableModel.save)"
        )
    allowed = _allowed(classes)
    dev = _device(model, device)
    if (folder / MANIFEST).exists() or (folder / MANIFEST).is_symlink():
        return _load_cfgen(folder, model, dev, allowed)
    return _load_pyvene(folder, model, dev, allowed)
