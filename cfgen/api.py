"""``cfgen.generate`` and ``cfgen.counterfactual``: noise-matched text over pyvene models."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .decode import PlainRunner, PyveneRunner, Rows, StepError, _left_pad, decode
from .noise import PRIOR
from .posterior import ImpossibleObservation, posterior_noise
from .results import CounterfactualResult
from .sampler import Sampler

__all__ = ["generate", "counterfactual", "INTERVENTIONAL"]

INTERVENTIONAL = 4  # noise stream of the interventional baseline (fresh noise, same seed)

Prompt = Union[str, Sequence[int]]


# ---------------------------------------------------------------- models --
def _is_intervenable(obj) -> bool:
    return type(obj).__name__ == "IntervenableModel" and hasattr(obj, "interventions")


def _hf_model(obj):
    return obj.model if _is_intervenable(obj) else obj


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return model.config.vocab_size


@dataclass
class _Models:
    factual: Any  # HF model
    counterfactual: Any  # HF model or IntervenableModel
    shared: bool  # factual rows can ride in the intervenable's batch

    @property
    def device(self):
        return next(_hf_model(self.factual).parameters()).device


def _resolve_models(model) -> _Models:
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise ValueError(f"a model pair must be (factual_model, counterfactual_model), got {len(model)} items")
        fact, cf = model
        if _is_intervenable(fact):
            raise TypeError("the factual model of a pair must be a plain Hugging Face model (no interventions)")
        va, vb = _vocab_size(fact), _vocab_size(_hf_model(cf))
        if va != vb:
            raise ValueError(
                f"the factual model has {va} output logits and the counterfactual model {vb}: noise is keyed by "
                "token id, so both models must share one vocabulary (use the same tokenizer family)"
            )
        return _Models(fact, cf, shared=False)
    if _is_intervenable(model):
        return _Models(model.model, model, shared=True)
    raise TypeError(
        f"model must be a pyvene.IntervenableModel or a (factual_model, counterfactual_model) pair, got "
        f"{type(model).__name__}. Wrap a plain model with pyvene.IntervenableModel(config, model), or pass "
        "(model, edited_model) for weight edits and model swaps."
    )


def _tokenizer(tokenizer):
    if isinstance(tokenizer, (tuple, list)):
        a, b = tokenizer
        if a.get_vocab() != b.get_vocab():
            raise ValueError(
                "the factual and counterfactual tokenizers differ: noise is keyed by token id, so counterfactual "
                "text is only defined for models sharing one tokenizer"
            )
        return a
    return tokenizer


def _sampler(sampler, model, hf_kwargs) -> tuple[Sampler, Optional[int]]:
    from_site = None
    if _is_intervenable(model):
        sites = [iv for iv in model.interventions.values() if type(iv).__name__ == "CounterfactualSampling"]
        if sites:
            from_site = sites[0]
    if hf_kwargs:
        unknown = set(hf_kwargs) - {"temperature", "top_k", "top_p", "do_sample"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        if sampler is not None:
            raise TypeError("pass either sampler= or HF-style temperature / top_k / top_p / do_sample, not both")
        if hf_kwargs.get("do_sample", True) is False:
            sampler = Sampler(temperature=0.0)
        else:
            sampler = Sampler(hf_kwargs.get("temperature", 1.0), hf_kwargs.get("top_k"), hf_kwargs.get("top_p"))
    if sampler is None:
        sampler = from_site.sampler if from_site is not None else Sampler()
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a cfgen.Sampler, got {type(sampler).__name__}")
    return sampler, (from_site.seed if from_site is not None else None)


# --------------------------------------------------------------- inputs --
def _as_list(x, name: str) -> list:
    if isinstance(x, str) or (isinstance(x, Sequence) and x and isinstance(x[0], int)):
        return [x]
    if isinstance(x, torch.Tensor):
        return [x.tolist()] if x.dim() == 1 else x.tolist()
    if not isinstance(x, Sequence) or isinstance(x, dict):
        raise TypeError(f"{name} must be a string, a list of token ids, or a list of either")
    return list(x)


def _encode(tokenizer, texts: list, name: str, *, special: bool) -> list[list[int]]:
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if not t:
                raise ValueError(f"{name}[{i}] is empty: give at least one token of text")
            ids = tokenizer(t, add_special_tokens=special)["input_ids"]
        else:
            ids = [int(v) for v in t]
        if not ids:
            raise ValueError(f"{name}[{i}] has no tokens")
        out.append(ids)
    return out


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _seeds(seed, n: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed] * n
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed has {len(seeds)} values for {n} prompts; give one int or one per prompt")
    return seeds


def _check_ids(model, seqs: list[list[int]], name: str) -> None:
    vocab = _vocab_size(model)
    for i, ids in enumerate(seqs):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"{name}[{i}] holds token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab}): "
                "the tokenizer does not belong to this model"
            )


def _check_context(model, prompt_ids: list[list[int]], max_new: list[int]) -> None:
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


def _list_depth(x) -> int:
    d = 0
    while isinstance(x, (list, tuple)) and x:
        x, d = x[0], d + 1
    return d


def _locations(unit_locations, n_interventions: int, n_prompts: int):
    """pyvene's unit_locations forms -> (source, base), each None or [intervention][prompt][units]."""
    if unit_locations is None:
        return None, None
    if not isinstance(unit_locations, dict) or len(unit_locations) != 1:
        raise ValueError('unit_locations must be a dict with one key, "sources->base" or "base", as in pyvene')
    (key, value), = unit_locations.items()
    if key not in ("sources->base", "base"):
        raise ValueError(f'unknown unit_locations key {key!r}; use "sources->base" or "base"')

    def full(v):
        if v is None:
            return None
        if isinstance(v, int):
            v = [v]
        depth = _list_depth(v)
        if depth == 1:
            return [[list(v)] * n_prompts] * n_interventions
        if depth == 2:
            return [list(map(list, v))] * n_interventions
        if depth == 3:
            return [list(map(list, per)) for per in v]
        raise ValueError(f"cannot read unit_locations {v!r}; see pyvene's documentation of unit_locations")

    if key == "base":
        src, base = None, value
    elif isinstance(value, tuple) and len(value) == 2:  # (source positions, base positions)
        src, base = value
    else:  # the same positions in source and base
        src = base = value
    src, base = full(src), full(base)
    for name, locs in (("source", src), ("base", base)):
        if locs is None:
            continue
        if len(locs) != n_interventions:
            raise ValueError(f"unit_locations give {len(locs)} interventions' {name} positions; "
                             f"the model has {n_interventions}")
        for per in locs:
            if len(per) not in (1, n_prompts):
                raise ValueError(f"unit_locations give {len(per)} rows of {name} positions for {n_prompts} prompts")
    return src, base


