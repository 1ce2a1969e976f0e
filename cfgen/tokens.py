"""Token-level and prompt-level counterfactuals: ``do(y_t = w)`` and prompt edits.

**do(y_t = w)** on a continuation ``y`` (sampled by cfgen, or observed and
explained by hindsight noise): keep ``y_0 .. y_{t-1}``, set ``y_t = w``, and
regenerate ``y_{t+1}, y_{t+2}, ...`` with *the noise of the same generation
steps* — step ``s`` of the regenerated text uses ``U[seed, s]`` exactly as the
factual run did (for a hindsight result, the posterior noise of step ``s``
while ``s`` lies inside the observed text, prior noise after it). Every
difference after ``t`` is therefore caused by the intervention on ``y_t``.

Several interventions ``{t1: w1, t2: w2, ...}`` (``t1 < t2``) act jointly:
regeneration starts after the earliest step ``t1``; the tokens between the
interventions are regenerated with the same noise; at ``t2`` the token is forced
to ``w2`` whatever the regenerated text would have sampled there; and so on. A
list of tokens ``{t: [a, b]}`` forces consecutive steps (``y_t = a``,
``y_{t+1} = b``). If the regenerated text ends (EOS or a stop string) before a
later intervention step, that intervention cannot apply: it is listed in
``result.settings["skipped_interventions"]`` and a warning says so.

**Prompt counterfactuals** (:func:`edit_prompt`): the factual text continues
the original prompt, the counterfactual text continues the edited prompt, both
with the noise of the same generation steps (step 0 = the first new token).

**Interventional baselines** (``interventional=True``): the same intervention
with *fresh* noise after the intervention point (noise stream
``cfgen.api.INTERVENTIONAL``), to compare counterfactual with interventional
variation.

The model argument of every function here is a plain Hugging Face causal LM
(the regeneration uses it as is), a ``pyvene.IntervenableModel`` or a
``(factual_model, counterfactual_model)`` pair: the regenerated rows then run
the intervened model, so a token or prompt intervention combines with an
activation intervention (pass ``sources`` / ``unit_locations`` /
``source_representations`` / ``subspaces`` / ``intervene_on`` as for
:func:`cfgen.generate`; positions count from the prompt's first token). Tokens
before the intervention step are *held* at their factual values in that case
(they are part of the intervention), even where the activation intervention
would have changed them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import engine as E
from .engine import INTERVENTIONAL
from .noise import ALTERNATIVE, PRIOR, gumbel_noise
from .posterior import posterior_noise
from .results import CounterfactualResult
from .sampler import Sampler

__all__ = ["Alternative", "do", "edit_prompt", "sample"]

Prompt = Union[str, Sequence[int]]
TokenSpec = Union[int, str, "Alternative", Sequence[Union[int, str]]]


@dataclass(frozen=True)
class Alternative:
    """Intervention value: an alternative to the factual token, sampled as Chatzi et al. do.

    At step ``t`` the alternative is drawn from the model's next-token
    distribution at that step of the *factual* text (temperature 1, no top-k),
    restricted to its top-p set (``top_p``, default 0.9) minus the factual token
    ``y_t`` and renormalised. If the factual token alone fills the top-p set, the
    top-p set of the distribution conditioned on ``v != y_t`` is used instead.
    The draw is Gumbel-max with noise ``gumbel_noise(seed, t, V,
    stream=cfgen.noise.ALTERNATIVE)``: reproducible from the row's seed, and it
    never touches torch's global RNG.

    Example:
        >>> import cfgen.tokens
        >>> cfgen.tokens.Alternative()
        Alternative(top_p=0.9)
    """

    top_p: float = 0.9

    def __post_init__(self) -> None:
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"Alternative(top_p=...) must be in (0, 1], got {p!r}")


# ------------------------------------------------------------------ helpers --
def _models(model) -> tuple[E.Models, bool]:
    """(models, intervene flag): a plain HF model regenerates with itself, un-intervened."""
    if isinstance(model, (tuple, list)) or E.is_intervenable(model):
        m = E.resolve_models(model)
        return E.Models(m.factual, m.counterfactual, shared=False), True
    if not hasattr(model, "config") or not callable(model):
        raise TypeError(
            f"model must be a Hugging Face causal LM, a pyvene.IntervenableModel or a (factual_model, "
            f"counterfactual_model) pair, got {type(model).__name__}"
        )
    return E.Models(model, model, shared=False), False


def _default_sampler(sampler, model) -> Sampler:
    if sampler is None and not (isinstance(model, (tuple, list)) or E.is_intervenable(model)):
        return Sampler()
    target = model[1] if isinstance(model, (tuple, list)) else model
    return E.resolve_sampler(sampler, target, {})[0]


def _token_id(tokenizer, w, step: int, vocab: int) -> int:
    if isinstance(w, bool):
        raise TypeError(f"the token for step {step} is a bool; give a token id, a one-token string or Alternative()")
    if isinstance(w, int):
        if not 0 <= w < vocab:
            raise ValueError(f"token id {w} for step {step} is outside the model's vocabulary [0, {vocab})")
        return w
    if isinstance(w, str):
        if not w:
            raise ValueError(f"the token for step {step} is an empty string; give a one-token string")
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"{w!r} (for step {step}) tokenizes to {len(ids)} tokens {ids} = {pieces}, not one. "
                "Give a string that is a single token (mind the leading space: ' Maeve' and 'Maeve' differ), "
                f"a token id, or a list of tokens to force consecutive steps, e.g. {{{step}: {ids}}}"
            )
        if not 0 <= ids[0] < vocab:
            raise ValueError(f"{w!r} encodes to token id {ids[0]}, outside the model's vocabulary [0, {vocab})")
        return int(ids[0])
    raise TypeError(
        f"the token for step {step} must be a token id, a one-token string, a list of them, or "
        f"cfgen.tokens.Alternative(); got {type(w).__name__}"
    )


def _expand(interventions, what: str) -> dict[int, Any]:
    """{t: w or [w0, w1, ...]} -> {step: single spec}."""
    if not isinstance(interventions, Mapping) or not interventions:
        raise TypeError(f"{what} must be a non-empty dict {{step: token}}, e.g. {{5: ' Maeve'}}; got {interventions!r}")
    out: dict[int, Any] = {}
    for t, w in interventions.items():
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"intervention steps must be ints (generation steps from 0), got {t!r}")
        if t < 0:
            raise ValueError(
                f"step {t} is negative: steps count generated tokens from 0 (the first token after the prompt)"
            )
        ws = list(w) if isinstance(w, (list, tuple)) else [w]
        if not ws:
            raise ValueError(f"the token list for step {t} is empty")
        for k, x in enumerate(ws):
            if t + k in out:
                raise ValueError(f"step {t + k} is given two tokens; each step can be set once")
            out[t + k] = x
    return out


def _alternative(logits: torch.Tensor, factual: Sequence[int], alt: Alternative, seed: int, step: int) -> int:
    z = logits.float()
    logp = torch.log_softmax(z, -1)
    nucleus = Sampler(top_p=alt.top_p)
    keep = torch.isfinite(nucleus.log_probs(z))
    excluded = torch.zeros_like(keep)
    excluded[list(factual)] = True
    keep &= ~excluded
    if not bool(keep.any()):
        rest = logp.masked_fill(excluded, float("-inf"))
        if not bool(torch.isfinite(rest).any()):
            raise ValueError(f"step {step}: no token other than the factual one has positive probability")
        keep = torch.isfinite(nucleus.log_probs(rest))
    scores = logp.masked_fill(~keep, float("-inf")) + gumbel_noise(seed, step, z.shape[-1], stream=ALTERNATIVE,
                                                                   device=z.device)[0]
    return int(scores.argmax())


def _budget(result: CounterfactualResult, r: int, max_new_tokens: Optional[int]) -> int:
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        return max_new_tokens
    m = (result.settings or {}).get("max_new_tokens")
    return max(int(m or 0), len(result.factual_ids[r]))


def _segments(models, tokenizer, sampler, states, prompt_ids, *, intervene, intervention, eos, stop, progress):
    """Decode every state's row until its next forced step (or its end), forcing tokens in between.

    A state: prompt, seq (continuation so far), pos (next step), forced {step: token}, budget, seed,
    stream, posterior (Tensor [T, V] by absolute step, or None), done, reason, skipped.
    """
    eos_set = set(eos)
    while True:
        for s in states:
            while not s["done"] and s["pos"] in s["forced"]:
                tok = s["forced"][s["pos"]]
                s["applied"].add(s["pos"])
                if tok in eos_set:
                    s["done"], s["reason"] = True, "eos"
                    break
                s["seq"].append(tok)
                s["pos"] += 1
                if s["pos"] >= s["budget"]:
                    s["done"], s["reason"] = True, "length"
        live = [s for s in states if not s["done"]]
        if not live:
            break
        ctx, plen, seeds, mx, off, streams, post, rows_prompt = [], [], [], [], [], [], [], []
        for s in live:
            later = [t for t in s["forced"] if t > s["pos"]]
            end = min(later) if later else s["budget"]
            ctx.append(s["prompt"] + s["seq"])
            plen.append(len(s["prompt"]))
            seeds.append(s["seed"])
            mx.append(end - s["pos"])
            off.append(s["pos"])
            streams.append(s["stream"])
            p = s["posterior"]
            post.append(p[s["pos"]:] if p is not None and s["pos"] < p.shape[0] else None)
            rows_prompt.append(s["prompt_index"])
        rows = E.Rows(context=ctx, prompt_len=plen, seed=seeds, max_new=mx, step_offset=off, stream=streams,
                    intervene=[intervene] * len(live), posterior=post)
        tokens, reasons, _ = E.run(models, tokenizer, rows, rows_prompt, prompt_ids, sampler=sampler,
                                   intervention=intervention, eos=eos, stop=stop, progress=progress)
        for s, new, why, m in zip(live, tokens, reasons, mx):
            s["seq"].extend(new)
            s["pos"] += len(new)
            if why != "length":
                s["done"], s["reason"] = True, why
            elif s["pos"] >= s["budget"] or len(new) < m:
                s["done"], s["reason"] = True, "length"
    for s in states:
        s["skipped"] = sorted(set(s["forced"]) - s["applied"])


# --------------------------------------------------------------------- API --
def do(
    model,
    tokenizer,
    result: CounterfactualResult,
    interventions: Union[Mapping[int, TokenSpec], Sequence[Mapping[int, TokenSpec]]],
    *,
    row: Union[int, Sequence[int], None] = None,
    sampler: Optional[Sampler] = None,
    max_new_tokens: Optional[int] = None,
    interventional: bool = False,
    sources=None,
    unit_locations=None,
    source_representations=None,
    subspaces=None,
    intervene_on: Union[str, Sequence[int], None] = None,
    stop_strings: Union[str, Sequence[str], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    progress: bool = False,
) -> CounterfactualResult:
    """Token-level counterfactuals: ``do(y_t = w)`` on the factual continuations of a result.

    Keeps the tokens before ``t``, sets token ``t`` to ``w`` and regenerates the
    rest with the noise of the same generation steps (see the module docstring
    for several interventions at once and for hindsight results).

    Args:
        model: the model that produced ``result``'s factual text (a plain HF model),
            or a ``pyvene.IntervenableModel`` / ``(factual, counterfactual)`` pair to
            regenerate under an activation intervention or weight edit as well.
        tokenizer: the tokenizer (one-token strings are encoded with it once).
        result: from :func:`cfgen.generate`, :func:`cfgen.counterfactual` (hindsight:
            the observed text, regenerated with its posterior noise) or :func:`sample`.
        interventions: ``{t: w}`` applied to every selected row, or one dict per
            selected row. ``w`` is a token id, a string that encodes to exactly one
            token, :class:`Alternative` (a sampled alternative to the factual token),
            or a list of those (forcing steps ``t, t+1, ...``).
        row: which rows of ``result`` (an int or a list; default every row).
        sampler: defaults to ``result.sampler`` (the factual text's sampler).
        max_new_tokens: total continuation length (from the prompt); default the
            factual run's ``max_new_tokens`` or the factual length, whichever is larger.
        interventional: also regenerate with fresh noise after the intervention
            point (``result.interventional_ids``).
        sources, unit_locations, source_representations, subspaces, intervene_on:
            pyvene intervention arguments, as for :func:`cfgen.generate`.
        stop_strings: stop a regenerated row when its regenerated tokens contain one.
        eos_token_id: overrides the model's EOS token id(s).
        progress: show a progress bar.

    Returns:
        a :class:`cfgen.CounterfactualResult`, one row per selected row: ``factual_ids``
        the original continuation, ``counterfactual_ids`` the regenerated one (equal
        to the factual before the earliest intervention step), and
        ``settings["intervention_step"]`` the earliest step per row (use it as
        ``start=`` for :mod:`cfgen.metrics`); ``settings["token_interventions"]``
        lists the ``[step, token id]`` pairs actually forced.

    Raises:
        ValueError: a step outside the generated range or past EOS, a string that
            is not exactly one token, a token id outside the vocabulary.

    Example:
        >>> import cfgen, cfgen.tokens, transformers, torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2,
        ...     n_embd=8, initializer_range=0.5)).eval()
        >>> class Tok:
        ...     pad_token_id, eos_token_id = 0, 2
        ...     def __call__(self, s, add_special_tokens=True): return {"input_ids": [3 + ord(c) % 13 for c in s]}
        ...     def decode(self, ids, skip_special_tokens=False): return " ".join(map(str, ids))
        >>> r = cfgen.tokens.sample(lm, Tok(), "abc", max_new_tokens=8, seed=1, eos_token_id=[])
        >>> same = cfgen.tokens.do(lm, Tok(), r, {3: r.factual_ids[0][3]}, eos_token_id=[])
        >>> same.counterfactual_ids == r.factual_ids
        True
        >>> cf = cfgen.tokens.do(lm, Tok(), r, {3: 7}, eos_token_id=[], interventional=True)
        >>> cf.counterfactual_ids[0][:4] == r.factual_ids[0][:3] + [7], cf.settings["intervention_step"]
        (True, [3])
    """
    if not isinstance(result, CounterfactualResult):
        raise TypeError(f"result must be a cfgen.CounterfactualResult, got {type(result).__name__}")
    models, intervene = _models(model)
    tokenizer = E.resolve_tokenizer(tokenizer)
    hf = E.hf_model(models.factual)
    vocab = E.vocab_size(hf)
    sampler = result.sampler if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a cfgen.Sampler, got {type(sampler).__name__}")
    n = len(result)
    if row is None:
        rows = list(range(n))
    elif isinstance(row, int) and not isinstance(row, bool):
        rows = [row]
    else:
        rows = [int(r) for r in row]
    for r in rows:
        if not 0 <= r < n:
            raise IndexError(f"row {r} is out of range: the result has {n} rows (0..{n - 1})")
    if isinstance(interventions, Mapping):
        per_row = [interventions] * len(rows)
    else:
        per_row = list(interventions)
        if len(per_row) != len(rows):
            raise ValueError(f"{len(per_row)} intervention dicts for {len(rows)} selected rows; give one each or "
                             "one dict for all")
    eos = E.eos_ids(tokenizer, hf, eos_token_id)
    hindsight = result.mode == "hindsight"
    fact_reasons = (result.finish_reasons or {}).get("factual")

    # validate and resolve the tokens
    specs, budgets = [], []
    for r, iv in zip(rows, per_row):
        spec = _expand(iv, "interventions")
        fact = result.factual_ids[r]
        budget = _budget(result, r, max_new_tokens)
        ended_eos = (not hindsight) and fact_reasons is not None and fact_reasons[r] == "eos"
        for t in sorted(spec):
            if t >= budget:
                raise ValueError(
                    f"row {r}: step {t} is outside the generated range: the continuation may have at most "
                    f"{budget} tokens (steps 0..{budget - 1}); raise max_new_tokens to intervene later"
                )
            if t > len(fact) or (t == len(fact) and not ended_eos):
                if ended_eos or (fact_reasons is not None and fact_reasons[r] in ("eos", "stop_string")):
                    raise ValueError(
                        f"row {r}: step {t} is past EOS: the factual continuation ended at step {len(fact)} "
                        f"({fact_reasons[r]}), so nothing was generated at step {t}. Intervene at a step "
                        f"< {len(fact)}" + (f" (or at {len(fact)} to replace the EOS token)" if ended_eos else "")
                    )
                raise ValueError(
                    f"row {r}: step {t} is outside the generated range: the factual continuation has {len(fact)} "
                    f"tokens (steps 0..{len(fact) - 1})"
                )
        specs.append(spec)
        budgets.append(budget)

    prompt_ids = result.prompt_ids
    intervention = E.Intervention(sources, unit_locations, source_representations, subspaces, intervene_on)
    if not intervene and intervention.given():
        raise ValueError("sources / unit_locations / source_representations / subspaces / intervene_on need a "
                         "pyvene.IntervenableModel (or a pair whose second model is one)")
    if intervene:
        E.check_intervention(models, tokenizer, prompt_ids, intervention)
    need_logits = hindsight or any(isinstance(w, Alternative) for s in specs for w in s.values())
    logits = {}
    if need_logits:
        pad_id = E.pad_id(tokenizer)
        got = E.teacher_forced_logits(hf, [prompt_ids[result.prompt_index[r]] for r in rows],
                                     [result.factual_ids[r] for r in rows], pad_id)
        logits = {r: lg[:, :vocab] for r, lg in zip(rows, got)}

    forced_rows = []
    for r, spec in zip(rows, specs):
        fact = result.factual_ids[r]
        forced = {}
        for t, w in sorted(spec.items()):
            if isinstance(w, Alternative):
                if t >= len(fact):
                    raise ValueError(f"row {r}: Alternative() at step {t} needs the factual token there, but the "
                                     f"factual continuation has {len(fact)} tokens")
                forced[t] = _alternative(logits[r][t], [fact[t]], w, result.seeds[r], t)
            else:
                forced[t] = _token_id(tokenizer, w, t, vocab)
        forced_rows.append(forced)

    posts: dict[int, Optional[torch.Tensor]] = {r: None for r in rows}
    if hindsight:
        for r in rows:
            obs = result.factual_ids[r]
            tok = torch.tensor([obs], device=logits[r].device)
            seed = torch.tensor([[result.seeds[r]]], device=logits[r].device)
            posts[r] = posterior_noise(logits[r][None], tok, sampler=sampler, seed=seed)[0]

    kinds = [("counterfactual", PRIOR)] + ([("interventional", INTERVENTIONAL)] if interventional else [])
    states = []
    for _, stream in kinds:
        for r, forced, budget in zip(rows, forced_rows, budgets):
            t0 = min(forced)
            p = result.prompt_index[r]
            states.append({"prompt": list(prompt_ids[p]), "prompt_index": p, "seq": list(result.factual_ids[r][:t0]),
                           "pos": t0, "forced": forced, "budget": budget, "seed": result.seeds[r], "stream": stream,
                           "posterior": posts[r] if stream == PRIOR else None, "done": False, "reason": "length",
                           "applied": set()})
    E.check_context(hf, [s["prompt"] for s in states], [s["budget"] for s in states])
    _segments(models, tokenizer, sampler, states, prompt_ids, intervene=intervene, intervention=intervention, eos=eos,
              stop=E.stop_fn(tokenizer, stop_strings), progress=progress)

    m = len(rows)
    skipped = []
    for i, s in enumerate(states[:m]):
        if s["skipped"]:
            skipped.append({"row": i, "steps": s["skipped"]})
            warnings.warn(
                f"row {rows[i]}: the regenerated text ended ({s['reason']}) at step {s['pos']}, before the "
                f"intervention step(s) {s['skipped']}; those were not applied", UserWarning, stacklevel=2)
    return CounterfactualResult(
        prompts=list(result.prompts),
        prompt_ids=[list(p) for p in prompt_ids],
        factual_ids=[list(result.factual_ids[r]) for r in rows],
        counterfactual_ids=[s["seq"] for s in states[:m]],
        interventional_ids=[s["seq"] for s in states[m:]] if interventional else None,
        seeds=[result.seeds[r] for r in rows],
        sampler=sampler,
        mode=result.mode,
        prompt_index=[result.prompt_index[r] for r in rows],
        sample_index=[result.sample_index[r] for r in rows],
        finish_reasons={
            **({"factual": [fact_reasons[r] for r in rows]} if fact_reasons is not None else {}),
            **{name: [s["reason"] for s in states[i * m:(i + 1) * m]] for i, (name, _) in enumerate(kinds)},
        },
        settings={
            "max_new_tokens": max(budgets),
            "source_rows": rows,
            "intervention_step": [min(f) for f in forced_rows],
            "token_interventions": [[[t, w] for t, w in sorted(f.items())] for f in forced_rows],
            "skipped_interventions": skipped,
            "interventional_stream": INTERVENTIONAL if interventional else None,
        },
        tokenizer=tokenizer,
    )


def _prompt_rows(tokenizer, model, prompts, name):
    plist = E.as_list(prompts, name)
    ids = E.encode(tokenizer, plist, name, special=True)
    E.check_ids(model, ids, name)
    return plist, ids


def sample(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    *,
    max_new_tokens: int,
    sampler: Optional[Sampler] = None,
    seed: Union[int, Sequence[int]] = 0,
    num_samples: int = 1,
    stop_strings: Union[str, Sequence[str], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    progress: bool = False,
) -> CounterfactualResult:
    """Factual text only, with explicit noise: the starting point for :func:`do`.

    Samples each prompt's continuation from the factual model (a plain HF model,
    the model wrapped by an IntervenableModel, or the first of a pair) with the
    prior noise ``U[seed, step]`` (sample ``j`` of a prompt uses ``seed + j``), the
    same text :func:`cfgen.generate` gives as its factual text. The result's
    counterfactual equals its factual text.

    Example:
        >>> import cfgen.tokens, transformers, torch
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2,
        ...     n_embd=8)).eval()
        >>> class Tok:
        ...     pad_token_id, eos_token_id = 0, 2
        ...     def __call__(self, s, add_special_tokens=True): return {"input_ids": [3 + ord(c) % 13 for c in s]}
        ...     def decode(self, ids, skip_special_tokens=False): return " ".join(map(str, ids))
        >>> r = cfgen.tokens.sample(lm, Tok(), ["ab", "abcd"], max_new_tokens=5, seed=3, eos_token_id=[])
        >>> [len(t) for t in r.factual_ids], all(r.identical)
        ([5, 5], True)
    """
    models, _ = _models(model)
    tokenizer = E.resolve_tokenizer(tokenizer)
    hf = E.hf_model(models.factual)
    sampler = _default_sampler(sampler, model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    plist, pids = _prompt_rows(tokenizer, hf, prompts, "prompts")
    E.check_context(hf, pids, [max_new_tokens] * len(pids))
    base = E.seeds_for(seed, len(pids))
    pairs = [(p, j) for p in range(len(pids)) for j in range(num_samples)]
    rows = E.Rows(context=[pids[p] for p, _ in pairs], prompt_len=[len(pids[p]) for p, _ in pairs],
                seed=[base[p] + j for p, j in pairs], max_new=[max_new_tokens] * len(pairs))
    plain = E.Models(hf, hf, shared=False)
    tokens, reasons, _ = E.run(plain, tokenizer, rows, [p for p, _ in pairs], pids, sampler=sampler,
                               intervention=E.Intervention(), eos=E.eos_ids(tokenizer, hf, eos_token_id),
                               stop=E.stop_fn(tokenizer, stop_strings), progress=progress)
    return CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(p) for p in plist], prompt_ids=pids,
        factual_ids=tokens, counterfactual_ids=[list(t) for t in tokens], seeds=list(rows.seed), sampler=sampler,
        mode="prior", prompt_index=[p for p, _ in pairs], sample_index=[j for _, j in pairs],
        finish_reasons={"factual": reasons, "counterfactual": list(reasons)},
        settings={"max_new_tokens": max_new_tokens, "intervene_on": None, "interventional_stream": None},
        tokenizer=tokenizer,
    )


def edit_prompt(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    edited_prompts: Union[Prompt, Sequence[Prompt]],
    *,
    max_new_tokens: int,
    seed: Union[int, Sequence[int]] = 0,
    sampler: Optional[Sampler] = None,
    num_samples: int = 1,
    interventional: bool = False,
    sources=None,
    unit_locations=None,
    source_representations=None,
    subspaces=None,
    intervene_on: Union[str, Sequence[int], None] = None,
    stop_strings: Union[str, Sequence[str], None] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
    progress: bool = False,
) -> CounterfactualResult:
    """Prompt counterfactuals: continue the original and the edited prompt with the same noise.

    The factual text continues ``prompts[i]`` under the factual model; the
    counterfactual text continues ``edited_prompts[i]`` (under the intervened
    model when ``model`` is an IntervenableModel or a pair) with the noise of the
    same generation steps: step 0 is the first new token in both, whatever the
    two prompts' lengths. With ``interventional=True`` the edited prompt is also
    continued with fresh noise. ``unit_locations`` count positions in the edited
    prompt.

    Example:
        >>> import cfgen.tokens, transformers, torch
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2,
        ...     n_embd=8)).eval()
        >>> class Tok:
        ...     pad_token_id, eos_token_id = 0, 2
        ...     def __call__(self, s, add_special_tokens=True): return {"input_ids": [3 + ord(c) % 13 for c in s]}
        ...     def decode(self, ids, skip_special_tokens=False): return " ".join(map(str, ids))
        >>> r = cfgen.tokens.edit_prompt(lm, Tok(), "abc", "abc", max_new_tokens=6, seed=2, eos_token_id=[])
        >>> r.identical  # an unchanged prompt gives the factual text back
        [True]
    """
    models, intervene = _models(model)
    tokenizer = E.resolve_tokenizer(tokenizer)
    hf = E.hf_model(models.factual)
    sampler = _default_sampler(sampler, model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    plist, pids = _prompt_rows(tokenizer, hf, prompts, "prompts")
    elist, eids = _prompt_rows(tokenizer, hf, edited_prompts, "edited_prompts")
    if len(eids) != len(pids):
        raise ValueError(f"{len(eids)} edited prompts for {len(pids)} prompts; give one edited prompt per prompt")
    E.check_context(hf, pids + eids, [max_new_tokens] * (2 * len(pids)))
    if not intervene and any(v is not None for v in (sources, unit_locations, source_representations, subspaces,
                                                     intervene_on)):
        raise ValueError("sources / unit_locations / source_representations / subspaces / intervene_on need a "
                         "pyvene.IntervenableModel (or a pair whose second model is one)")
    base = E.seeds_for(seed, len(pids))
    pairs = [(p, j) for p in range(len(pids)) for j in range(num_samples)]
    eos = E.eos_ids(tokenizer, hf, eos_token_id)
    stop = E.stop_fn(tokenizer, stop_strings)

    def run(contexts, rows_prompt, streams, flag, prompt_ids):
        plain = not flag
        rows = E.Rows(context=contexts, prompt_len=[len(c) for c in contexts], seed=[base[p] + j for p, j in pairs]
                    * (len(contexts) // len(pairs)), max_new=[max_new_tokens] * len(contexts), stream=streams,
                    intervene=[flag] * len(contexts))
        intervention = E.Intervention() if plain else E.Intervention(
            sources, unit_locations, source_representations, subspaces, intervene_on)
        tokens, why, schedule = E.run(E.Models(hf, hf, shared=False) if plain else models, tokenizer, rows,
                                      rows_prompt, prompt_ids, sampler=sampler, intervention=intervention, eos=eos,
                                      stop=stop, progress=progress)
        return (tokens, why), schedule

    (fact, fact_why), _ = run([pids[p] for p, _ in pairs], [p for p, _ in pairs], [PRIOR] * len(pairs), False, pids)
    kinds = [PRIOR] + ([INTERVENTIONAL] if interventional else [])
    ctx = [eids[p] for _ in kinds for p, _ in pairs]
    (cf, cf_why), schedule = run(ctx, [p for _ in kinds for p, _ in pairs],
                                 [k for k in kinds for _ in pairs], intervene, eids)
    n = len(pairs)
    return CounterfactualResult(
        prompts=[p if isinstance(p, str) else tokenizer.decode(p) for p in plist], prompt_ids=pids,
        factual_ids=fact, counterfactual_ids=cf[:n], interventional_ids=cf[n:] if interventional else None,
        seeds=[base[p] + j for p, j in pairs], sampler=sampler, mode="prior",
        prompt_index=[p for p, _ in pairs], sample_index=[j for _, j in pairs],
        finish_reasons={"factual": fact_why, "counterfactual": cf_why[:n],
                        **({"interventional": cf_why[n:]} if interventional else {})},
        settings={"max_new_tokens": max_new_tokens, "edited_prompts": [e if isinstance(e, str) else tokenizer.decode(e)
                                                                        for e in elist],
                  "edited_prompt_ids": eids, "intervention_step": [0] * n,
                  "intervene_on": schedule if not isinstance(schedule, list) else list(schedule),
                  "interventional_stream": INTERVENTIONAL if interventional else None},
        tokenizer=tokenizer,
    )
