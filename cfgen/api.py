"""``cfgen.generate`` and ``cfgen.counterfactual``: noise-matched text over pyvene models (front-ends of
:mod:`cfgen.engine`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import checks, provenance
from . import engine as E
from .engine import INTERVENTIONAL
from .noise import PRIOR
from .posterior import ImpossibleObservation, posterior_noise
from .results import CounterfactualResult
from .sampler import Sampler

__all__ = ["generate", "counterfactual", "INTERVENTIONAL"]

Prompt = Union[str, Sequence[int]]


def _collected(collected: dict, kinds: list[str], n: int) -> Optional[dict]:
    """``{kind: [per result row: {key: {"positions", "activations"}}]}`` from the engine's per-row collection."""
    if not collected:
        return None
    return {name: [collected.get(i * n + j, {}) for j in range(n)] for i, name in enumerate(kinds)}


def _check_possible(z: torch.Tensor, tokens: torch.Tensor, sampler: Sampler, seed: int) -> None:
    """Raise ImpossibleObservation (from the posterior, with its explanation) for the first observed token the
    sampler cannot produce: checked before decoding, since each step's posterior is drawn only when decoded."""
    a = sampler.log_probs(z)
    bad = torch.isneginf(a.gather(-1, tokens[:, None])[:, 0]).nonzero()
    if len(bad):
        t = int(bad[0])
        why = f"observed token at step {t} lies outside the support"
        try:
            posterior_noise(z[t:t + 1], tokens[t:t + 1], sampler=sampler,
                            seed=torch.tensor([seed], device=z.device), step=t)
        except ImpossibleObservation as err:  # its message explains the token's rank and probability
            why = str(err)
        raise ImpossibleObservation(why, index=(t,), token=int(tokens[t]), sampler=sampler)


def _named(processing) -> str:
    return ", ".join(d for d in processing.describe() if not d.startswith("Sampler("))


def _budgets(max_new_tokens, limits, prompt_ids: list[list[int]], name: str = "max_new_tokens") -> list[int]:
    """Each prompt's new-token budget: ``max_new_tokens``, else ``max_length`` / a generation config's limit."""
    if max_new_tokens is not None:
        return [checks.positive_int(max_new_tokens, name)] * len(prompt_ids)
    got = [limits.max_new(len(p)) for p in prompt_ids]
    if any(m is None for m in got):
        raise TypeError("give max_new_tokens= (or max_length= / a generation_config with either): how many new "
                        "tokens at most")
    return [checks.positive_int(m, name) for m in got]


def _read_call(model, tokenizer, prompts, sampler, max_new_tokens, num_samples, eos_token_id, hf_sampling):
    """What generate and counterfactual read alike, checked before any model work."""
    models = E.resolve_models(model)
    tokenizer = E.resolve_tokenizer(tokenizer)
    max_new_tokens = checks.positive_int(max_new_tokens, "max_new_tokens", allow_none=True)
    sampler, processing, limits, site_seed = E.resolve_sampling(
        sampler, models.counterfactual, _with_limits(hf_sampling, eos_token_id, max_new_tokens), tokenizer)
    num_samples = checks.positive_int(num_samples, "num_samples")
    given = E.tokenized_prompts(prompts)
    layouts = given[1] if given else None
    prompt_list = given[0] if given else E.as_list(prompts, "prompts")
    return (models, tokenizer, sampler, processing, limits, site_seed, max_new_tokens, num_samples, layouts,
            prompt_list)


def _with_limits(hf_sampling: dict, eos_token_id, max_new_tokens) -> dict:
    """Processors that need the EOS ids or the budget (min_length, forced_eos_token_id, ...) use the call's own."""
    given = {"eos_token_id": eos_token_id, "max_new_tokens": max_new_tokens}
    return {**hf_sampling, **{k: v for k, v in given.items() if v is not None}}