# ----------------------------------------------------------- the runner --
def _pyvene_runner(pv, tokenizer, rows_prompt: list[int], n_prompts: int, *, sources, unit_locations,
                   source_representations, subspaces, intervene_on, device, prompt_ids):
    keys = list(pv.sorted_keys)
    passive = [k for k in keys if type(pv.interventions[k]).__name__ == "CounterfactualSampling"]
    active = [k for k in keys if k not in passive]
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

    src, base = _locations(unit_locations, len(active), n_prompts)

    def per_row(locs):  # [prompt or one for all][units] -> [row][units]
        return [locs[p if len(locs) > 1 else 0] for p in rows_prompt]

    base_locations = src_locations = None
    if base is not None:
        for i, per in enumerate(base):
            for p in range(n_prompts):
                locs = per[p if len(per) > 1 else 0]
                bad = [q for q in locs if not 0 <= q < len(prompt_ids[p])]
                if bad:
                    raise ValueError(
                        f"unit_locations position(s) {bad} for intervention {i} lie outside prompt {p}, which has "
                        f"{len(prompt_ids[p])} tokens (positions count from 0 at the prompt's first token)"
                    )
        by_key = dict(zip(active, base))
        base_locations = [per_row(by_key[k]) if k in by_key else [[0]] * len(rows_prompt) for k in keys]

    src_inputs = None
    if sources is not None:
        src_list = _as_list(sources, "sources")
        if len(src_list) == 1:
            src_list = src_list * n_prompts
        if len(src_list) != n_prompts:
            raise ValueError(f"{len(src_list)} sources for {n_prompts} prompts; give one per prompt or one for all")
        src_ids = _encode(tokenizer, src_list, "sources", special=True)
        rows_src = [src_ids[p] for p in rows_prompt]
        pad_id = _pad_id(tokenizer)
        ids, mask = _left_pad(rows_src, pad_id, device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        src_inputs = [{"input_ids": ids, "attention_mask": mask, "position_ids": pos}] * len(pv._intervention_group)
        if src is None:
            src = base
        by_key = dict(zip(active, src))
        width = ids.shape[1]
        src_locations = []
        for k in keys:
            locs = per_row(by_key[k]) if k in by_key else [[0]] * len(rows_prompt)
            shifted = []
            for r, loc in enumerate(locs):
                n_src = len(rows_src[r])
                bad = [q for q in loc if not 0 <= q < n_src]
                if bad:
                    raise ValueError(f"source position(s) {bad} lie outside source {rows_prompt[r]} "
                                     f"({n_src} tokens)")
                shifted.append([q + width - n_src for q in loc])
            src_locations.append(shifted)

    reps = None
    if source_representations is not None:
        given = source_representations
        if isinstance(given, torch.Tensor):
            given = {k: given for k in active}
        elif isinstance(given, (list, tuple)):
            if len(given) != len(active):
                raise ValueError(f"{len(given)} source_representations for {len(active)} interventions")
            given = dict(zip(active, given))
        reps = {}
        for k, v in given.items():
            if k not in keys:
                raise ValueError(f"source_representations key {k!r} is not one of the model's interventions {keys}")
            v = torch.as_tensor(v).to(device)
            if v.dim() == 1:
                v = v.expand(n_prompts, -1)
            if v.dim() != 2 or v.shape[0] != n_prompts:
                raise ValueError(f"source_representations must be [d] or [num_prompts, d]; got {tuple(v.shape)}")
            reps[k] = v[torch.tensor(rows_prompt, device=device)]

    subs = subspaces
    if subspaces is not None and _list_depth(subspaces) == 3:
        subs = [[per[p if len(per) > 1 else 0] for p in rows_prompt] for per in subspaces]
    return PyveneRunner(pv, schedule=schedule, base_locations=base_locations, sources=src_inputs,
                        source_locations=src_locations, source_representations=reps, subspaces=subs,
                        passive=passive), schedule


def _stop_fn(tokenizer, stop_strings):
    if not stop_strings:
        return None
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-16:], skip_special_tokens=False)
        return any(s in text for s in stops)

    return stop


