"""Save and load pyvene interventions on any device (CPU included).

pyvene 0.1.8's own ``IntervenableModel.save`` / ``load`` lose constructor
kwargs that are not fields of ``RepresentationConfig``, and
``load_intervention`` maps tensors to ``cuda:0`` (which fails on a CPU-only
machine). cfgen's format is a small JSON manifest plus one ``torch.save``'d
state dict per intervention (the same ``intkey_<key>.bin`` names pyvene uses):

* ``cfgen_intervention.json``: format version, the mode, and per intervention
  its key, its representation fields, the intervention class's dotted path,
  the constructor kwargs (JSON values only), ``interchange_dim`` and whether
  its source is a constant;
* ``intkey_<key>.bin``: the intervention's ``state_dict`` (rotations, learned
  boundaries, constant source vectors, ...).

``load`` rebuilds each intervention from its class and kwargs, loads the
state dict mapped to the model's device, and returns a working
``pv.IntervenableModel`` around ``model``.

>>> import tempfile, torch, transformers
>>> from cfgen.abstraction import make_intervenable, rotation_config
>>> from cfgen import persist
>>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
...     vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
>>> trained = make_intervenable(gpt2, rotation_config(0, rank=2), seed=3)
>>> with tempfile.TemporaryDirectory() as folder:
...     _ = persist.save(trained, folder)
...     loaded = persist.load(folder, gpt2)
>>> a, b = (next(iter(m.interventions.values())).rotate_layer.weight for m in (trained, loaded))
>>> torch.equal(a, b)
True
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    import pyvene as pv

__all__ = ["save", "load", "MANIFEST"]

MANIFEST = "cfgen_intervention.json"
_FORMAT = 1
# RepresentationConfig fields that are objects (rebuilt from the class + state dict), not JSON.
_OBJECT_FIELDS = {"intervention", "intervention_type", "source_representation"}
# Constructor kwargs pyvene interventions read, recovered from the live object when present.
_ATTR_KWARGS = ("keep_last_dim", "use_fast")


def _pyvene():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import pyvene
    return pyvene


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _class_path(obj: Any) -> str:
    cls = type(obj)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(
            f"intervention class {cls.__qualname__} is defined in {cls.__module__!r} (or inside a function); "
            "define it at the top level of an importable module so that it can be re-imported on load"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _init_kwargs(rep: Any, intervention: torch.nn.Module) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, value in rep._asdict().items():
        if name in _OBJECT_FIELDS:
            continue
        if name == "hidden_source_representation":
            # pyvene treats any non-None value (False included) as "constant source"
            # and then never sets source_representation; pass it only when true.
            constant = isinstance(getattr(intervention, "source_representation", None), torch.Tensor)
            if not (value or constant or getattr(rep, "source_representation", None) is not None):
                continue
            value = True
        kwargs[name] = value
    if isinstance(getattr(intervention, "embed_dim", None), torch.Tensor):
        kwargs["embed_dim"] = int(intervention.embed_dim)
    for name in _ATTR_KWARGS:
        if hasattr(intervention, name) and _jsonable(getattr(intervention, name)):
            kwargs[name] = getattr(intervention, name)
    # Low-rank layers: the rank is the weight's second dimension, even when the user built the instance.
    rotate = getattr(intervention, "rotate_layer", None)
    if kwargs.get("low_rank_dimension") is None and rotate is not None:
        weight = getattr(rotate, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] != weight.shape[1]:
            kwargs["low_rank_dimension"] = int(weight.shape[1])
    # Anything an intervention records about its own construction (cfgen's own types do).
    extra = getattr(intervention, "init_kwargs", None)
    if isinstance(extra, dict):
        kwargs.update(extra)
    bad = sorted(k for k, v in kwargs.items() if not _jsonable(v))
    if bad:
        raise ValueError(f"constructor kwargs {bad} of {type(intervention).__name__} are not JSON-serialisable")
    return kwargs


def save(intervenable: pv.IntervenableModel, directory: str | os.PathLike) -> Path:
    """Write ``intervenable``'s interventions (not the model) to ``directory``; returns the folder.

    The folder is created if needed; existing files of the same names are
    overwritten. Intervention classes must be importable (module top level).
    """
    pv = _pyvene()
    if not isinstance(intervenable, pv.IntervenableModel):
        raise TypeError(f"expected a pyvene IntervenableModel, got {type(intervenable).__name__}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for key, intervention in intervenable.interventions.items():
        rep = intervenable.representations[key]
        dim = getattr(intervention, "interchange_dim", None)
        if isinstance(dim, torch.Tensor):
            dim = dim.tolist()
        state = {k: v.detach().cpu().clone() for k, v in intervention.state_dict().items()}
        filename = f"intkey_{key}.bin"
        torch.save(state, folder / filename)
        entries.append(
            {
                "key": key,
                "class": _class_path(intervention),
                "representation": {k: v for k, v in rep._asdict().items() if k not in _OBJECT_FIELDS},
                "init_kwargs": _init_kwargs(rep, intervention),
                "interchange_dim": dim,
                "is_source_constant": bool(getattr(intervention, "is_source_constant", False)),
                "state_file": filename,
            }
        )
        bad = [k for k, v in entries[-1]["representation"].items() if not _jsonable(v)]
        if bad:
            raise ValueError(f"representation fields {bad} of {key} are not JSON-serialisable")
    manifest = {
        "format": _FORMAT,
        "library": "cfgen",
        "pyvene_version": getattr(pv, "__version__", None),
        "mode": intervenable.mode,
        "model_class": f"{type(intervenable.model).__module__}.{type(intervenable.model).__qualname__}",
        "interventions": entries,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def load(
    directory: str | os.PathLike, model: torch.nn.Module, *, device: str | torch.device | None = None
) -> pv.IntervenableModel:
    """Rebuild the ``pv.IntervenableModel`` saved by :func:`save` around ``model``.

    Tensors are mapped to ``device`` (default: the model's device). The
    returned object gives outputs identical to the saved one for the same
    inputs.
    """
    pv = _pyvene()
    folder = Path(directory)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a folder written by cfgen.persist.save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != _FORMAT:
        raise ValueError(f"unsupported cfgen intervention format {manifest.get('format')!r} (expected {_FORMAT})")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    representations, states = [], []
    with torch.random.fork_rng(devices=[]):  # constructors may draw random inits; keep the caller's RNG untouched
        for entry in manifest["interventions"]:
            cls = _import_class(entry["class"])
            state = torch.load(folder / entry["state_file"], map_location=device, weights_only=True)
            intervention = cls(**entry["init_kwargs"])
            if "source_representation" in state and not isinstance(
                getattr(intervention, "source_representation", None), torch.Tensor
            ):
                intervention.register_buffer("source_representation", state["source_representation"])
            representations.append(pv.RepresentationConfig(**entry["representation"], intervention=intervention))
            states.append(state)
    config = pv.IntervenableConfig(representations=representations, mode=manifest.get("mode", "parallel"))
    intervenable = pv.IntervenableModel(config, model)
    keys = list(intervenable.interventions.keys())
    saved_keys = [entry["key"] for entry in manifest["interventions"]]
    if keys != saved_keys:
        raise ValueError(f"intervention keys differ after rebuild: saved {saved_keys}, rebuilt {keys}")
    for entry, state, key in zip(manifest["interventions"], states, keys):
        intervention = intervenable.interventions[key]
        intervention.load_state_dict(state, strict=True)
        if entry["interchange_dim"] is not None:
            intervention.set_interchange_dim(entry["interchange_dim"])
        intervention.is_source_constant = entry["is_source_constant"]
        intervention.to(device)
    return intervenable