def _eos(tokenizer, models, eos_token_id, limits) -> list[int]:
    if eos_token_id is None and limits.eos_token_ids is not None:
        eos_token_id = list(limits.eos_token_ids)
    return E.eos_ids(tokenizer, E.hf_model(models.factual), eos_token_id)


def _provenance(model, sampler, processing, **pyvene_kwargs) -> dict:
    return provenance.collect(model, sampler=sampler, processors=None if processing.empty else processing,
                              **pyvene_kwargs)


@E.guarded
def generate(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    *,
    max_new_tokens: Optional[int] = None,
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
        prompts: a string, a list of token ids, a chat (a list of ``{"role", "content"}`` messages, put
            through the tokenizer's chat template with the generation prompt), or a list of any of these;
            or tokenized tensors as pyvene users pass them (a dict / ``BatchEncoding`` with ``input_ids``
            and ``attention_mask``, left or right padded): positions in ``unit_locations`` are then in
            those tensors' coordinates, as in pyvene.
        max_new_tokens: the number of new tokens at most; each row stops at its own EOS. May come
            from ``max_length=`` or ``generation_config=`` instead.
        sampler: a :class:`cfgen.Sampler`; or HF ``generate``-style keyword arguments:
            ``temperature=``, ``top_k=``, ``top_p=``, ``do_sample=``, every logits processor and
            warper HF builds from them that is a function of (history, logits) —
            ``repetition_penalty``, ``min_p``, ``typical_p``, ``no_repeat_ngram_size``,
            ``min_new_tokens``, ``bad_words_ids``, ``suppress_tokens``, ``epsilon_cutoff``, ... —,
            ``generation_config=`` and ``logits_processor=`` (see :func:`cfgen.processors.build`).
            Every row applies them to its own history, and sampling is ``argmax(log p~ + U)``
            under the processed distribution ``p~``. Defaults to a ``CounterfactualSampling``
            site in the model's config, else pure sampling at temperature 1.
        seed: an int (every prompt), or one per prompt. Sample ``j`` of a prompt uses ``seed + j``.
            ``None``: the sampling site's seed, else a fresh seed from the OS (recorded in
            ``result.seeds``, so the call can be repeated).
        num_samples: independent (factual, counterfactual) pairs per prompt.
        sources, unit_locations, source_representations, subspaces: as for
            ``IntervenableModel.forward``, with pyvene's meaning (``{"sources->base": [3, 9]}`` is source
            position 3 -> base position 9); positions count from each prompt's first token (cfgen
            shifts them for left padding; head indices never shift). See docs/architecture.md.
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
        a :class:`cfgen.CounterfactualResult`. With ``pyvene.CollectIntervention`` s in the model,
        ``result.collected[kind][row][key]`` (``kind`` ``"factual"``, ``"counterfactual"``,
        ``"interventional"``) holds ``{"positions": [...], "activations": Tensor}``: what each row's
        forward computed there (positions count from the prompt's first token); otherwise None.

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
    (models, tokenizer, sampler, processing, limits, site_seed, max_new_tokens, num_samples, layouts,
     prompt_list) = _read_call(model, tokenizer, prompts, sampler, max_new_tokens, num_samples, eos_token_id,
                               hf_sampling)
    prompt_ids = E.encode(tokenizer, prompt_list, "prompts", special=True)
    budgets = _budgets(max_new_tokens, limits, prompt_ids)
    E.check_ids(E.hf_model(models.factual), prompt_ids, "prompts")
    E.check_context(E.hf_model(models.factual), prompt_ids, budgets)
    base_seeds = E.resolve_seed(seed, site_seed, len(prompt_ids), span=num_samples)

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
    rows = E.Rows(context=context, prompt_len=[len(c) for c in context], seed=seeds,
                  max_new=[budgets[p] for p in rows_prompt], stream=stream, intervene=intervene,
                  layout=[layouts[p] for p in rows_prompt] if layouts else [])
    collected: dict = {}
    tokens, reasons, schedule = E.run(
        models, tokenizer, rows, rows_prompt, prompt_ids, sampler=sampler,
        intervention=E.Intervention(sources, unit_locations, source_representations, subspaces, intervene_on),
        eos=_eos(tokenizer, models, eos_token_id, limits),
        stop=E.stop_fn(tokenizer, stop_strings), progress=progress, collected=collected, processing=processing)
    n = len(pairs)
    result = CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(prompt_list, prompt_ids)],
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
                  "interventional_stream": INTERVENTIONAL if interventional else None,
                  **({"processors": provenance.jsonable(processing.settings)} if not processing.empty else {})},
        tokenizer=tokenizer,
        provenance=_provenance(model, sampler, processing, sources=sources, unit_locations=unit_locations,
                               source_representations=source_representations, subspaces=subspaces,
                               intervene_on=intervene_on),
    )
    result.collected = _collected(collected, [name for name, _, _ in kinds], n)
    return result