def _eos_ids(tokenizer, model, eos_token_id) -> list[int]:
    if eos_token_id is not None:
        return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _run(models: _Models, tokenizer, rows: Rows, *, sampler, intervention, eos, stop, progress):
    device = models.device
    vocab = _vocab_size(_hf_model(models.factual))
    pad_id = _pad_id(tokenizer)
    fact_rows = [r for r in range(len(rows)) if not rows.intervene[r]]
    cf_rows = [r for r in range(len(rows)) if rows.intervene[r]]
    rows_prompt = intervention.pop("rows_prompt")
    cf = models.counterfactual
    schedule = None
    if _is_intervenable(cf):
        idx = list(range(len(rows))) if models.shared else cf_rows
        runner, schedule = _pyvene_runner(cf, tokenizer, [rows_prompt[r] for r in idx], device=device, **intervention)
        groups = [(runner, idx)] if models.shared else [(PlainRunner(models.factual), fact_rows), (runner, cf_rows)]
    else:
        if any(v is not None for k, v in intervention.items() if k not in ("n_prompts", "prompt_ids")):
            raise ValueError("sources / unit_locations / source_representations / subspaces / intervene_on need a "
                             "pyvene.IntervenableModel as the counterfactual model")
        groups = [(PlainRunner(models.factual), fact_rows), (PlainRunner(cf), cf_rows)]
    groups = [(runner, idx) for runner, idx in groups if idx]
    bar = None
    if progress:
        from tqdm.auto import tqdm as bar
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for runner, _ in groups:
            if isinstance(runner, PyveneRunner):
                stack.enter_context(runner.masked())
        out = decode(groups, rows, sampler=sampler, vocab_size=vocab, eos_token_ids=eos, pad_token_id=pad_id,
                     stop=stop, device=device, progress=bar)
    return out, schedule


def _intervention_kwargs(sources, unit_locations, source_representations, subspaces, intervene_on):
    return dict(sources=sources, unit_locations=unit_locations, source_representations=source_representations,
                subspaces=subspaces, intervene_on=intervene_on)


