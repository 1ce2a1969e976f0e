"""The one engine under every front-end: request -> rows -> runner -> decode loop -> tokens.

``cfgen.generate`` / ``cfgen.counterfactual`` (:mod:`cfgen.api`), ``do`` /
``edit_prompt`` / ``sample`` (:mod:`cfgen.tokens`) and structured records
(:mod:`cfgen.structured`) are thin front-ends over this module and import
nothing private from each other. Its names are public within the package (not
part of cfgen's stable user contract); docs/architecture.md shows the flow.

* **Models** -- :func:`resolve_models`, :func:`resolve_tokenizer`,
  :func:`resolve_sampler`, :func:`hf_model`, :func:`vocab_size`.
* **Inputs** -- :func:`as_list`, :func:`encode`, :func:`seeds_for`,
  :func:`check_ids`, :func:`check_context`, :func:`eos_ids`, :func:`stop_fn`,
  :func:`pad_id`.
* **Rows** -- :class:`Rows`: one entry per decoded sequence (context, prompt
  length, seed, noise stream, budget, step offset, posterior noise).
* **Runners** -- :class:`PlainRunner` (a Hugging Face causal LM) and
  :class:`PyveneRunner` (an ``IntervenableModel``, pyvene's arguments applied to
  intervened rows at scheduled positions); :func:`pyvene_runner` builds one from
  the user's pyvene arguments (:class:`Intervention`).
* **Decode** -- :class:`KVBatch` (a KV-cached batch whose rows can be fed
  different numbers of tokens), :func:`decode` (one loop driven by a *program*:
  :class:`FreeRun` samples every row at every step until EOS / stop / budget;
  structured records drive the same loop with forced label tokens),
  :func:`row_noise` (each sampled row's noise: prior by (seed, step, stream) or
  its posterior), :func:`run` (rows + models -> tokens, finish reasons, schedule).
* **Teacher forcing** -- :func:`teacher_forced_logits`.

Hooks for later work: a program decides per step which rows sample and what
each row is fed next, so per-row logits processors slot in between
:meth:`KVBatch.logits` and the sampler (see ``decode``), and :func:`run` is the
single place to take a per-call lock or record provenance.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from . import checks
from ._guard import model_guard
from .noise import PRIOR, gumbel_noise
from .posterior import posterior_noise
from .sampler import Sampler, check_logits

__all__ = [
    "INTERVENTIONAL", "import_pyvene", "Models", "resolve_models", "resolve_tokenizer", "resolve_sampler", "is_intervenable",
    "hf_model", "vocab_size", "as_list", "encode", "pad_id", "seeds_for", "check_ids", "check_context", "eos_ids",
    "stop_fn", "tokenized_prompts", "check_hf", "Intervention", "Rows", "Schedule", "PlainRunner", "PyveneRunner",
    "pyvene_runner", "read_unit_locations", "left_pad",
    "KVBatch", "FreeRun", "decode", "row_noise", "StepError", "run", "check_intervention", "teacher_forced_logits",
    "resolve_sampling", "resolve_seed", "guarded", "Hindsight",
]

INTERVENTIONAL = 4  # noise stream of the interventional baseline (fresh noise, same seed)

Schedule = Union[str, Sequence[int]]


# ---------------------------------------------------------------- models --
def import_pyvene():
    """pyvene, imported without its import-time chatter (0.1.8 prints a line about nnsight to stdout)."""
    if "pyvene" not in sys.modules:
        with contextlib.redirect_stdout(io.StringIO()):
            import pyvene  # noqa: F401
    return sys.modules["pyvene"]


def is_intervenable(obj) -> bool:
    """Whether ``obj`` is a ``pyvene.IntervenableModel`` (checked by name: importing pyvene costs seconds)."""
    return type(obj).__name__ == "IntervenableModel" and hasattr(obj, "interventions")


def hf_model(obj):
    """The Hugging Face model: ``obj`` itself, or the model an IntervenableModel wraps."""
    return obj.model if is_intervenable(obj) else obj


def vocab_size(model) -> int:
    """The number of output logits (the output embedding's rows, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return model.config.vocab_size


@dataclass
class Models:
    """The factual model, the counterfactual model, and whether factual rows ride in the intervenable's batch."""

    factual: Any  # HF model
    counterfactual: Any  # HF model or IntervenableModel
    shared: bool

    @property
    def device(self):
        return next(hf_model(self.factual).parameters()).device


def resolve_models(model) -> Models:
    """An IntervenableModel or a (factual, counterfactual) pair -> :class:`Models`; anything else a TypeError."""
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise ValueError(f"a model pair must be (factual_model, counterfactual_model), got {len(model)} items")
        fact, cf = model
        if is_intervenable(fact):
            raise TypeError("the factual model of a pair must be a plain Hugging Face model (no interventions)")
        check_hf(fact)
        va, vb = vocab_size(fact), vocab_size(hf_model(cf))
        if va != vb:
            raise ValueError(
                f"the factual model has {va} output logits and the counterfactual model {vb}: noise is keyed by "
                "token id, so both models must share one vocabulary (use the same tokenizer family)"
            )
        return Models(fact, cf, shared=False)
    if is_intervenable(model):
        check_hf(model.model)
        return Models(model.model, model, shared=True)
    raise TypeError(
        f"model must be a pyvene.IntervenableModel or a (factual_model, counterfactual_model) pair, got "
        f"{type(model).__name__}. Wrap a plain model with pyvene.IntervenableModel(config, model), or pass "
        "(model, edited_model) for weight edits and model swaps."
    )


def _check_devices(model) -> None:
    """A model spread over devices (or left on 'meta') runs only with accelerate's hooks moving its activations."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"the {type(model).__name__} has weights on the 'meta' device and no accelerate hook that loads them: "
            "load it with from_pretrained(..., device_map=...) (accelerate dispatches and offloads it) or "
            "materialise it (to_empty + load_state_dict) first"
        )
    if len(devices) > 1:
        raise ValueError(
            f"the {type(model).__name__} has weights on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}) "
            "and no accelerate hooks to move activations between them: load it with from_pretrained(..., "
            "device_map=...) or place it with accelerate.dispatch_model(model, device_map=...), or move it to one "
            "device with model.to(device)"
        )


def check_hf(model) -> None:
    """Refuse, in one line, a model that is not a Hugging Face causal LM (e.g. pyvene's own GRU)."""
    if not hasattr(model, "config") or not _accepts(model, "attention_mask") or not (
            _accepts(model, "cache") or _accepts(model, "past_key_values")):
        raise TypeError(
            f"cfgen decodes Hugging Face causal language models; the wrapped model is a {type(model).__name__}, "
            "which has no token-by-token decoding interface (input_ids, attention_mask, KV cache)"
        )
    _check_devices(model)


def resolve_tokenizer(tokenizer):
    """One tokenizer; a pair must share one vocabulary."""
    if isinstance(tokenizer, (tuple, list)):
        a, b = tokenizer
        if a.get_vocab() != b.get_vocab():
            raise ValueError(
                "the factual and counterfactual tokenizers differ: noise is keyed by token id, so counterfactual "
                "text is only defined for models sharing one tokenizer"
            )
        return a
    return tokenizer


def _site(model):
    """The model's CounterfactualSampling site (its sampler and seed are the call's defaults), or None."""
    if is_intervenable(model):
        for iv in model.interventions.values():
            if type(iv).__name__ == "CounterfactualSampling":
                return iv
    return None


def resolve_sampling(sampler, model, hf_kwargs: dict, tokenizer=None):
    """(sampler, processing, limits, site seed or None) from ``sampler=`` or HF ``generate``-style arguments.

    :func:`cfgen.processors.build` reads them (temperature / top_k / top_p / do_sample, every processor and
    warper that is a function of (history, logits), ``generation_config=``, ``logits_processor=``, limits);
    the model's ``CounterfactualSampling`` site gives the default sampler and seed.
    """
    from . import processors

    if sampler is not None and not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a cfgen.Sampler, got {type(sampler).__name__}")
    site = _site(model)
    sampler, processing, limits = processors.build(
        sampler=sampler, tokenizer=tokenizer, default_sampler=site.sampler if site is not None else Sampler(),
        **hf_kwargs)
    return sampler, processing, limits, (site.seed if site is not None else None)


def resolve_sampler(sampler, model, hf_kwargs: dict) -> tuple[Sampler, Optional[int]]:
    """(sampler, site seed) for front-ends that sample with the sampler alone (no other processors)."""
    sampler, processing, limits, seed = resolve_sampling(sampler, model, hf_kwargs)
    extra = sorted(set(hf_kwargs) - {"temperature", "top_k", "top_p", "do_sample"})
    if not processing.empty or extra:
        raise TypeError(
            f"{', '.join(extra) or 'these logits processors'}: this function samples with temperature / top_k / "
            "top_p / do_sample only; cfgen.generate and cfgen.counterfactual take every HF logits processor"
        )
    return sampler, seed


def resolve_seed(seed, site_seed: Optional[int], n: int, span: int = 1) -> list[int]:
    """One checked seed per prompt: ``seed``, else the sampling site's, else a fresh one from the OS."""
    if seed is None:
        seed = site_seed if site_seed is not None else checks.fresh_seed()
    return checks.seeds(seed, n, span=span)


def guarded(fn: Callable) -> Callable:
    """Run a front-end holding its models' lock, leaving their forward hooks as found (see :mod:`cfgen._guard`)."""
    import functools

    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        parts = model if isinstance(model, (tuple, list)) else [model]
        modules = [hf_model(m) for m in parts if isinstance(hf_model(m), torch.nn.Module)]
        with model_guard(*modules):
            return fn(model, *args, **kwargs)

    return call


# --------------------------------------------------------------- inputs --
def _is_chat(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and bool(x) and all(
        isinstance(m, Mapping) and "role" in m for m in x)


def as_list(x, name: str) -> list:
    """A prompt or a list of prompts -> a list (strings, token-id lists or chats)."""
    if isinstance(x, (bytes, bytearray)):
        raise TypeError(f"{name} must be text (str), token ids or a chat, not bytes; decode them first")
    if isinstance(x, str) or _is_chat(x) or (isinstance(x, Sequence) and x and checks._is_int(x[0])):
        return [x]
    if isinstance(x, torch.Tensor):
        return [x.tolist()] if x.dim() == 1 else x.tolist()
    if not isinstance(x, Sequence) or isinstance(x, dict):
        raise TypeError(f"{name} must be a string, a list of token ids, or a list of either")
    return list(x)


def encode(tokenizer, texts: list, name: str, *, special: bool) -> list[list[int]]:
    """Tokenize strings once (token-id lists pass through); empty inputs are refused."""
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            checks.text(t, f"{name}[{i}]")
            ids = tokenizer(t, add_special_tokens=special)["input_ids"]
        elif _is_chat(t):
            if not hasattr(tokenizer, "apply_chat_template"):
                raise TypeError(f"{name}[{i}] is a chat, but the tokenizer has no chat template")
            # the generation prompt opens the assistant's turn, as a chat model expects before it answers
            got = tokenizer.apply_chat_template(list(t), add_generation_prompt=True, tokenize=True)
            got = got["input_ids"] if isinstance(got, Mapping) or hasattr(got, "keys") else got
            ids = checks.token_ids(got[0] if got and isinstance(got[0], (list, tuple)) else got, f"{name}[{i}]")
        elif isinstance(t, (Sequence, torch.Tensor)) or hasattr(t, "tolist"):
            ids = checks.token_ids(t, f"{name}[{i}]")
        else:
            raise TypeError(f"{name}[{i}] must be a string, a list of token ids or a chat (a list of "
                            f"{{'role': ..., 'content': ...}} messages), got {type(t).__name__}")
        if not ids:
            raise ValueError(f"{name}[{i}] has no tokens")
        out.append(ids)
    return out


def tokenized_prompts(prompts) -> Optional[tuple[list[list[int]], list[tuple[list[int], list[int]]]]]:
    """Prompts tokenized the way pyvene users pass them (a dict / BatchEncoding with ``input_ids`` and optionally
    ``attention_mask``, left or right padded) -> (each row's real token ids, each row's (ids, mask) as given);
    None for any other form. Positions in ``unit_locations`` then count in these tensors' coordinates."""
    if not (isinstance(prompts, Mapping) and "input_ids" in prompts):
        return None
    ids = torch.as_tensor(prompts["input_ids"])
    mask = prompts.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if ids.dim() == 1:
        ids, mask = ids[None], mask[None]
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(f"tokenized prompts need input_ids [batch, length] and an attention_mask of the same shape; "
                         f"got {tuple(ids.shape)} and {tuple(mask.shape)}")
    real, layout = [], []
    for r in range(ids.shape[0]):
        m = mask[r].tolist()
        if not any(m):
            raise ValueError(f"tokenized prompt row {r} has no token (its attention_mask is all 0)")
        real.append([t for t, k in zip(ids[r].tolist(), m) if k])
        layout.append((ids[r].tolist(), [int(k) for k in m]))
    return real, layout


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else 0 (padding is always masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def seeds_for(seed, n: int, span: int = 1) -> list[int]:
    """One checked seed per prompt from an int or a sequence (see :func:`cfgen.checks.seeds`)."""
    return checks.seeds(seed, n, span=span)


def check_ids(model, seqs: list[list[int]], name: str) -> None:
    """Every token id inside the model's vocabulary."""
    vocab = vocab_size(model)
    for i, ids in enumerate(seqs):
        checks.token_ids(ids, f"{name}[{i}]", vocab_size=vocab)


def check_context(model, prompt_ids: list[list[int]], max_new: list[int]) -> None:
    """Prompt plus new tokens within the model's context length."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not limit:
        return
    for i, (p, m) in enumerate(zip(prompt_ids, max_new)):
        if len(p) + m > limit:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens and asks for {m} new ones, past the model's context length "
                f"{limit}; shorten the prompt or lower max_new_tokens"
            )


def stop_fn(tokenizer, stop_strings) -> Optional[Callable[[list[int]], bool]]:
    """A test on a row's new tokens: does their text contain a stop string?"""
    stops = checks.stop_strings(stop_strings)
    if not stops:
        return None

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-16:], skip_special_tokens=False)
        return any(s in text for s in stops)

    return stop


def eos_ids(tokenizer, model, eos_token_id) -> list[int]:
    """EOS ids: the override, else the model's generation config, else the tokenizer's."""
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


# ---------------------------------------------------------------- rows --
@dataclass
class Hindsight:
    """An observed text's posterior, made one decode step at a time, so memory does not grow with the text.

    ``logits[t]`` are the factual model's (processed) logits before observed token ``tokens[t]``; every
    posterior sample of the text shares them, so the noise held at once is one ``[V]`` row per sampled
    row, never ``[T, V]`` per sample. ``sampler`` is the one the posterior conditions on.
    """

    logits: torch.Tensor  # [T, V]
    tokens: torch.Tensor  # [T]
    sampler: Sampler

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.logits.shape)


@dataclass
class Rows:
    """What each decoded row is (all lists have one entry per row).

    ``posterior[r]`` is the row's noise for its first ``T_r`` sampled steps (counted
    from ``step_offset[r]``): a ``[T_r, V]`` tensor, or a :class:`Hindsight` whose
    step's noise is drawn when that step is decoded (keyed by the row's seed and
    the step); later steps use prior noise.
    """

    context: list[list[int]]
    prompt_len: list[int]
    seed: list[int]
    max_new: list[int]
    step_offset: list[int] = field(default_factory=list)
    stream: list[int] = field(default_factory=list)
    intervene: list[bool] = field(default_factory=list)
    posterior: list[Union[torch.Tensor, Hindsight, None]] = field(default_factory=list)
    layout: list[Optional[tuple[list[int], list[int]]]] = field(default_factory=list)  # user's (ids, mask) row

    def __post_init__(self) -> None:
        n = len(self.context)
        self.step_offset = self.step_offset or [0] * n
        self.stream = self.stream or [PRIOR] * n
        self.intervene = self.intervene or [False] * n
        self.posterior = self.posterior or [None] * n
        self.layout = self.layout or [None] * n

    def __len__(self) -> int:
        return len(self.context)

    def select(self, idx: Sequence[int]) -> Rows:
        return Rows(**{k: [getattr(self, k)[i] for i in idx] for k in self.__dataclass_fields__})


@dataclass
class Intervention:
    """The user's pyvene arguments for one call (all None: no activation intervention)."""

    sources: Any = None
    unit_locations: Any = None
    source_representations: Any = None
    subspaces: Any = None
    intervene_on: Any = None

    def given(self) -> bool:
        return any(v is not None for v in (self.sources, self.unit_locations, self.source_representations,
                                           self.subspaces, self.intervene_on))


# -------------------------------------------------------------- runners --
def _scheduled(schedule: Schedule, abs_pos: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """Which absolute positions a schedule intervenes on (bool, abs_pos' shape)."""
    if schedule == "prompt":
        return abs_pos < prompt_len
    if schedule == "generation":  # positions whose output predicts a generated token
        return abs_pos >= prompt_len - 1
    if schedule == "all":
        return torch.ones_like(abs_pos, dtype=torch.bool)
    wanted = torch.as_tensor(list(schedule), dtype=abs_pos.dtype, device=abs_pos.device)
    return (abs_pos[..., None] == wanted).any(-1)


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _Forward:
    """How to call a Hugging Face model: its cache keyword (transformers 5 renamed ``past_key_values`` to
    ``cache``; the old name prints a deprecation warning) and whether it keeps only the last logits."""

    def __init__(self, model):
        self.cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
        self.keep = _accepts(model, "logits_to_keep")

    def kwargs(self, cache, keep: int) -> dict:
        # logits_to_keep: the prefill then skips V x d work per prompt position.
        out = {"use_cache": True, **({"logits_to_keep": keep} if self.keep else {})}
        if cache is not None:
            out[self.cache_kw] = cache
        return out

    def cache_of(self, out):
        return out["cache"] if "cache" in out.keys() else out["past_key_values"]


class PlainRunner:
    """A Hugging Face causal LM, no interventions.

    Called as ``runner(ids, mask, pos, cache, *, abs_pos, prompt_len, rows, prefill, keep)``; returns the
    logits of the last ``keep`` positions ``[n, keep, V]`` and the cache.
    """

    def __init__(self, model):
        self.model = model
        self.fwd = _Forward(model)

    def __call__(self, ids, mask, pos, cache, *, abs_pos, prompt_len, rows, prefill, keep=1):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **self.fwd.kwargs(cache, keep))
        return out.logits[:, -keep:], self.fwd.cache_of(out)

    @contextlib.contextmanager
    def active(self):
        yield self


_BATCH_BUG = ("BoundlessRotatedSpaceIntervention", "SigmoidMaskRotatedSpaceIntervention")
_PER_UNIT = ("DistributedRepresentationIntervention", "AutoencoderIntervention", "JumpReLUAutoencoderIntervention",
             "CollectIntervention")  # pyvene slices a flattened Collect to its first unit


def _module_device(module) -> Optional[torch.device]:
    """Where an intervention's parameters and buffers are (None: it has none, or is not a module)."""
    if not isinstance(module, torch.nn.Module):
        return None
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


def _one_position_per_unit(iv, forward: Callable) -> Callable:
    """Distributed interventions built without ``keep_last_dim=True`` (RotatedSpace, LowRank, Boundless,
    SigmoidMaskRotated, Autoencoder; and Collect) see ``[batch, units * d]`` and expect one unit: apply them
    to each unit on its own, as ``keep_last_dim=True`` would (pyvene itself fails on several units). Boundless and
    SigmoidMaskRotated built with ``keep_last_dim=True`` size their mask by the batch and fail on
    ``[batch, units, d]`` in pyvene 0.1.8 unless batch == units: they get ``[batch * units, d]`` too."""
    d = getattr(iv, "embed_dim", None)
    d = int(d) if isinstance(d, torch.Tensor) and d.numel() == 1 else d  # pyvene stores it as a tensor
    keep = getattr(iv, "keep_last_dim", True)
    per_unit = any(c.__name__ in _PER_UNIT for c in type(iv).__mro__)  # pyvene's distributed family (+ subclasses)
    if not per_unit or not isinstance(d, int) or d <= 0 or (keep and type(iv).__name__ not in _BATCH_BUG):
        return forward

    def run(base, source=None, subspaces=None, **kwargs):
        stacked = keep or base.dim() == 3  # [batch, units, d]: keep_last_dim, or head units
        if stacked:
            if base.dim() != 3 or base.shape[-1] != d:
                return forward(base, source, subspaces, **kwargs)
            b, u = base.shape[0], base.shape[1]
        else:
            if base.dim() != 2 or base.shape[1] == d or base.shape[1] % d:
                return forward(base, source, subspaces, **kwargs)
            b, u = base.shape[0], base.shape[1] // d
        flat_source = source
        if isinstance(source, torch.Tensor) and source.shape == base.shape:
            flat_source = source.reshape(b * u, d)
        subs = subspaces
        if isinstance(subspaces, (list, tuple)) and len(subspaces) == b:
            subs = [s for s in subspaces for _ in range(u)]
        out = forward(base.reshape(b * u, d), flat_source, subs, **kwargs)
        tensor = getattr(out, "output", out)
        merged = tensor.reshape(base.shape[:-1] + tensor.shape[-1:]) if stacked else tensor.reshape(b, -1)
        if tensor is out:
            return merged
        out.output = merged
        return out

    return run


class PyveneRunner:
    """An ``IntervenableModel``; interventions act on intervened rows at scheduled positions only.

    Args:
        intervenable: the pyvene model.
        schedule: ``"prompt"``, ``"generation"``, ``"all"`` or absolute positions.
        base_locations: per intervention, per row, unit locations counted from the row's first token
            (``[heads, positions]`` for ``"h.pos"``), or None to intervene wherever the schedule says.
        sources: per pyvene group, a dict of padded source inputs ``[R, S]`` (prefill only).
        source_locations: per intervention, per row, padded source positions.
        source_representations: per intervention key, ``[R, 1 or units, d]`` tensors.
        subspaces: pyvene's subspaces, per intervention, per row.
        passive: intervention keys that are markers (never intervene).
        shift: add each row's left padding to its positions (False: locations are already batch coordinates).
        serial: for ``mode="serial"`` configs, ``{stage: (source locations per key, destination locations per
            key, destination is the base)}`` with pyvene's stage keys (``"source_0->source_1"``, ...).
    """

    def __init__(self, intervenable, *, schedule: Schedule = "all", base_locations=None, sources=None,
                 source_locations=None, source_representations=None, subspaces=None, passive=(), shift=True,
                 serial=None):
        self.pv = intervenable
        self.shift = shift
        self.serial = serial
        self.schedule = schedule
        self.base_locations = base_locations
        self.sources = sources
        self.source_locations = source_locations
        self.source_representations = source_representations
        self.subspaces = subspaces
        self.keys = list(intervenable.sorted_keys)
        self.units = _units(intervenable)
        self.passive = set(passive)
        self.fwd = _Forward(intervenable.model)
        self._masks: dict[str, torch.Tensor] = {}
        # CollectIntervention keys: what each row's collected units are (absolute positions, valid), per call
        self.collect = [k for k in self.keys if type(intervenable.interventions[k]).__name__ == "CollectIntervention"]
        self._collect_at: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.collected: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {k: [] for k in self.collect}

    @contextlib.contextmanager
    def active(self):
        """Patch each intervention's forward so unscheduled (row, unit) pairs keep their base value."""
        saved, fast, get_device = {}, self.pv.use_fast, self.pv.__dict__.get("get_device")
        self.pv.use_fast = False  # pyvene's fast path applies row 0's locations to every row
        # pyvene builds its gather / scatter indices on model.device (the first device of a model split over
        # several); None makes them on each activation's own device, which is model.device on one device.
        self.pv.get_device = lambda: None
        self._home: dict[str, Optional[torch.device]] = {}  # key -> where it was before we moved it (None: not moved)
        for key in self.keys:
            iv = self.pv.interventions[key]
            saved[key] = iv.__dict__.get("forward")
            iv.forward = self._masked_forward(key, iv.forward)
        try:
            yield self
        finally:
            self.pv.use_fast = fast
            if get_device is None:
                del self.pv.get_device
            else:
                self.pv.get_device = get_device
            for key, fwd in saved.items():
                iv = self.pv.interventions[key]
                if fwd is None:
                    del iv.forward
                else:
                    iv.forward = fwd
            for key, device in self._home.items():  # back where the user keeps them
                if device is not None:
                    self.pv.interventions[key].to(device)

    masked = active

    def _masked_forward(self, key: str, forward: Callable):
        forward = _one_position_per_unit(self.pv.interventions[key], forward)

        def run(base, source=None, subspaces=None, **kwargs):
            if key not in self._home:  # once per call: an intervention runs where its layer runs (a split model)
                where = _module_device(self.pv.interventions[key])
                self._home[key] = where if where is not None and where != base.device else None
                if self._home[key] is not None:
                    self.pv.interventions[key].to(base.device)
            if isinstance(source, torch.Tensor):
                source = source.to(base.device)
            if key in self._collect_at:
                at, valid = self._collect_at[key]
                self.collected[key].append((base.detach().reshape(at.shape[0], at.shape[1], -1).clone(), at, valid))
            mask = self._masks.get(key)
            if mask is None:
                return forward(base, source, subspaces, **kwargs)
            kept = base.clone()  # some pyvene interventions (e.g. AdditionIntervention) write into base
            out = forward(base, source, subspaces, **kwargs)
            tensor = getattr(out, "output", out)
            mask = mask.to(tensor.device)
            k = mask.shape[1]
            if tensor.dim() == 3 and tensor.shape[1] == k:
                m = mask[:, :, None]
            elif tensor.dim() == 2 and tensor.shape[1] % k == 0:
                m = mask.repeat_interleave(tensor.shape[1] // k, dim=1)
            else:
                m = mask.any(1).reshape((-1,) + (1,) * (tensor.dim() - 1))
            merged = torch.where(m, tensor, kept.to(tensor.dtype))
            if not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(kept).all()):
                iv = self.pv.interventions[key]
                raise StepError(
                    f"intervention {key!r} ({type(iv).__name__}) turned finite activations into NaN or inf; check its "
                    "vector / weights (a NaN source_representation, an overflowing scale, an fp16 rotation)"
                )
            if tensor is out:
                return merged
            out.output = merged
            return out

        return run

    def _serial_prefill(self, base, ids, abs_pos, intervene, keep):
        n, k = ids.shape
        pad = (k - (abs_pos >= 0).sum(1)).tolist() if self.shift else [0] * n
        groups = sorted(self.pv._intervention_group.items())
        ul = {}
        for g, (stage, (srcs, dsts, to_base)) in enumerate(self.serial.items()):
            if to_base:
                dsts = [[[q + pad[r] for q in loc] for r, loc in enumerate(per)] for per in dsts]
            ul[stage] = (srcs, dsts)
            for key_id, key in enumerate(groups[g][1]):
                units = len(dsts[key_id][0])
                # earlier stages patch the next source for every row; only the last one reaches the base
                self._masks[key] = intervene.expand(n, units).clone() if to_base else \
                    torch.ones(n, units, dtype=torch.bool, device=ids.device)
        _, out = self.pv(base, sources=self.sources, unit_locations=ul)
        return out.logits[:, -keep:], self.fwd.cache_of(out)

    def rows_collected(self, n: int) -> list[dict]:
        """Per batch row: ``{key: {"positions": [...], "activations": Tensor[units, ...]}}`` over the whole decode."""
        out: list[dict] = [{} for _ in range(n)]
        for key, calls in self.collected.items():
            for r in range(n):
                acts, where = [], []
                for value, at, valid in calls:
                    sel = valid[r].to(value.device)
                    acts.append(value[r][sel])
                    where += at[r][sel].tolist()
                if acts:
                    out[r][key] = {"positions": where, "activations": torch.cat(acts)}
        return out

    def __call__(self, ids, mask, pos, cache, *, abs_pos, prompt_len, rows, prefill, keep=1):
        n, k = ids.shape
        self._collect_at.clear()
        base = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **self.fwd.kwargs(cache, keep)}
        if self.base_locations is not None and not prefill:
            # unit_locations confine every intervention to the prompt (carried by the KV cache from here on):
            # later steps run the wrapped model alone rather than interventions masked back to their input.
            out = self.pv.model(**base)
            return out.logits[:, -keep:], self.fwd.cache_of(out)
        intervene = torch.tensor(rows.intervene, device=ids.device)[:, None]
        if self.serial is not None:
            return self._serial_prefill(base, ids, abs_pos, intervene, keep)
        base_locs, sources, source_locs, reps = [], None, None, None
        for i, key in enumerate(self.keys):
            if key in self.passive:  # the logits' last position (the only one kept, where supported)
                locs = torch.full((n, 1), 0 if self.fwd.keep else k - 1, device=ids.device)
                self._masks[key] = torch.zeros(n, 1, dtype=torch.bool, device=ids.device)
            elif self.base_locations is not None:
                unit = self.units[key]
                pad = (k - (abs_pos >= 0).sum(1)).tolist() if self.shift else [0] * n
                rows_locs = [_shift(unit, loc, p) for loc, p in zip(self.base_locations[i], pad)]
                if key in self.collect and unit == "pos":
                    at = torch.as_tensor(self.base_locations[i], device=ids.device)
                    self._collect_at[key] = (at, torch.ones_like(at, dtype=torch.bool))
                if unit == "h.pos":
                    base_locs.append([[r[0] for r in rows_locs], [r[1] for r in rows_locs]])
                    self._masks[key] = intervene.clone()
                else:
                    base_locs.append(rows_locs)
                    self._masks[key] = intervene.expand(n, len(rows_locs[0])).clone() if unit == "pos" \
                        else intervene.clone()
                continue
            else:
                locs = torch.arange(k, device=ids.device).expand(n, k)
                real = abs_pos >= 0
                when = real & _scheduled(self.schedule, abs_pos, prompt_len[:, None])
                self._masks[key] = intervene & when
                if key in self.collect:  # collected on every row: factual rows give factual activations
                    self._collect_at[key] = (abs_pos, when)
            base_locs.append(locs.tolist())
        if prefill and self.sources is not None:
            sources, source_locs = self.sources, self.source_locations
        if self.source_representations is not None:
            reps = {}
            for i, key in enumerate(self.keys):
                rep = self.source_representations.get(key)
                if rep is not None:
                    if self.units[key] == "h.pos":  # pyvene's base is [rows, heads, positions, d] there
                        heads, n_units = len(base_locs[i][0][0]), len(base_locs[i][-1][0])
                        reps[key] = rep.expand(n, n_units, rep.shape[-1])[:, None].expand(n, heads, n_units, -1)
                    else:
                        reps[key] = rep.expand(n, len(base_locs[i][0]), rep.shape[-1])
        unit_locations = {"sources->base": (source_locs if sources is not None else None, base_locs)}
        _, out = self.pv(base, sources=sources, unit_locations=unit_locations, source_representations=reps,
                         subspaces=self.subspaces)
        return out.logits[:, -keep:], self.fwd.cache_of(out)