@E.guarded
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
        prompts: as for :func:`cfgen.generate` (tokenized tensors included; the factual logits are
            computed on each prompt's real tokens).
        observed: continuation strings (tokenized once, without special tokens;
            a warning says when decoding them does not give the string back) or
            token-id lists, one per prompt.
        num_samples: posterior draws per observed continuation (seeds ``seed + j``).
        max_new_tokens: defaults to each observed continuation's length; beyond the
            observed tokens the noise is drawn from the prior.
        Others: as for :func:`cfgen.generate`. With logits processors the posterior conditions on
            the processed distribution of each observed step (given the observed history).

    Each step's posterior noise is drawn when that step is decoded, from the
    factual logits of that step, so memory does not grow with ``num_samples``
    times the text's length. An observed text that contains EOS ends there as
    the factual text (finish reason ``"eos"``), as a sampled one would.

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
    (models, tokenizer, sampler, processing, limits, site_seed, max_new_tokens, num_samples, layouts,
     prompt_list) = _read_call(model, tokenizer, prompts, sampler, max_new_tokens, num_samples, eos_token_id,
                               hf_sampling)
    obs_list = E.as_list(observed, "observed")
    if len(obs_list) != len(prompt_list):
        raise ValueError(f"{len(obs_list)} observed continuations for {len(prompt_list)} prompts; give one each")
    prompt_ids = E.encode(tokenizer, prompt_list, "prompts", special=True)
    obs_ids = E.encode(tokenizer, obs_list, "observed", special=False)
    for i, (text, ids) in enumerate(zip(obs_list, obs_ids)):
        if isinstance(text, str) and tokenizer.decode(ids) != text:
            warnings.warn(
                f"observed[{i}] does not survive tokenization: decode(encode(s)) = {tokenizer.decode(ids)!r} "
                f"!= {text!r}. cfgen conditions on the token ids; pass token ids to choose them yourself.",
                UserWarning, stacklevel=3,  # the caller of the (guarded) front-end
            )
    E.check_ids(E.hf_model(models.factual), prompt_ids, "prompts")
    E.check_ids(E.hf_model(models.factual), obs_ids, "observed")
    max_new = [max_new_tokens or len(o) for o in obs_ids]
    E.check_context(E.hf_model(models.factual), prompt_ids, max_new)
    base_seeds = E.resolve_seed(seed, site_seed, len(prompt_ids), span=num_samples)
    pad_id = E.pad_id(tokenizer)
    intervention = E.Intervention(sources, unit_locations, source_representations, subspaces, intervene_on)
    E.check_intervention(models, tokenizer, prompt_ids, intervention, len(layouts[0][0]) if layouts else None)
    vocab = E.vocab_size(E.hf_model(models.factual))
    width = max(len(p) + len(o) for p, o in zip(prompt_ids, obs_ids))
    checks.check_memory(2 * len(prompt_ids) * width * vocab * 4, "the factual logits of the observed texts")
    logits = [t[:, :vocab].clone()  # keep only the observed steps, not the whole padded batch's logits
              for t in E.teacher_forced_logits(E.hf_model(models.factual), prompt_ids, obs_ids, pad_id)]

    pairs = [(p, j) for p in range(len(prompt_ids)) for j in range(num_samples)]
    posts = {}
    for p in range(len(prompt_ids)):
        tok = torch.tensor(obs_ids[p], device=logits[p].device)
        post_sampler = sampler
        try:
            if not processing.empty:  # the posterior conditions on the processed distribution
                logits[p] = processing.observe(logits[p], prompt_ids[p], obs_ids[p])
                post_sampler = Sampler()
            _check_possible(logits[p], tok, post_sampler, base_seeds[p])
        except ImpossibleObservation as err:
            step = err.index[-1]
            raise ImpossibleObservation(
                f"prompt {p}: observed token {err.token} ({tokenizer.decode([err.token])!r}) at step {step} "
                f"cannot be sampled under Sampler({sampler.describe()})"
                f"{'' if processing.empty else ' and ' + _named(processing)}. {err}",
                index=(p, step), token=err.token, sampler=sampler,
            ) from None
        posts[p] = E.Hindsight(logits[p], tok, post_sampler)
    kinds = [("counterfactual", PRIOR)] + ([("interventional", INTERVENTIONAL)] if interventional else [])
    rows_prompt, context, seeds, stream, post, mx = [], [], [], [], [], []
    for _, st in kinds:
        for p, j in pairs:
            rows_prompt.append(p)
            context.append(prompt_ids[p])
            seeds.append(base_seeds[p] + j)
            stream.append(st)
            post.append(posts[p] if st == PRIOR else None)
            mx.append(max_new[p])
    rows = E.Rows(context=context, prompt_len=[len(c) for c in context], seed=seeds, max_new=mx, stream=stream,
                  intervene=[True] * len(context), posterior=post,
                  layout=[layouts[p] for p in rows_prompt] if layouts else [])
    collected: dict = {}
    eos = _eos(tokenizer, models, eos_token_id, limits)
    tokens, reasons, schedule = E.run(
        models, tokenizer, rows, rows_prompt, prompt_ids, sampler=sampler,
        intervention=E.Intervention(sources, unit_locations, source_representations, subspaces, intervene_on),
        eos=eos, stop=E.stop_fn(tokenizer, stop_strings), progress=progress, collected=collected,
        processing=processing)
    n = len(pairs)
    # An observed EOS ends the factual text there, as decoding ends a sampled one (the token itself not kept).
    ends = [next((t for t, v in enumerate(o) if v in eos), None) for o in obs_ids]
    factual = [o if e is None else o[:e] for o, e in zip(obs_ids, ends)]
    result = CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in zip(prompt_list, prompt_ids)],
        prompt_ids=prompt_ids,
        factual_ids=[factual[p] for p, _ in pairs],
        counterfactual_ids=tokens[:n],
        interventional_ids=tokens[n:] if interventional else None,
        seeds=seeds[:n],
        sampler=sampler,
        mode="hindsight",
        prompt_index=[p for p, _ in pairs],
        sample_index=[j for _, j in pairs],
        finish_reasons={"factual": ["observed" if ends[p] is None else "eos" for p, _ in pairs],
                        **{name: reasons[i * n:(i + 1) * n] for i, (name, _) in enumerate(kinds)}},
        settings={"max_new_tokens": max_new_tokens, "intervene_on": schedule,
                  "interventional_stream": INTERVENTIONAL if interventional else None,
                  **({"processors": provenance.jsonable(processing.settings)} if not processing.empty else {})},
        tokenizer=tokenizer,
        provenance=_provenance(model, sampler, processing, sources=sources, unit_locations=unit_locations,
                               source_representations=source_representations, subspaces=subspaces,
                               intervene_on=intervene_on),
    )
    result.collected = _collected(collected, [name for name, _ in kinds], n)
    return result