def _decode_rows(models: _Models, tokenizer, rows: Rows, rows_prompt: list[int], prompt_ids: list[list[int]], *,
                 sampler: Sampler, eos_token_id, stop_strings, progress: bool, **intervention):
    """Decode ``rows``; return their tokens, finish reasons and the schedule that was applied."""
    intervention.update(rows_prompt=rows_prompt, n_prompts=len(prompt_ids), prompt_ids=prompt_ids)
    eos = _eos_ids(tokenizer, _hf_model(models.factual), eos_token_id)
    try:
        (tokens, reasons), schedule = _run(models, tokenizer, rows, sampler=sampler, intervention=intervention,
                                           eos=eos, stop=_stop_fn(tokenizer, stop_strings), progress=progress)
    except StepError as err:
        raise ValueError(str(err)) from None
    return tokens, reasons, (list(schedule) if isinstance(schedule, list) else schedule)


def generate(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    *,
    max_new_tokens: int,
    sampler: Optional[Sampler] = None,
    seed: Union[int, Sequence[int], None] = None,
    num_samples: int = 1,
    sources=None,
    unit_locations=None,
    source_representations=None,
    subspaces=None,
    intervene_on: Union[str, Sequence[int], None] = None,
    interventional: bool = False,
    stop_strings: Union[str, Sequence[str], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    progress: bool = False,
    **hf_sampling,
) -> CounterfactualResult:
    """Sample factual text and the noise-matched counterfactual text under an intervention.

    Both continuations use the same Gumbel noise ``U[step, token]`` (keyed by the
    seed), so every difference between them is caused by the intervention.

    Args:
        model: a ``pyvene.IntervenableModel`` (factual = the wrapped model with no
            intervention) or a ``(factual_model, counterfactual_model)`` pair (weight
            edits, model swaps; the second may itself be an IntervenableModel).
        tokenizer: the shared tokenizer (a pair of tokenizers is checked for equality).
        prompts: a string, a list of token ids, or a list of either.
        max_new_tokens: the number of new tokens at most; each row stops at its own EOS.
        sampler: a :class:`cfgen.Sampler`; or HF-style ``temperature=``, ``top_k=``,
            ``top_p=``, ``do_sample=``. Defaults to a ``CounterfactualSampling`` site in the
            model's config, else pure sampling at temperature 1.
        seed: an int (every prompt), or one per prompt. Sample ``j`` of a prompt uses ``seed + j``.
        num_samples: independent (factual, counterfactual) pairs per prompt.
        sources, unit_locations, source_representations, subspaces: as for
            ``IntervenableModel.forward``; positions count from each prompt's first token
            (cfgen shifts them for left padding).
        intervene_on: where in time the intervention applies: ``"prompt"`` (every prompt
            position; the default with ``unit_locations``), ``"generation"`` (every position
            whose output predicts a new token: the last prompt position and each generated
            token, so the first new token is intervened), ``"all"`` (default without
            ``unit_locations``) or a list of absolute positions.
        interventional: also sample the intervened model with fresh noise (the
            interventional baseline), in ``result.interventional_ids``.
        stop_strings: stop a row when its text contains one of these.
        eos_token_id: overrides the model's EOS token id(s).
        progress: show a tqdm progress bar.

    Returns:
        a :class:`cfgen.CounterfactualResult`.

    Example:
        >>> import cfgen, pyvene as pv, torch
        >>> model, tok = cfgen.load_default_model()
        >>> steer = pv.IntervenableModel({"layer": 10, "component": "block_output",
        ...     "intervention": pv.AdditionIntervention(embed_dim=576, source_representation=torch.zeros(576))},
        ...     model)
        >>> r = cfgen.generate(steer, tok, "Once upon a time", max_new_tokens=8, seed=1)
        >>> r.identical  # a zero steering vector changes nothing
        [True]
    """
    models = _resolve_models(model)
    tokenizer = _tokenizer(tokenizer)
    sampler, site_seed = _sampler(sampler, models.counterfactual, hf_sampling)
    seed = site_seed if seed is None else seed
    seed = 0 if seed is None else seed
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    prompt_list = _as_list(prompts, "prompts")
    prompt_ids = _encode(tokenizer, prompt_list, "prompts", special=True)
    _check_ids(_hf_model(models.factual), prompt_ids, "prompts")
    _check_context(_hf_model(models.factual), prompt_ids, [max_new_tokens] * len(prompt_ids))
    base_seeds = _seeds(seed, len(prompt_ids))

    pairs = [(p, j) for p in range(len(prompt_ids)) for j in range(num_samples)]
    kinds = [("factual", False, PRIOR), ("counterfactual", True, PRIOR)]
    if interventional:
        kinds.append(("interventional", True, INTERVENTIONAL))
    rows_prompt, context, seeds, intervene, stream = [], [], [], [], []
    for _, flag, st in kinds:
        for p, j in pairs:
            rows_prompt.append(p)
            context.append(prompt_ids[p])
            seeds.append(base_seeds[p] + j)
            intervene.append(flag)
            stream.append(st)
    rows = Rows(context=context, prompt_len=[len(c) for c in context], seed=seeds,
                max_new=[max_new_tokens] * len(context), stream=stream, intervene=intervene)
    tokens, reasons, schedule = _decode_rows(
        models, tokenizer, rows, rows_prompt, prompt_ids, sampler=sampler, eos_token_id=eos_token_id,
        stop_strings=stop_strings, progress=progress, sources=sources, unit_locations=unit_locations,
        source_representations=source_representations, subspaces=subspaces, intervene_on=intervene_on)
    n = len(pairs)
    return CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(p) for p in prompt_list],
        prompt_ids=prompt_ids,
        factual_ids=tokens[:n],
        counterfactual_ids=tokens[n:2 * n],
        interventional_ids=tokens[2 * n:] if interventional else None,
        seeds=seeds[:n],
        sampler=sampler,
        mode="prior",
        prompt_index=[p for p, _ in pairs],
        sample_index=[j for _, j in pairs],
        finish_reasons={name: reasons[i * n:(i + 1) * n] for i, (name, _, _) in enumerate(kinds)},
        settings={"max_new_tokens": max_new_tokens, "intervene_on": schedule,
                  "interventional_stream": INTERVENTIONAL if interventional else None},
        tokenizer=tokenizer,
    )