def left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, device=device)
            mask[r, width - len(s):] = 1
    return ids, mask


def _list_depth(x) -> int:
    d = 0
    while isinstance(x, (list, tuple)) and x:
        x, d = x[0], d + 1
    return d


LOCATION_FORMS = (
    'unit_locations is a dict with one key, "sources->base" or "base" (as in pyvene). Its value may be: an int p '
    "(position p in source and base); a pair of ints [s, b] or (s, b) (source position s -> base position b); "
    "(None, b) or (s, None); a list of 3 or more positions [p0, p1, ...] (in source and base); or a pair "
    "(source locations, base locations), each part None, one position list (every prompt and intervention), one "
    "list per prompt, or pyvene's nesting [intervention][prompt][units] ([intervention][2][prompt][units] for "
    '"h.pos": heads, then positions)'
)


def _units(pv) -> dict:
    return {k: getattr(pv.representations[k], "unit", "pos") for k in pv.sorted_keys}


def read_unit_locations(pv, unit_locations, n_prompts: int, active: list[str]):
    """pyvene's meaning of ``unit_locations`` (broadcast by pyvene's own ``_broadcast_unit_locations``).

    Returns (source, base): each None or ``{key: per-prompt locations}`` (one entry per prompt or one for all;
    an entry is a unit list, or ``[heads, positions]`` for ``"h.pos"`` units).
    """
    if unit_locations is None:
        return None, None
    if not isinstance(unit_locations, dict) or len(unit_locations) != 1:
        raise ValueError(f"cannot read unit_locations={unit_locations!r}: {LOCATION_FORMS}")
    (key, value), = unit_locations.items()
    if key not in ("sources->base", "base"):
        raise ValueError(f"unknown unit_locations key {key!r}: {LOCATION_FORMS}")
    keys, units = list(pv.sorted_keys), _units(pv)
    saved = pv.use_fast  # pyvene's broadcast switches its fast path on for good; cfgen's rows need it off
    try:
        pair = pv._broadcast_unit_locations(n_prompts, {key: value})["sources->base"]
    except Exception as err:  # pyvene's helper fails with raw TypeErrors on forms it cannot read
        raise ValueError(f"cannot read unit_locations {{{key!r}: {value!r}}} ({err}): {LOCATION_FORMS}") from None
    finally:
        pv.use_fast = saved
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"cannot read unit_locations {{{key!r}: {value!r}}}: pyvene reads a value that is not a "
                         f"broadcast form as a pair (source locations, base locations). {LOCATION_FORMS}")

    def per_key(part, name):
        if part is None:
            return None
        if isinstance(part, int) and not isinstance(part, bool):
            part = [part]
        if not isinstance(part, (list, tuple)) or not part:
            raise ValueError(f"cannot read the {name} part {part!r} of unit_locations[{key!r}]: {LOCATION_FORMS}")
        part = list(part)
        nested = all(isinstance(e, (list, tuple)) and _list_depth(e) >= 2 for e in part)
        if nested:  # pyvene's nesting: one entry per intervention
            if len(part) == len(keys):
                owners = keys
            elif len(part) == len(active):
                owners = active
            else:
                raise ValueError(f"unit_locations[{key!r}] give {name} locations for {len(part)} interventions; the "
                                 f"model has {len(active)} ({active})")
            out = {}
            for k, e in zip(owners, part):
                if units[k] == "h.pos":
                    if len(e) != 2 or _list_depth(e) != 3:
                        raise ValueError(f'intervention {k!r} has unit "h.pos": its {name} locations must be '
                                         f"[[heads per prompt], [positions per prompt]], got {e!r}")
                    if len(e[0]) != len(e[1]):
                        raise ValueError(f"intervention {k!r}: {len(e[0])} prompts' heads but {len(e[1])} prompts' "
                                         "positions")
                    out[k] = [[list(h), list(p)] for h, p in zip(e[0], e[1])]
                else:
                    if _list_depth(e) != 2:
                        raise ValueError(f"intervention {k!r} (unit {units[k]!r}): its {name} locations must be one "
                                         f"unit list per prompt, got {e!r}")
                    out[k] = [list(u) for u in e]
        else:
            depth = _list_depth(part)
            if depth == 1:
                per = [list(part)]
            elif depth == 2:
                per = [list(u) for u in part]
            else:
                raise ValueError(f"cannot read the {name} part {part!r} of unit_locations[{key!r}]: {LOCATION_FORMS}")
            hp = [k for k in active if units[k] == "h.pos"]
            if hp:
                raise ValueError(f'interventions {hp} have unit "h.pos": give their {name} locations in pyvene\'s '
                                 "nesting [intervention][2][prompt][units] (heads, then positions)")
            out = {k: per for k in active}
        for k, per in out.items():
            if len(per) not in (1, n_prompts):
                raise ValueError(f"unit_locations give {len(per)} prompts' {name} locations for intervention {k!r}; "
                                 f"there are {n_prompts} prompts (give one for all or one per prompt)")
        return out

    return per_key(pair[0], "source"), per_key(pair[1], "base")


