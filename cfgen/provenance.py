"""Provenance: what produced a result, as plain JSON-able data.

Every function here returns dicts of str / int / float / bool / None / lists,
so a result's records can name the model, the intervention, the sampler and
the library versions without carrying tensors or live objects. Tensors are
summarised by shape, dtype and a short content hash, enough to tell two
steering vectors or rotations apart without storing them.

Nothing here imports pyvene (``import pyvene`` alone costs seconds): an
IntervenableModel is recognised by its attributes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import platform
from collections.abc import Mapping
from typing import Any, Optional

import torch

__all__ = ["model_info", "intervention_info", "processors_info", "versions", "collect", "jsonable", "tensor_info"]

# Parameters compared by name between the two models of a pair; more differing names than this are counted only.
_MAX_LISTED = 50


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_intervenable(obj) -> bool:
    return type(obj).__name__ == "IntervenableModel" and hasattr(obj, "interventions")


def tensor_info(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and a 16-hex-digit SHA-256 of a tensor's bytes (equal tensors, equal hashes).

    Example:
        >>> import torch, cfgen.provenance as P
        >>> P.tensor_info(torch.zeros(3))["shape"], P.tensor_info(torch.zeros(3))["dtype"]
        ([3], 'float32')
    """
    data = t.detach()
    if data.is_sparse:
        data = data.to_dense()
    # Hash the raw bytes through a uint8 view: works for every dtype, numpy lacks bfloat16.
    raw = data.reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return {"shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(raw).hexdigest()[:16]}


def jsonable(value: Any, *, _depth: int = 0) -> Any:
    """``value`` as JSON-able data: tensors summarised (:func:`tensor_info`), objects named by class.

    Example:
        >>> import torch, cfgen.provenance as P
        >>> P.jsonable({"pos": (1, 2), "vec": torch.ones(2)})["vec"]["tensor"]["shape"]
        [2]
    """
    if _depth > 12:
        return {"object": _qualname(value)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() <= 16 and not value.is_floating_point() and value.dim() <= 2:
            return value.tolist()  # small index tensors (locations, subspaces) read better as lists
        return {"tensor": tensor_info(value)}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Mapping):  # dicts, and BatchEncoding (a UserDict)
        return {str(k): jsonable(v, _depth=_depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, _depth=_depth + 1) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return jsonable(value.item(), _depth=_depth + 1)  # numpy scalars
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        return jsonable(torch.as_tensor(value), _depth=_depth + 1)  # numpy arrays
    if _is_intervenable(value) or isinstance(value, torch.nn.Module):
        return {"object": _qualname(value)}
    if isinstance(value, type):
        return {"class": _qualname(value)}
    if callable(value):
        return {"callable": getattr(value, "__qualname__", _qualname(value))}
    return {"object": _qualname(value), "repr": repr(value)[:200]}


def model_info(model) -> dict[str, Any]:
    """The model's class, ``name_or_path``, dtype, device, type and size (an IntervenableModel: its wrapped model).

    Example:
        >>> import transformers, cfgen.provenance as P
        >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=8))
        >>> info = P.model_info(m)
        >>> info["class"], info["dtype"], info["vocab_size"]
        ('transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel', 'float32', 16)
    """
    if _is_intervenable(model):
        model = model.model
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    info: dict[str, Any] = {"class": _qualname(model), "name_or_path": name}
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    info["dtype"] = str(params[0].dtype).removeprefix("torch.") if params else None
    info["device"] = str(params[0].device) if params else None
    info["num_parameters"] = sum(p.numel() for p in params)
    info["model_type"] = getattr(config, "model_type", None)
    info["vocab_size"] = getattr(config, "vocab_size", None)
    if config is not None and getattr(config, "_commit_hash", None):
        info["commit_hash"] = config._commit_hash
    return info


def _representation(rep) -> dict[str, Any]:
    fields = rep._asdict() if hasattr(rep, "_asdict") else dict(vars(rep))
    out = {}
    for k, v in fields.items():
        if k == "intervention" and v is not None:
            out[k] = {"class": _qualname(v)}
        elif k == "intervention_type" and isinstance(v, type):
            out[k] = _qualname(v)
        else:
            out[k] = jsonable(v)
    return out


def _intervention(iv) -> dict[str, Any]:
    out: dict[str, Any] = {"class": _qualname(iv)}
    for attr in ("embed_dim", "interchange_dim", "keep_last_dim", "is_source_constant", "subspace_partition",
                 "low_rank_dimension"):
        if hasattr(iv, attr):
            out[attr] = jsonable(getattr(iv, attr))
    if isinstance(iv, torch.nn.Module):
        # Parameters and buffers (steering vectors, rotations, source representations) by name, summarised.
        tensors = {name: t for name, t in iv.named_parameters()}
        tensors.update({name: t for name, t in iv.named_buffers()})
        for attr, v in vars(iv).items():
            if isinstance(v, torch.Tensor) and attr not in tensors and not attr.startswith("_"):
                tensors[attr] = v
        if tensors:
            out["tensors"] = {name: tensor_info(t) for name, t in sorted(tensors.items())}
    return out


def _differing_parameters(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, Any]:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if a is b:
        return {"count": 0, "names": []}
    if pa.keys() != pb.keys():
        return {"comparable": False, "only_factual": sorted(pa.keys() - pb.keys())[:_MAX_LISTED],
                "only_counterfactual": sorted(pb.keys() - pa.keys())[:_MAX_LISTED]}
    names = []
    with torch.no_grad():
        for n, t in pa.items():
            u = pb[n]
            if t is u:
                continue
            if t.shape != u.shape or t.dtype != u.dtype or not torch.equal(t, u.to(t.device)):
                names.append(n)
    return {"count": len(names), "names": names[:_MAX_LISTED],
            "tensors": {n: tensor_info(pb[n]) for n in names[:_MAX_LISTED]}}


def intervention_info(intervenable_or_pair, **pyvene_kwargs) -> dict[str, Any]:
    """The intervention as data: pyvene representations per key, the call's locations and sources, or a pair's edit.

    Args:
        intervenable_or_pair: a ``pyvene.IntervenableModel``, a ``(factual_model,
            counterfactual_model)`` pair, or a plain model (no intervention).
        pyvene_kwargs: the call's ``sources``, ``unit_locations``,
            ``source_representations``, ``subspaces``, ``intervene_on`` (and any
            other keyword: recorded as given, tensors summarised).

    Returns:
        ``{"kind": "pyvene" | "pair" | "none", ...}``: for pyvene, ``mode`` and per
        intervention key its representation fields (``layer``, ``component``,
        ``unit``, ...), its class and its tensors (shape, dtype, hash); for a pair,
        both models and the parameters whose values differ; ``call``: the keywords.

    Example:
        >>> import transformers, cfgen.provenance as P
        >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=8))
        >>> P.intervention_info(m, intervene_on="all")
        {'kind': 'none', 'call': {'intervene_on': 'all'}}
    """
    call = {k: jsonable(v) for k, v in pyvene_kwargs.items() if v is not None}
    obj = intervenable_or_pair
    if isinstance(obj, (tuple, list)):
        if len(obj) != 2:
            raise ValueError(f"a model pair must be (factual_model, counterfactual_model), got {len(obj)} items")
        fact, cf = obj
        inner = cf.model if _is_intervenable(cf) else cf
        out: dict[str, Any] = {"kind": "pair", "factual": model_info(fact), "counterfactual": model_info(inner)}
        if isinstance(fact, torch.nn.Module) and isinstance(inner, torch.nn.Module):
            out["differing_parameters"] = _differing_parameters(fact, inner)
        if _is_intervenable(cf):
            out["counterfactual_intervention"] = intervention_info(cf)
        out["call"] = call
        return out
    if not _is_intervenable(obj):
        return {"kind": "none", "call": call}
    keys = list(getattr(obj, "sorted_keys", None) or obj.interventions.keys())
    items = []
    for key in keys:
        rep = obj.representations.get(key) if hasattr(obj, "representations") else None
        iv = obj.interventions[key]
        if isinstance(iv, tuple):  # older pyvene stored (intervention, hook)
            iv = iv[0]
        items.append({"key": str(key), "representation": None if rep is None else _representation(rep),
                      "intervention": _intervention(iv)})
    return {"kind": "pyvene", "class": _qualname(obj), "mode": getattr(obj, "mode", None),
            "interventions": items, "call": call}


def processors_info(processors) -> list[dict[str, Any]]:
    """Each logits processor's class and public attributes (a ``LogitsProcessorList`` or any iterable).

    A :class:`cfgen.processors.Processing` chain gives its stages in order, e.g.
    ``[{"stage": "RepetitionPenaltyLogitsProcessor(penalty=1.3)"}, {"stage": "Sampler(...)"}]``.

    Example:
        >>> import transformers, cfgen.provenance as P
        >>> info = P.processors_info([transformers.RepetitionPenaltyLogitsProcessor(1.3)])[0]
        >>> info["class"].rsplit(".", 1)[1], info["params"]["penalty"]
        ('RepetitionPenaltyLogitsProcessor', 1.3)
    """
    if processors is None:
        return []
    if callable(getattr(processors, "describe", None)) and hasattr(processors, "stages"):
        # a cfgen.processors.Processing chain: its stages in order, as it names them
        return [{"stage": name} for name in processors.describe()]
    out = []
    for p in processors:
        params = {k: jsonable(v) for k, v in sorted(vars(p).items()) if not k.startswith("_")} \
            if hasattr(p, "__dict__") else {}
        out.append({"class": _qualname(p), "params": params})
    return out


def versions() -> dict[str, Optional[str]]:
    """cfgen, torch, transformers, pyvene and Python versions (``None``: not installed); imports nothing heavy.

    Example:
        >>> import cfgen, cfgen.provenance as P
        >>> P.versions()["cfgen"] == cfgen.__version__
        True
    """
    from . import __version__

    out: dict[str, Optional[str]] = {"cfgen": __version__}
    for dist in ("torch", "transformers", "pyvene"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = platform.python_version()
    return out


def collect(model, *, sampler=None, processors=None, **pyvene_kwargs) -> dict[str, Any]:
    """Everything above for one call: ``{"model", "intervention", "sampler", "processors", "versions"}``.

    ``model`` is what the call received (an IntervenableModel, a pair or a plain
    model); ``model`` in the output describes the factual model.

    Example:
        >>> import transformers, cfgen, cfgen.provenance as P
        >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=8))
        >>> sorted(P.collect(m, sampler=cfgen.Sampler(top_k=5)))
        ['intervention', 'model', 'processors', 'sampler', 'versions']
    """
    factual = model[0] if isinstance(model, (tuple, list)) and len(model) == 2 else model
    return {
        "model": model_info(factual),
        "intervention": intervention_info(model, **pyvene_kwargs),
        "sampler": None if sampler is None else jsonable(sampler.to_dict()),
        "processors": processors_info(processors),
        "versions": versions(),
    }