def _teacher_forced_logits(model, contexts: list[list[int]], targets: list[list[int]], pad_id: int):
    """Logits predicting each target token after its context, one padded batch."""
    device = next(model.parameters()).device
    seqs = [c + t for c, t in zip(contexts, targets)]
    ids, mask = _left_pad(seqs, pad_id, device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    out = []
    width = ids.shape[1]
    for r, t in enumerate(targets):
        end = width - 1  # the last position predicts nothing we observe
        out.append(logits[r, end - len(t):end])
    return out


def counterfactual(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    observed: Union[Prompt, Sequence[Prompt]],
    *,
    num_samples: int = 1,
    max_new_tokens: Optional[int] = None,
    sampler: Optional[Sampler] = None,
    seed: Union[int, Sequence[int], None] = None,
    sources=None,
    unit_locations=None,
    source_representations=None,
    subspaces=None,
    intervene_on: Union[str, Sequence[int], None] = None,
    interventional: bool = False,
    stop_strings: Union[str, Sequence[str], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    progress: bool = False,
    **hf_sampling,
) -> CounterfactualResult:
    """Hindsight counterfactuals of observed continuations (text cfgen did not sample).

    For each prompt and its observed continuation, draw the Gumbel noise from its
    exact posterior given the observed tokens under the factual model, then run
    the intervened model with that noise. ``num_samples`` posterior draws give a
    distribution of counterfactuals for one observed text.

    Args:
        observed: continuation strings (tokenized once, without special tokens;
            a warning says when decoding them does not give the string back) or
            token-id lists, one per prompt.
        num_samples: posterior draws per observed continuation (seeds ``seed + j``).
        max_new_tokens: defaults to each observed continuation's length; beyond the
            observed tokens the noise is drawn from the prior.
        Others: as for :func:`cfgen.generate`.

    Raises:
        cfgen.ImpossibleObservation: an observed token lies outside the sampler's
            support (e.g. under top-k / top-p); the message names the prompt.

    Example:
        >>> import cfgen, pyvene as pv, torch
        >>> model, tok = cfgen.load_default_model()
        >>> steer = pv.IntervenableModel({"layer": 10, "component": "block_output",
        ...     "intervention": pv.AdditionIntervention(embed_dim=576, source_representation=torch.zeros(576))},
        ...     model)
        >>> r = cfgen.counterfactual(steer, tok, "The weather today", " is sunny and warm.", num_samples=2)
        >>> r.counterfactual_texts
        [' is sunny and warm.', ' is sunny and warm.']
    """
    models = _resolve_models(model)
    tokenizer = _tokenizer(tokenizer)
    sampler, site_seed = _sampler(sampler, models.counterfactual, hf_sampling)
    seed = site_seed if seed is None else seed
    seed = 0 if seed is None else seed
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    prompt_list = _as_list(prompts, "prompts")
    obs_list = _as_list(observed, "observed")
    if len(obs_list) != len(prompt_list):
        raise ValueError(f"{len(obs_list)} observed continuations for {len(prompt_list)} prompts; give one each")
    prompt_ids = _encode(tokenizer, prompt_list, "prompts", special=True)
    obs_ids = _encode(tokenizer, obs_list, "observed", special=False)
    for i, (text, ids) in enumerate(zip(obs_list, obs_ids)):
        if isinstance(text, str) and tokenizer.decode(ids) != text:
            warnings.warn(
                f"observed[{i}] does not survive tokenization: decode(encode(s)) = {tokenizer.decode(ids)!r} "
                f"!= {text!r}. cfgen conditions on the token ids; pass token ids to choose them yourself.",
                UserWarning, stacklevel=2,
            )
    _check_ids(_hf_model(models.factual), prompt_ids, "prompts")
    _check_ids(_hf_model(models.factual), obs_ids, "observed")
    max_new = [max_new_tokens or len(o) for o in obs_ids]
    _check_context(_hf_model(models.factual), prompt_ids, max_new)
    base_seeds = _seeds(seed, len(prompt_ids))
    pad_id = _pad_id(tokenizer)
    logits = _teacher_forced_logits(_hf_model(models.factual), prompt_ids, obs_ids, pad_id)
    vocab = _vocab_size(_hf_model(models.factual))

    pairs = [(p, j) for p in range(len(prompt_ids)) for j in range(num_samples)]
    posts = {}
    for p in range(len(prompt_ids)):
        seeds_p = torch.tensor([[base_seeds[p] + j] for j in range(num_samples)], device=logits[p].device)
        lp = logits[p][:, :vocab].unsqueeze(0).expand(num_samples, -1, -1)
        tok = torch.tensor(obs_ids[p], device=lp.device).expand(num_samples, -1)
        try:
            posts[p] = posterior_noise(lp, tok, sampler=sampler, seed=seeds_p)
        except ImpossibleObservation as err:
            step = err.index[-1]
            raise ImpossibleObservation(
                f"prompt {p}: observed token {err.token} ({tokenizer.decode([err.token])!r}) at step {step} "
                f"cannot be sampled under Sampler({sampler.describe()}). {err}",
                index=(p, step), token=err.token, sampler=sampler,
            ) from None
    kinds = [("counterfactual", PRIOR)] + ([("interventional", INTERVENTIONAL)] if interventional else [])
    rows_prompt, context, seeds, stream, post, mx = [], [], [], [], [], []
    for _, st in kinds:
        for p, j in pairs:
            rows_prompt.append(p)
            context.append(prompt_ids[p])
            seeds.append(base_seeds[p] + j)
            stream.append(st)
            post.append(posts[p][j] if st == PRIOR else None)
            mx.append(max_new[p])
    rows = Rows(context=context, prompt_len=[len(c) for c in context], seed=seeds, max_new=mx, stream=stream,
                intervene=[True] * len(context), posterior=post)
    tokens, reasons, schedule = _decode_rows(
        models, tokenizer, rows, rows_prompt, prompt_ids, sampler=sampler, eos_token_id=eos_token_id,
        stop_strings=stop_strings, progress=progress, sources=sources, unit_locations=unit_locations,
        source_representations=source_representations, subspaces=subspaces, intervene_on=intervene_on)
    n = len(pairs)
    return CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(p) for p in prompt_list],
        prompt_ids=prompt_ids,
        factual_ids=[obs_ids[p] for p, _ in pairs],
        counterfactual_ids=tokens[:n],
        interventional_ids=tokens[n:] if interventional else None,
        seeds=seeds[:n],
        sampler=sampler,
        mode="hindsight",
        prompt_index=[p for p, _ in pairs],
        sample_index=[j for _, j in pairs],
        finish_reasons={name: reasons[i * n:(i + 1) * n] for i, (name, _) in enumerate(kinds)},
        settings={"max_new_tokens": max_new_tokens, "intervene_on": schedule,
                  "interventional_stream": INTERVENTIONAL if interventional else None},
        tokenizer=tokenizer,
    )