def _check_units(pv, key: str, unit: str, loc, length: int, what: str) -> None:
    heads, pos = (loc[0], loc[1]) if unit == "h.pos" else ((loc, []) if unit == "h" else ([], loc))
    bad = [q for q in pos if not 0 <= q < length]
    if bad:
        raise ValueError(f"unit_locations position(s) {bad} for intervention {key!r} lie outside {what}, which has "
                         f"{length} tokens (positions count from 0 at its first token)")
    n_heads = getattr(hf_model(pv).config, "num_attention_heads", None) or getattr(hf_model(pv).config, "n_head", None)
    badh = [h for h in heads if not (0 <= h < n_heads if n_heads else h >= 0)]
    if badh:
        raise ValueError(f"unit_locations head(s) {badh} for intervention {key!r} are outside the model's "
                         f"{n_heads} attention heads")


def _shift(unit: str, loc, pad: int):
    """Locations counted from a row's first token -> padded-batch coordinates (heads never shift)."""
    if unit == "h":
        return list(loc)
    if unit == "h.pos":
        return [list(loc[0]), [q + pad for q in loc[1]]]
    return [q + pad for q in loc]


SOURCE_FORMS = (
    "sources may be: a string or token-id list (one source for every prompt); a list of them (one per prompt); "
    "pyvene's forms: tokenized inputs (a dict / BatchEncoding with input_ids, optionally attention_mask) or a list "
    "with one such entry (or None) per intervention group; or a list with one list of strings per intervention group"
)


def _tokenized(x) -> bool:
    return isinstance(x, Mapping) and "input_ids" in x


def _read_sources(sources, n_groups: int, n_prompts: int) -> list:
    """One source form per intervention group: None, a tokenized dict, or a list of per-prompt strings / ids."""
    if isinstance(sources, Mapping):
        if not _tokenized(sources):
            raise ValueError(f"sources is a dict without input_ids. {SOURCE_FORMS}")
        return [sources] * n_groups
    if isinstance(sources, (list, tuple)) and sources and all(s is None or isinstance(s, Mapping) for s in sources):
        if not all(s is None or _tokenized(s) for s in sources):
            raise ValueError(f"a sources entry is a dict without input_ids. {SOURCE_FORMS}")
        if len(sources) == 1:
            return list(sources) * n_groups
        if len(sources) != n_groups:
            raise ValueError(f"{len(sources)} tokenized sources for {n_groups} intervention groups: pyvene takes one "
                             f"per group (or one for all). {SOURCE_FORMS}")
        return list(sources)
    if (isinstance(sources, (list, tuple)) and sources and all(isinstance(s, (list, tuple)) for s in sources)
            and all(s and isinstance(s[0], str) for s in sources)):
        if len(sources) != n_groups:
            raise ValueError(f"{len(sources)} lists of source strings for {n_groups} intervention groups; give one "
                             f"per group. {SOURCE_FORMS}")
        return [list(s) for s in sources]
    if isinstance(sources, (list, tuple)) and any(isinstance(s, Mapping) for s in sources):
        raise ValueError(f"sources mixes tokenized inputs with other entries. {SOURCE_FORMS}")
    return [sources] * n_groups


def _source_rows(form, tokenizer, rows_prompt: list[int], n_prompts: int, device):
    """One group's source -> (pyvene input for the runner's rows, per-row position shift, per-row length, name).

    Strings are tokenized and left-padded by cfgen (positions count from each source's first token); tokenized
    inputs are used as given (positions in those tensors' coordinates, as in pyvene)."""
    if _tokenized(form):
        inputs = {k: v for k, v in form.items() if isinstance(v, torch.Tensor)}
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] not in (1, n_prompts):
            raise ValueError(f"tokenized sources have input_ids of shape {tuple(ids.shape)}; pyvene needs "
                             f"[batch, length] with one row per prompt ({n_prompts}) or one row for all")
        index = torch.tensor([p if ids.shape[0] > 1 else 0 for p in rows_prompt], device=ids.device)
        inputs = {k: v.index_select(0, index).to(device) for k, v in inputs.items()}
        width = ids.shape[1]
        return inputs, [0] * len(rows_prompt), [width] * len(rows_prompt), "tokenized source row"
    src_list = as_list(form, "sources")
    if len(src_list) == 1:
        src_list = src_list * n_prompts
    if len(src_list) != n_prompts:
        raise ValueError(f"{len(src_list)} sources for {n_prompts} prompts; give one per prompt or one for all. "
                         f"{SOURCE_FORMS}")
    src_ids = encode(tokenizer, src_list, "sources", special=True)
    rows_src = [src_ids[p] for p in rows_prompt]
    ids, mask = left_pad(rows_src, pad_id(tokenizer), device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    width = ids.shape[1]
    return ({"input_ids": ids, "attention_mask": mask, "position_ids": pos}, [width - len(s) for s in rows_src],
            [len(s) for s in rows_src], "source")


def _read_representations(pv, given, n_prompts: int, active: list[str], rows_prompt: list[int], device) -> dict:
    """pyvene's source_representations forms (a tensor for every intervention, a list in ``sorted_keys`` order, a
    dict by key) -> ``{key: [rows, 1 or units, d]}``. A tensor may be ``[d]``, ``[1, d]`` or ``[1, 1, d]`` (every
    prompt and unit), ``[P, d]`` or ``[P, 1, d]`` (one per prompt), ``[1 or P, U, d]`` (one per unit)."""
    keys = list(pv.sorted_keys)
    if isinstance(given, torch.Tensor):
        given = {k: given for k in active}
    elif isinstance(given, (list, tuple)):
        if len(given) == len(keys):
            given = dict(zip(keys, given))
        elif len(given) == len(active):
            given = dict(zip(active, given))
        else:
            raise ValueError(f"{len(given)} source_representations for {len(active)} interventions {active}")
    elif not isinstance(given, dict):
        raise ValueError("source_representations must be a tensor (every intervention), a list (one per intervention, "
                         f"in pyvene's sorted_keys order) or a dict by intervention key; got {type(given).__name__}")
    reps = {}
    for k, v in given.items():
        if k not in keys:
            raise ValueError(f"source_representations key {k!r} is not one of the model's interventions {keys}")
        if v is None:
            continue
        v = torch.as_tensor(v).to(device)
        shape = tuple(v.shape)
        if v.dim() == 1:
            v = v[None, None]
        elif v.dim() == 2:
            v = v[:, None]
        if v.dim() != 3 or v.shape[0] not in (1, n_prompts):
            raise ValueError(
                f"source_representations[{k!r}] has shape {shape}; accepted: [d], [1, d], [1, 1, d] (every prompt "
                f"and unit), [{n_prompts}, d] or [{n_prompts}, 1, d] (one per prompt), [1 or {n_prompts}, units, d]")
        if v.shape[0] == 1:
            reps[k] = v.expand(len(rows_prompt), -1, -1)
        else:
            reps[k] = v[torch.tensor(rows_prompt, device=device)]
    return reps


def _serial_runner(pv, tokenizer, rows_prompt, prompt_ids, intervention: Intervention, device, tensor_width):
    """``mode="serial"``: source 0 patches source 1, ..., the last source patches the base (pyvene's chain)."""
    groups = [ks for _, ks in sorted(pv._intervention_group.items())]
    n, n_prompts = len(groups), len(prompt_ids)
    stages = [f"source_{g}->source_{g + 1}" for g in range(n - 1)] + [f"source_{n - 1}->base"]
    units = _units(pv)
    odd = [k for ks in groups for k in ks if units[k] != "pos" or
           type(pv.interventions[k]).__name__ == "CounterfactualSampling"]
    if odd:
        raise ValueError(f'mode="serial" configs: cfgen runs position units ("pos") only; {odd} are not')
    if intervention.source_representations is not None or intervention.subspaces is not None or \
            intervention.intervene_on not in (None, "prompt"):
        raise ValueError('mode="serial" configs take sources and unit_locations (the prompt only); '
                         "source_representations, subspaces and intervene_on schedules need mode=\"parallel\"")
    ul = intervention.unit_locations
    if intervention.sources is None or not isinstance(ul, dict) or set(ul) != set(stages):
        raise ValueError(f'a mode="serial" config with {n} intervention groups needs sources (one per group) and '
                         f"unit_locations with exactly the keys {stages}, each as in pyvene (an int, a pair "
                         "(source, destination) of ints or of [key in group][prompt][units] lists); got "
                         f"unit_locations={ul!r}")
    per_group = _read_sources(intervention.sources, n, n_prompts)
    if any(f is None for f in per_group):
        raise ValueError('mode="serial": every intervention group needs a source (None cannot start the chain)')
    built = [_source_rows(f, tokenizer, rows_prompt, n_prompts, device) for f in per_group]
    serial = {}
    for g, stage in enumerate(stages):
        saved = pv.use_fast
        try:
            pair = pv._broadcast_unit_locations(n_prompts, {stage: ul[stage]})[stage]
        except Exception as err:  # pyvene's helper fails with raw TypeErrors on forms it cannot read
            raise ValueError(f"cannot read unit_locations[{stage!r}]={ul[stage]!r} ({err}): {LOCATION_FORMS}") from None
        finally:
            pv.use_fast = saved
        to_base = g == n - 1
        parts = []
        for side, part in (("source", pair[0] if len(pair) == 2 else None),
                           ("destination", pair[1] if len(pair) == 2 else None)):
            ok = isinstance(part, (list, tuple)) and len(part) >= len(groups[g]) and all(
                _list_depth(part[i]) == 2 and len(part[i]) in (1, n_prompts) for i in range(len(groups[g])))
            if not ok:
                raise ValueError(f"cannot read the {side} part of unit_locations[{stage!r}]: give "
                                 f"[key in group][prompt][positions]. {LOCATION_FORMS}")
            rows = []
            for i, key in enumerate(groups[g]):
                per = [part[i][p if len(part[i]) > 1 else 0] for p in rows_prompt]
                into = built[g] if side == "source" else (None if to_base else built[g + 1])
                shifted = []
                for r, loc in enumerate(per):
                    length = (tensor_width or len(prompt_ids[rows_prompt[r]])) if into is None else into[2][r]
                    _check_units(pv, key, "pos", loc, length, f"{stage} {side} of prompt {rows_prompt[r]}")
                    shifted.append([q + (0 if into is None else into[1][r]) for q in loc])
                rows.append(shifted)
            parts.append(rows)
        serial[stage] = (parts[0], parts[1], to_base)
    return PyveneRunner(pv, schedule="prompt", base_locations=[], sources=[b[0] for b in built], serial=serial,
                        shift=tensor_width is None)


def _check_source_kinds(pv, active: list[str], sources, source_representations) -> None:
    """Refuse what pyvene would silently ignore: a per-call vector for an intervention that holds its own, and an
    interchange-type intervention given no source at all (it would patch nothing, so cf == factual)."""
    for key in active:
        iv = pv.interventions[key]
        stored = getattr(iv, "source_representation", None) is not None
        if stored and source_representations is not None:
            given = source_representations
            if not isinstance(given, Mapping) or key in given:
                raise ValueError(
                    f"intervention {key!r} ({type(iv).__name__}) holds its own source_representation, and pyvene "
                    "uses that one: source_representations= would be ignored for it. Build it without a stored "
                    "vector to pass one per call, or change its stored vector (e.g. a scaled copy) instead"
                )
        if not getattr(iv, "is_source_constant", True) and sources is None and source_representations is None:
            raise ValueError(
                f"intervention {key!r} ({type(iv).__name__}) takes its values from a source run, and the call gives "
                "none, so it would change nothing (counterfactual == factual). Give sources= with unit_locations= "
                '(e.g. unit_locations={"sources->base": (4, 4)}), or source_representations='
            )


def pyvene_runner(pv, tokenizer, rows_prompt: list[int], prompt_ids: list[list[int]], intervention: Intervention,
                  device, tensor_width: Optional[int] = None) -> tuple[PyveneRunner, Schedule]:
    """Read the user's pyvene arguments (positions count from each prompt's first token) into a runner.

    ``rows_prompt[r]`` is the prompt index of the runner's row ``r``. ``tensor_width``: the prompts came as
    tokenized tensors of this width, and positions are in their coordinates (as in pyvene).
    """
    n_prompts = len(prompt_ids)
    sources, unit_locations = intervention.sources, intervention.unit_locations
    source_representations, subspaces = intervention.source_representations, intervention.subspaces
    intervene_on = intervention.intervene_on
    keys = list(pv.sorted_keys)
    passive = [k for k in keys if type(pv.interventions[k]).__name__ == "CounterfactualSampling"]
    active = [k for k in keys if k not in passive]
    if getattr(pv, "mode", "parallel") == "serial":
        return _serial_runner(pv, tokenizer, rows_prompt, prompt_ids, intervention, device, tensor_width), "prompt"
    if unit_locations is None and sources is not None:
        raise ValueError(
            "sources were given without unit_locations: an interchange needs to know which source positions "
            'go to which base positions, e.g. unit_locations={"sources->base": (4, 4)} (positions count from '
            "each prompt's first token)"
        )
    if unit_locations is not None and intervene_on not in (None, "prompt"):
        raise ValueError(
            f"unit_locations fix the prompt positions to intervene on; intervene_on={intervene_on!r} cannot apply "
            "as well. For steering at generated tokens give source_representations or a constant-source "
            "intervention and intervene_on='generation' or 'all' without unit_locations"
        )
    schedule = intervene_on or ("prompt" if unit_locations is not None else "all")
    if isinstance(schedule, str):
        if schedule not in ("prompt", "generation", "all"):
            raise ValueError(f"intervene_on={schedule!r}: use 'prompt', 'generation', 'all' or a list of positions")
    else:
        schedule = [int(p) for p in schedule]
        if any(p < 0 for p in schedule):
            raise ValueError("intervene_on positions count from each prompt's first token and must be >= 0")

    src, base = read_unit_locations(pv, unit_locations, n_prompts, active)
    units = _units(pv)
    if src is not None and base is None:
        raise ValueError(f"unit_locations={unit_locations!r} give source locations but no base locations; cfgen "
                         f"needs to know where in each prompt the source goes. {LOCATION_FORMS}")
    for k in active:  # pyvene's NoiseIntervention adds a fixed [1, 4, d] noise tensor
        if type(pv.interventions[k]).__name__ == "NoiseIntervention" and (
                base is None or any(len(loc) != 4 for loc in base.get(k, [[0] * 4]))):
            raise ValueError(f"intervention {k!r} is a pyvene NoiseIntervention, whose noise is a fixed [1, 4, d] "
                             "tensor: give unit_locations with exactly 4 positions per prompt, e.g. "
                             '{"base": [0, 1, 2, 3]}; intervene_on schedules cannot apply it')
    heads = [k for k in active if units[k] in ("h", "h.pos")]
    if heads and unit_locations is None:
        raise ValueError(f'interventions {heads} have head units ("h" / "h.pos"): give unit_locations naming the '
                         'heads, e.g. {"base": [[[0, 1]]]} for heads 0 and 1 of every prompt ("h"), or '
                         '{"base": [[[[0]], [[3]]]]} for head 0 at position 3 ("h.pos")')

    def per_row(locs):  # [prompt or one for all] -> [row]
        return [locs[p if len(locs) > 1 else 0] for p in rows_prompt]

    def default(key):  # a key the user gave no locations for: position 0, never intervened (masked)
        return [[[0], [0]] if units[key] == "h.pos" else [0]] * len(rows_prompt)

    base_locations = src_locations = None
    if base is not None:
        for key, per in base.items():
            for p in range(n_prompts):
                _check_units(pv, key, units[key], per[p if len(per) > 1 else 0],
                             tensor_width or len(prompt_ids[p]), f"prompt {p}")
        base_locations = [per_row(base[k]) if k in base else default(k) for k in keys]

    src_inputs = None
    if sources is not None:
        groups = dict(pv._intervention_group)
        per_group = _read_sources(sources, len(groups), n_prompts)
        built: dict[int, tuple] = {}  # id(form) -> (inputs, per-row shift, per-row length, what)
        src_inputs = []
        for g in range(len(groups)):
            form = per_group[g]
            if form is None:
                src_inputs.append(None)
                continue
            if id(form) not in built:
                built[id(form)] = _source_rows(form, tokenizer, rows_prompt, n_prompts, device)
            src_inputs.append(built[id(form)][0])
        if src is None:
            src = base
        group_of = {k: g for g, ks in groups.items() for k in ks}
        src_locations = []
        for k in keys:
            form = per_group[group_of[k]] if k in group_of else None
            locs = per_row(src[k]) if k in src else default(k)
            if form is None or k not in src:
                shifted = [_shift(units[k], loc, 0) for loc in locs]
            else:
                _, shifts, lengths, what = built[id(form)]
                shifted = []
                for r, loc in enumerate(locs):
                    _check_units(pv, k, units[k], loc, lengths[r], f"{what} {rows_prompt[r]}")
                    shifted.append(_shift(units[k], loc, shifts[r]))
            if units[k] == "h.pos":
                shifted = [[s[0] for s in shifted], [s[1] for s in shifted]]
            src_locations.append(shifted)

    reps = None
    if source_representations is not None:
        reps = _read_representations(pv, source_representations, n_prompts, active, rows_prompt, device)

    subs = subspaces
    if subspaces is not None and _list_depth(subspaces) == 3:
        subs = [[per[p if len(per) > 1 else 0] for p in rows_prompt] for per in subspaces]
    _check_source_kinds(pv, active, sources, source_representations)  # after the forms, so those errors come first
    return PyveneRunner(pv, schedule=schedule, base_locations=base_locations, sources=src_inputs,
                        source_locations=src_locations, source_representations=reps, subspaces=subs,
                        passive=passive, shift=tensor_width is None), schedule


# -------------------------------------------------------------- decoding --
def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class KVBatch:
    """The rows one runner computes, with their KV cache; rows can be fed different numbers of tokens.

    ``logits`` (float32 ``[n, V]``) predict each row's next token. With
    ``share_prefix`` (plain runners), rows that share a prompt of 8 tokens or more
    prefill it once and copy its cache to every row.
    """

    def __init__(self, runner, rows: Rows, *, pad: int, vocab: int, device, share_prefix: bool = False):
        self.runner, self.rows, self.pad, self.vocab, self.device = runner, rows, pad, vocab, device
        self.prompt_len = torch.tensor(rows.prompt_len, device=device)
        contexts, n = rows.context, len(rows)
        common = _common_prefix(contexts) if share_prefix and n > 1 else 0
        if common >= 8:
            ids = torch.tensor([contexts[0][:common]], device=device)
            pos = torch.arange(common, device=device)[None]
            logits, cache = runner(ids, torch.ones_like(ids), pos, None, abs_pos=pos, prompt_len=self.prompt_len[:1],
                                   rows=rows.select([0]), prefill=True)
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(n)
                self.cache = cache
                self.mask = torch.ones((n, common), dtype=torch.long, device=device)
                self.next_pos = torch.full((n,), common, dtype=torch.long, device=device)
                self.logits = logits[:, -1, :vocab].float().expand(n, -1).clone()
                self.feed([c[common:] for c in contexts])
                return
        if rows.layout[0] is not None:  # the user's own tensors, left or right padded
            ids = torch.tensor([lay[0] for lay in rows.layout], device=device)
            mask = torch.tensor([lay[1] for lay in rows.layout], device=device)
        else:
            ids, mask = left_pad(contexts, pad, device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        abs_pos = pos.masked_fill(mask == 0, -1)
        width = ids.shape[1]
        keep = width if bool((mask[:, -1] == 0).any()) else 1  # right padding: a row's last token is not last
        logits, self.cache = runner(ids, mask, pos, None, abs_pos=abs_pos, prompt_len=self.prompt_len, rows=rows,
                                    prefill=True, keep=keep)
        self.mask = mask
        self.next_pos = mask.sum(1)
        if keep == 1:
            self.logits = logits[:, -1, :vocab].float()
        else:
            last = width - 1 - mask.flip(1).argmax(1)
            self.logits = logits[torch.arange(n, device=device), last - (width - logits.shape[1]), :vocab].float()

    def feed(self, seqs: list[list[int]]) -> None:
        """Append ``seqs[r]`` (possibly empty) to row ``r``; the logits follow each fed row's last token."""
        k = max(len(s) for s in seqs)
        if k == 0:
            return
        n = len(seqs)
        ids = torch.full((n, k), self.pad, dtype=torch.long, device=self.device)
        m = torch.zeros((n, k), dtype=torch.long, device=self.device)
        for r, s in enumerate(seqs):
            if s:
                ids[r, :len(s)] = torch.tensor(s, device=self.device)
                m[r, :len(s)] = 1
        pos = self.next_pos[:, None] + (m.cumsum(1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, m], 1)
        logits, self.cache = self.runner(ids, self.mask, pos, self.cache, abs_pos=pos.masked_fill(m == 0, -1),
                                         prompt_len=self.prompt_len, rows=self.rows, prefill=False, keep=k)
        fed = m.sum(1)
        got = logits[torch.arange(n, device=self.device), (fed - 1).clamp(min=0), :self.vocab].float()
        self.logits = torch.where((fed > 0)[:, None], got, self.logits)
        self.next_pos = self.next_pos + fed


class StepError(ValueError):
    """Logits that cannot be sampled (NaN, +inf, all -inf), with where it happened."""


def row_noise(rows: Rows, sel: Sequence[int], steps: Sequence[int], vocab: int, device) -> torch.Tensor:
    """Noise ``[len(sel), V]`` for rows ``sel`` at absolute steps ``steps``: prior by (seed, step, stream),
    or the row's posterior noise while the step lies inside it."""
    seeds = torch.tensor([rows.seed[r] for r in sel], dtype=torch.long, device=device)
    st = torch.tensor(list(steps), dtype=torch.long, device=device)
    streams = torch.tensor([rows.stream[r] for r in sel], device=device)
    u = torch.empty(len(sel), vocab, device=device)
    for stream in torch.unique(streams).tolist():
        part = (streams == stream).nonzero()[:, 0]
        u[part] = gumbel_noise(seeds[part], st[part], vocab, stream=stream, device=device)
    hindsight: dict[int, list[tuple[int, int, int]]] = {}  # one posterior call per sampler: (i, r, k)
    for i, r in enumerate(sel):
        post = rows.posterior[r]
        k = steps[i] - rows.step_offset[r]
        if post is None or not 0 <= k < post.shape[0]:
            continue
        if isinstance(post, Hindsight):
            hindsight.setdefault(id(post.sampler), []).append((i, r, k))
        else:
            u[i] = post[k].to(device)
    for group in hindsight.values():
        posts = [rows.posterior[r] for _, r, _ in group]
        z = torch.stack([h.logits[k] for h, (_, _, k) in zip(posts, group)]).to(device)
        y = torch.stack([h.tokens[k] for h, (_, _, k) in zip(posts, group)]).to(device)
        seeds_g = torch.tensor([rows.seed[r] for _, r, _ in group], dtype=torch.long, device=device)
        k_g = torch.tensor([k for _, _, k in group], dtype=torch.long, device=device)
        u[torch.tensor([i for i, _, _ in group], device=device)] = posterior_noise(
            z, y, sampler=posts[0].sampler, seed=seeds_g, step=k_g)
    return u


class FreeRun:
    """The decode program of generate / counterfactual / do / edit_prompt: every row samples at every step
    (noise step ``step_offset + step``) until EOS, a stop string or its budget; rows that ended are fed padding."""

    def __init__(self, rows: Rows, *, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 stop: Optional[Callable[[list[int]], bool]] = None, device=None, progress=None):
        n = len(rows)
        self.rows, self.n, self.pad, self.stop, self.device = rows, n, pad_token_id, stop, device
        self.horizon = max(rows.max_new) if n else 0
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reason = ["length"] * n
        self.done = torch.tensor([m <= 0 for m in rows.max_new], device=device)
        self.eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
        self.max_new = torch.tensor(rows.max_new, device=device)
        self.step = 0
        self.bar = progress(total=self.horizon, desc="decoding", leave=False) if progress else None

    def where(self) -> str:
        return f"at generation step {self.step}"

    def next(self, sel: Sequence[int], token: Optional[torch.Tensor]):
        """Given the tokens sampled for rows ``sel``: (what to feed each row, each row's noise step or None),
        or None when every row has ended."""
        if token is None:  # the start
            return (None, [o for o in self.rows.step_offset]) if self.horizon > 0 else None
        step, done = self.step, self.done
        token = torch.where(done, torch.full_like(token, self.pad), token)
        for r in (~done).nonzero()[:, 0].tolist():
            self.tokens[r].append(int(token[r]))
        hit_eos = (token[:, None] == self.eos).any(1) & ~done
        for r in hit_eos.nonzero()[:, 0].tolist():
            self.tokens[r].pop()
            self.reason[r] = "eos"
        if self.stop is not None:
            for r in (~done & ~hit_eos).nonzero()[:, 0].tolist():
                if self.stop(self.tokens[r]):
                    hit_eos[r] = True
                    self.reason[r] = "stop_string"
        self.done = done | hit_eos | (self.max_new <= step + 1)
        if self.bar:
            self.bar.update(1)
        if bool(self.done.all()) or step + 1 >= self.horizon:
            return None
        self.step = step + 1
        return [[t] for t in token.tolist()], [o + self.step for o in self.rows.step_offset]

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def decode(batches: Sequence[tuple[KVBatch, Sequence[int]]], rows: Rows, program, *, sampler: Sampler,
           vocab_size: int, device, processing=None) -> None:
    """The decode loop. ``batches`` pair a :class:`KVBatch` with the global indices of its rows.

    ``program.next(sel, tokens)`` receives the tokens sampled for rows ``sel``
    (``tokens`` is None at the start) and returns ``(feeds, steps)``: the tokens
    to feed each row next (None: nothing to feed) and each row's noise step for
    the next sample (None: the row does not sample), or None to stop. Forced
    tokens (labels, set values) are simply fed; sampled rows draw
    ``argmax(sampler.log_probs(logits) + noise)``, or with a non-empty
    :class:`cfgen.processors.Processing` ``argmax(log p~ + noise)``, ``p~`` being what the
    processors make of each row's logits given that row's own history (its context and
    everything fed since).
    """
    n = len(rows)
    process = processing is not None and not processing.empty
    history = [list(c) for c in rows.context] if process else None
    sel: list[int] = []
    token: Optional[torch.Tensor] = None
    try:
        while True:
            plan = program.next(sel, token)
            if plan is None:
                break
            feeds, steps = plan
            if feeds is not None:
                try:
                    for batch, idx in batches:
                        batch.feed([feeds[r] for r in idx])
                except StepError as err:
                    raise StepError(f"{program.where()}: {err}") from None
                if process:
                    for r, fed in enumerate(feeds):
                        history[r].extend(fed or ())
            sel = [r for r in range(n) if steps[r] is not None]
            if not sel:
                token = torch.empty(0, dtype=torch.long, device=device)
                continue
            logits = torch.empty(n, vocab_size, device=device)
            for batch, idx in batches:
                logits[torch.as_tensor(list(idx), device=device)] = batch.logits
            if len(sel) < n:
                logits = logits[torch.tensor(sel, device=device)]
            try:
                check_logits(logits)
            except ValueError as err:
                raise StepError(f"{program.where()}: {err}") from None
            noise = row_noise(rows, sel, [steps[r] for r in sel], vocab_size, device)
            if process:
                token = processing.sample(logits, noise, [history[r] for r in sel], [rows.prompt_len[r] for r in sel])
            else:
                token = sampler.sample(logits, noise)
    finally:
        close = getattr(program, "close", None)
        if close is not None:
            close()


def run(models: Models, tokenizer, rows: Rows, rows_prompt: list[int], prompt_ids: list[list[int]], *,
        sampler: Sampler, intervention: Intervention, eos: Sequence[int], stop=None, progress: bool = False,
        collected: Optional[dict] = None, processing=None):
    """Decode ``rows`` (their ``intervene`` flags pick the counterfactual model) with :class:`FreeRun`.

    Returns (new tokens per row, finish reason per row, the schedule applied or None).
    ``collected`` (a dict, filled when given): ``{row: {key: {"positions", "activations"}}}`` for the
    model's CollectInterventions (rows computed by a plain model collect nothing).
    Raises ValueError for logits that cannot be sampled.
    """
    device = models.device
    vocab = vocab_size(hf_model(models.factual))
    fact_rows = [r for r in range(len(rows)) if not rows.intervene[r]]
    cf_rows = [r for r in range(len(rows)) if rows.intervene[r]]
    cf = models.counterfactual
    schedule = None
    if is_intervenable(cf):
        idx = list(range(len(rows))) if models.shared else cf_rows
        width = len(rows.layout[0][0]) if len(rows) and rows.layout[0] is not None else None
        runner, schedule = pyvene_runner(cf, tokenizer, [rows_prompt[r] for r in idx], prompt_ids, intervention,
                                         device, tensor_width=width)
        groups = [(runner, idx)] if models.shared else [(PlainRunner(models.factual), fact_rows), (runner, cf_rows)]
    else:
        if intervention.given():
            raise ValueError("sources / unit_locations / source_representations / subspaces / intervene_on need a "
                             "pyvene.IntervenableModel as the counterfactual model")
        groups = [(PlainRunner(models.factual), fact_rows), (PlainRunner(cf), cf_rows)]
    groups = [(runner, idx) for runner, idx in groups if idx]
    _check_decode_memory(hf_model(models.factual), rows, vocab, device)
    bar = None
    if progress:
        from tqdm.auto import tqdm as bar
    pad = pad_id(tokenizer)
    program = FreeRun(rows, eos_token_ids=eos, pad_token_id=pad, stop=stop, device=device, progress=bar)
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for runner, _ in groups:
                stack.enter_context(runner.active())
            try:
                batches = [(KVBatch(runner, rows.select(idx), pad=pad, vocab=vocab, device=device), idx)
                           for runner, idx in groups]
            except StepError as err:
                raise StepError(f"in the prompt's forward pass: {err}") from None
            decode(batches, rows, program, sampler=sampler, vocab_size=vocab, device=device, processing=processing)
    except StepError as err:
        raise ValueError(str(err)) from None
    if collected is not None:
        for runner, idx in groups:
            if isinstance(runner, PyveneRunner) and runner.collect:
                for r, got in zip(idx, runner.rows_collected(len(idx))):
                    collected[r] = got
    return program.tokens, program.reason, (list(schedule) if isinstance(schedule, list) else schedule)


def _check_decode_memory(model, rows: Rows, vocab: int, device) -> None:
    """Refuse up front a decode whose per-step tensors and KV cache cannot fit (rather than failing after minutes)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    head_dim = getattr(cfg, "head_dim", None) or hidden // max(heads, 1)
    width = max((len(c) + m for c, m in zip(rows.context, rows.max_new)), default=0)
    itemsize = next(model.parameters()).element_size()
    per_row = 6 * vocab * 4 + layers * 2 * kv_heads * head_dim * width * itemsize  # logits, noise, log-probs; cache
    needed = len(rows) * per_row
    available = None
    if torch.device(device).type == "cuda":
        available = torch.cuda.mem_get_info(torch.device(device))[0]
    checks.check_memory(needed, f"decoding {len(rows)} rows of up to {width} tokens", available=available)


def check_intervention(models: Models, tokenizer, prompt_ids: list[list[int]], intervention: Intervention,
                       tensor_width: Optional[int] = None) -> None:
    """Read the pyvene arguments once for every prompt, so a form that cannot be honoured is refused before any
    model work (front-ends that compute logits before decoding call this first)."""
    cf = models.counterfactual
    if not is_intervenable(cf):
        if intervention.given():
            raise ValueError("sources / unit_locations / source_representations / subspaces / intervene_on need a "
                             "pyvene.IntervenableModel as the counterfactual model")
        return
    pyvene_runner(cf, tokenizer, list(range(len(prompt_ids))), prompt_ids, intervention, models.device,
                  tensor_width=tensor_width)


def teacher_forced_logits(model, contexts: list[list[int]], targets: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Logits ``[len(t), V]`` predicting each target token after its context, one padded batch."""
    device = next(model.parameters()).device
    seqs = [c + t for c, t in zip(contexts, targets)]
    ids, mask = left_pad(seqs, pad, device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    out = []
    width = ids.shape[1]
    for r, t in enumerate(targets):
        end = width - 1  # the last position predicts nothing we observe
        out.append(logits[r, end - len(t):end])
    return out
