"""HF ``generate``'s logits processors and warpers inside the Gumbel-max SCM.

Every processor HF ``generate`` builds that is a deterministic function of
(history, logits) — repetition penalty, n-gram bans, bad words, sequence bias,
minimum lengths, forced / suppressed tokens, min-p, typical, epsilon and eta
sampling, a user's own ``LogitsProcessorList`` — turns the model's logits into
a processed distribution ``p~``. Sampling stays Gumbel-max,
``argmax(log p~ + U)``, so noise matching, the exact hindsight posterior
(taken under ``p~``) and token-level interventions carry over unchanged.

Order, as in transformers' ``GenerationMixin._get_logits_processor``:
processors (sequence bias, penalties, bans, minimum lengths, forced and
suppressed tokens, then the user's list) act on the raw logits; then
temperature, top-h, top-k, top-p; then min-p, typical, epsilon, eta; then
``renormalize_logits``. Temperature, top-k and top-p stay cfgen's own
(``cfgen.Sampler``): its warpers are bit-exact on every backend and already
define today's results, and with no other processor nothing changes.

History-dependent processors run once per row on that row's own, unpadded
history (prompt + tokens generated so far), so a row's distribution does not
depend on padding or on which rows share its batch. HF's ``generate`` applies
them to the padded batch instead; the two agree for unpadded batches (and for
``repetition_penalty``, which HF tells to skip left padding) and can differ
for padded ones: ``no_repeat_ngram_size`` and ``bad_words_ids`` / ``sequence_bias``
see pad ids, and ``min_length``, ``min_new_tokens``, ``forced_bos_token_id``,
``forced_eos_token_id``, ``begin_suppress_tokens`` and
``exponential_decay_length_penalty`` count the padded length.

Example:
    >>> import torch, cfgen
    >>> from cfgen.processors import build
    >>> sampler, processing, limits = build(temperature=0.8, no_repeat_ngram_size=2, max_new_tokens=5)
    >>> logits = torch.tensor([[0.0, 3.0, 1.0, 0.5]])
    >>> processing.log_probs(logits, [[1, 2, 1]], [2])[0, 2]   # "1 2" was seen: 2 may not follow 1
    tensor(-inf)
    >>> limits.max_new(prompt_len=3)
    5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .posterior import ImpossibleObservation
from .sampler import Sampler, check_logits

__all__ = ["build", "Processing", "Limits", "SAMPLING", "PROCESSORS", "WARPERS", "LIMITS", "REFUSED"]

SAMPLING = ("do_sample", "temperature", "top_k", "top_p")
PROCESSORS = (
    "sequence_bias", "encoder_repetition_penalty", "repetition_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "renormalize_logits",
)
WARPERS = ("top_h", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
LIMITS = ("max_new_tokens", "max_length", "eos_token_id")
# Token ids and switches that change nothing about the distribution cfgen samples from.
_INERT = {"pad_token_id", "bos_token_id", "transformers_version", "use_cache", "_from_model_config"}

_BEAM = "cfgen samples one sequence per row by Gumbel-max; beam search keeps several hypotheses and ranks them, " \
        "which no exogenous noise per token describes. Sample (do_sample=True) or decode greedily (temperature=0)"
REFUSED = {
    "num_beams": (lambda v: v not in (None, 1), _BEAM),
    "num_beam_groups": (lambda v: v not in (None, 1), _BEAM),
    "diversity_penalty": (lambda v: v not in (None, 0, 0.0), _BEAM),
    "length_penalty": (lambda v: v not in (None, 1, 1.0), _BEAM),
    "early_stopping": (lambda v: v not in (None, False), _BEAM),
    "constraints": (lambda v: v is not None, _BEAM),
    "force_words_ids": (lambda v: v is not None, _BEAM),
    "penalty_alpha": (lambda v: v is not None, "contrastive search picks tokens by a similarity score over "
                      "candidate hidden states, not by sampling: there is no noise to match. Use sampling"),
    "guidance_scale": (lambda v: v not in (None, 1, 1.0), "classifier-free guidance needs a second, unconditional "
                       "model pass per row that cfgen's decode loop does not run. Express the contrast as a pyvene "
                       "intervention or a (factual_model, counterfactual_model) pair instead"),
    "negative_prompt_ids": (lambda v: v is not None, "negative prompts belong to classifier-free guidance "
                            "(guidance_scale), which cfgen does not run"),
    "negative_prompt_attention_mask": (lambda v: v is not None, "negative prompts belong to classifier-free "
                                       "guidance (guidance_scale), which cfgen does not run"),
    "assistant_model": (lambda v: v is not None, "assisted (speculative) decoding accepts or rejects a draft "
                        "model's tokens with its own random draws, so the target model's token is no longer "
                        "argmax(log p~ + U). Drop the assistant: cfgen's factual text is the target model's sample"),
    "prompt_lookup_num_tokens": (lambda v: v is not None, "prompt-lookup decoding is assisted decoding (see "
                                 "assistant_model)"),
    "assistant_early_exit": (lambda v: v is not None, "self-speculative decoding is assisted decoding (see "
                             "assistant_model)"),
    "dola_layers": (lambda v: v is not None, "DoLa contrasts early-exit layers inside generate's own loop; "
                    "compute that contrast as an intervention or a logits processor instead"),
    "streamer": (lambda v: v is not None, "cfgen steps factual, counterfactual and interventional rows together "
                 "and returns them as one result; it has no token stream. Read the result (or pass a progress "
                 "bar to the API) instead"),
    "watermarking_config": (lambda v: v is not None, "a watermark is built by generate from the model's vocabulary "
                            "and device; build it yourself with watermarking_config.construct_processor(vocab_size, "
                            "device) and pass it in logits_processor= (it then runs per row on its own history)"),
    "remove_invalid_values": (lambda v: v not in (None, False), "InfNanRemoveLogitsProcessor turns banned (-inf) "
                              "tokens into finite ones, which would put them back inside the support and give the "
                              "posterior meaningless noise for them; cfgen instead raises on NaN / +inf logits"),
    "prefix_allowed_tokens_fn": (lambda v: v is not None, "its function receives a batch index, and cfgen's batch "
                                 "(factual, counterfactual and interventional rows together) does not line up "
                                 "with your prompts. Write a LogitsProcessor that reads the row's history "
                                 "(input_ids, one row) and pass it in logits_processor="),
    "num_return_sequences": (lambda v: v not in (None, 1), "cfgen draws one sequence per prompt and seed; pass "
                             "several seeds or repeat the prompt for several samples"),
    "stopping_criteria": (lambda v: v is not None and len(v) > 0, "cfgen's decode loop stops at eos, at "
                          "max_new_tokens / max_length and at the API's stop strings; a StoppingCriteria object "
                          "is not run there"),
    "synced_gpus": (lambda v: v not in (None, False), "cfgen decodes on one device per call"),
    "custom_generate": (lambda v: v is not None, "cfgen runs its own decode loop, not a custom generate function"),
}
ACCEPTED = SAMPLING + PROCESSORS + WARPERS + LIMITS


@dataclass(frozen=True)
class Limits:
    """How long to generate and where to stop, as HF reads them from ``generate``'s arguments.

    ``max_new_tokens`` wins when set (HF gives it precedence too); otherwise
    ``max_length`` counts the prompt. ``eos_token_ids``: the ids that end a row, from
    ``eos_token_id`` (argument or config), else the tokenizer passed to :func:`build`;
    ``None`` when neither gave one (the caller then uses its own default).

    Example:
        >>> from cfgen.processors import Limits
        >>> Limits(max_length=10).max_new(prompt_len=4)
        6
    """

    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None
    eos_token_ids: Optional[tuple[int, ...]] = None

    def max_new(self, prompt_len: int) -> Optional[int]:
        """New tokens allowed after a prompt of ``prompt_len`` tokens; ``None`` if no limit was given."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is None:
            return None
        if prompt_len >= self.max_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no room after a prompt of {prompt_len} tokens; "
                "raise max_length or pass max_new_tokens"
            )
        return self.max_length - prompt_len


@dataclass(frozen=True, eq=False)
class _Stage:
    """One step of the chain: an HF processor (built per prompt where it must be) or cfgen's Sampler."""

    name: str
    kind: str  # "rows": reads the history; "batch": history-free; "sampler": cfgen's warpers
    make: Callable[[list[int], Any], Any]  # (prompt, device) -> LogitsProcessor
    key: Callable[[list[int]], Any] = lambda prompt: ()  # what of the prompt the processor depends on
    sampler: Optional[Sampler] = None
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def processor(self, prompt: list[int], device) -> Any:
        k = (str(device), self.key(prompt))
        if k not in self.cache:
            self.cache[k] = self.make(prompt, device)
        return self.cache[k]


@dataclass(frozen=True, eq=False)
class Processing:
    """The processed distribution ``p~``: processors, cfgen's sampler, warpers, in HF's order.

    Build it with :func:`build`. With no processor (``empty``) every method equals
    the sampler's own (``log_probs``, ``sample``) bit for bit, and callers may keep
    using the sampler directly.

    ``histories[r]`` is row ``r``'s whole unpadded token history (prompt + generated
    so far) and ``prompt_lens[r]`` its prompt length; rows with equal histories are
    processed together, which changes no value.

    Example:
        >>> import torch, cfgen
        >>> from cfgen.processors import build
        >>> _, proc, _ = build(repetition_penalty=2.0)
        >>> proc.support_logits(torch.tensor([[1.0, 2.0, 0.0]]), [[1, 0]], [1])
        tensor([[0.5000, 1.0000, 0.0000]])
    """

    sampler: Sampler = Sampler()
    stages: tuple[_Stage, ...] = ()
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def empty(self) -> bool:
        """True when only the sampler acts: ``log_probs`` / ``sample`` are the sampler's."""
        return all(s.kind == "sampler" for s in self.stages)

    def describe(self) -> list[str]:
        """The chain in order, e.g. ``['RepetitionPenaltyLogitsProcessor(penalty=1.3)', 'Sampler(...)']``."""
        return [s.name for s in self.stages]

    def support_logits(self, logits: torch.Tensor, histories: Sequence[Sequence[int]],
                       prompt_lens: Sequence[int]) -> torch.Tensor:
        """Processed float32 logits ``[R, V]``, ``-inf`` outside the support (``log p~`` up to a constant).

        ``Sampler().log_probs`` of these is :meth:`log_probs`, and
        ``cfgen.posterior_noise(..., sampler=cfgen.Sampler())`` of them is the exact
        posterior under ``p~``.
        """
        z, _ = self._run(logits, histories, prompt_lens, None)
        return z

    def log_probs(self, logits: torch.Tensor, histories: Sequence[Sequence[int]],
                  prompt_lens: Sequence[int]) -> torch.Tensor:
        """``log p~`` ``[R, V]`` (float32, ``-inf`` outside the support).

        Example:
            >>> import torch
            >>> from cfgen.processors import build
            >>> _, proc, _ = build(suppress_tokens=[1])
            >>> proc.log_probs(torch.zeros(1, 3), [[0]], [1]).exp()
            tensor([[0.5000, 0.0000, 0.5000]])
        """
        if self.empty:
            return self.sampler.log_probs(logits)
        return _UNIT.log_probs(self.support_logits(logits, histories, prompt_lens))

    def sample(self, logits: torch.Tensor, noise: torch.Tensor, histories: Sequence[Sequence[int]],
               prompt_lens: Sequence[int]) -> torch.Tensor:
        """``argmax(log p~ + noise)`` per row (int64 ``[R]``).

        Example:
            >>> import torch, cfgen
            >>> from cfgen.processors import build
            >>> _, proc, _ = build(bad_words_ids=[[2]])
            >>> proc.sample(torch.tensor([[0.0, 0.0, 9.0]]), cfgen.gumbel_noise(0, 0, 3), [[1]], [1]).tolist()
            [1]
        """
        if self.empty:
            return self.sampler.sample(logits, noise)
        if noise.shape != logits.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal logits shape {tuple(logits.shape)}")
        return (self.log_probs(logits, histories, prompt_lens) + noise.to(torch.float32)).argmax(-1)

    def observe(self, logits: torch.Tensor, prompt: Sequence[int], observed: Sequence[int]) -> torch.Tensor:
        """Processed logits ``[T, V]`` for a teacher-forced observed continuation.

        Row ``t`` is processed with history ``prompt + observed[:t]``; ``logits[t]``
        must be the model's logits that predict ``observed[t]``. Then
        ``cfgen.posterior_noise(processing.observe(logits, prompt, observed), observed,
        sampler=cfgen.Sampler(), ...)`` is the exact posterior under ``p~``, and
        ``processing.sample`` with that noise reproduces ``observed``.

        Raises:
            ImpossibleObservation: an observed token is banned at some step; the
                message names the first such step and the processor that banned it
                (attribute ``processor``).

        Example:
            >>> import torch, cfgen
            >>> from cfgen.processors import build
            >>> _, proc, _ = build(no_repeat_ngram_size=1)
            >>> proc.observe(torch.zeros(2, 3), [0], [1, 2]).tolist()
            [[-inf, 0.0, 0.0], [-inf, -inf, 0.0]]
        """
        observed = [int(t) for t in observed]
        prompt = [int(t) for t in prompt]
        if logits.dim() != 2 or logits.shape[0] != len(observed):
            raise ValueError(f"logits {tuple(logits.shape)} must be [T, V] with T = {len(observed)} observed tokens")
        if not prompt:
            raise ValueError("prompt is empty: processors need the row's history, give at least one prompt token")
        vocab = logits.shape[-1]
        bad = [t for t in observed if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"observed token id {bad[0]} is outside the vocabulary [0, {vocab})")
        histories = [prompt + observed[:t] for t in range(len(observed))]
        z, killed = self._run(logits, histories, [len(prompt)] * len(observed), observed)
        if killed:
            t = min(killed)
            name = killed[t]
            what = (f"is outside the support of {name}" if name.startswith("Sampler(")
                    else f"is banned by {name}" if name != "the model" else "has -inf logit from the model")
            err = ImpossibleObservation(
                f"observed token {observed[t]} at step {t} {what}: no noise explains it under these settings. "
                "Remove or loosen that processor, or check the observed tokens.",
                index=(t,), token=observed[t], sampler=self.sampler,
            )
            err.processor = name
            raise err
        return z

    def _run(self, logits, histories, prompt_lens, observed) -> tuple[torch.Tensor, dict[int, str]]:
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"logits must be a [rows, vocab] tensor, got {getattr(logits, 'shape', type(logits))}")
        if len(histories) != logits.shape[0] or len(prompt_lens) != logits.shape[0]:
            raise ValueError(
                f"{logits.shape[0]} rows of logits need as many histories and prompt_lens, got "
                f"{len(histories)} and {len(prompt_lens)}"
            )
        check_logits(logits)
        z = logits.to(torch.float32)
        device = z.device
        groups = _groups(histories, prompt_lens, device)
        killed: dict[int, str] = {}
        y = alive = None
        if observed is not None:
            y = torch.tensor(observed, device=device)[:, None]
            alive = torch.isfinite(z.gather(1, y))[:, 0]
            killed.update({int(t): "the model" for t in (~alive).nonzero()[:, 0]})
        for stage in self.stages:
            if stage.kind == "sampler":
                z = stage.sampler.support_logits(z)
            elif stage.kind == "batch":
                out = stage.processor([], device)(_NO_IDS.to(device).expand(z.shape[0], 0), z)
                z = out.to(torch.float32)
            else:
                out = torch.empty_like(z)
                for rows, hist, prompt in groups:
                    proc = stage.processor(prompt, device)
                    out[rows] = proc(hist[None].expand(len(rows), -1), z[rows]).to(torch.float32)
                z = out
            _check(z, stage.name, histories)
            if alive is not None:
                now = torch.isfinite(z.gather(1, y))[:, 0]
                killed.update({int(t): stage.name for t in (alive & ~now).nonzero()[:, 0]})
                alive = now
        return z, killed


_UNIT = Sampler()
_NO_IDS = torch.zeros(1, 0, dtype=torch.long)


def _groups(histories, prompt_lens, device) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Rows with the same (history, prompt length): one processor call each, on the shared history."""
    index: dict[tuple, list[int]] = {}
    for r, (h, p) in enumerate(zip(histories, prompt_lens)):
        index.setdefault((tuple(int(t) for t in h), int(p)), []).append(r)
    out = []
    for (h, p), rows in index.items():
        if not h:
            raise ValueError(f"row {rows[0]} has an empty history: processors need at least one prompt token")
        if not 0 < p <= len(h):
            raise ValueError(f"row {rows[0]}: prompt length {p} must be in [1, {len(h)}] (its history's length)")
        out.append((torch.tensor(rows, device=device), torch.tensor(h, dtype=torch.long, device=device), list(h[:p])))
    return out


def _check(z: torch.Tensor, name: str, histories=None) -> None:
    top = z.amax(dim=-1)
    if bool((top == float("-inf")).any()):
        r = int((top == float("-inf")).nonzero()[0, 0])
        hist = f" (history {list(histories[r])[-8:]} at its end)" if histories is not None else ""
        raise ValueError(
            f"after {name}, row {r} has no token left to sample{hist}: the processors ban every token. "
            "Loosen them (e.g. fewer bad_words_ids / suppress_tokens, a smaller no_repeat_ngram_size)."
        )
    if bool((torch.isnan(top) | (top == float("inf"))).any()):
        r = int((torch.isnan(top) | (top == float("inf"))).nonzero()[0, 0])
        raise ValueError(f"after {name}, row {r} has NaN or +inf logits: that processor produced invalid values")


# ------------------------------------------------------------------ build --
def build(
    *,
    sampler: Optional[Sampler] = None,
    generation_config=None,
    logits_processor=None,
    tokenizer=None,
    default_sampler: Sampler = Sampler(),
    **hf_kwargs: Any,
) -> tuple[Sampler, Processing, Limits]:
    """Read HF ``generate``-style settings into cfgen's sampler, processors and limits.

    Args:
        sampler: a :class:`cfgen.Sampler` (then no temperature / top_k / top_p / do_sample).
        generation_config: a ``transformers.GenerationConfig``. Its unset fields take
            HF ``generate``'s defaults (greedy unless ``do_sample=True``; ``top_k=50``),
            as ``model.generate(generation_config=...)`` does; keyword arguments override it.
            The model's own ``generation_config`` is not consulted: pass it here to use it.
        logits_processor: a user ``LogitsProcessorList`` (or list). Each processor is
            called once per row with that row's unpadded history as ``input_ids`` ``[1, L]``
            (or several equal rows), after HF's own processors and before the warpers,
            replacing a built-in one of the same class in place (as HF merges them). It
            must be a deterministic function of (input_ids, scores).
        tokenizer: gives ``eos_token_id`` when a processor needs one and none is given.
        default_sampler: the sampler when neither ``sampler=`` nor a sampling argument
            is given (e.g. the model's ``CounterfactualSampling`` site).
        **hf_kwargs: keyword arguments of HF ``generate``. Sampling (as cfgen reads them
            today: unset ``top_k`` means no top-k, ``do_sample=False`` means greedy):
            {SAMPLING}. Processors: {PROCESSORS}. Warpers (sampling only): {WARPERS}.
            Limits: {LIMITS}.

    Returns:
        ``(sampler, processing, limits)``: the resolved sampler, the :class:`Processing`
        chain (``processing.empty`` when nothing but the sampler acts), and :class:`Limits`.

    Raises:
        TypeError: an unknown argument (the message lists the accepted ones), or
            ``sampler=`` together with sampling arguments.
        ValueError: an argument that breaks the SCM (beam search, assisted decoding,
            contrastive search, guidance, streaming, ...), with the reason and what to
            use instead; or a bad value.

    Example:
        >>> from cfgen.processors import build
        >>> sampler, proc, limits = build(temperature=0.7, min_p=0.05, repetition_penalty=1.2, max_new_tokens=8)
        >>> sampler, proc.describe()[-1], limits.max_new_tokens
        (Sampler(temperature=0.7, top_k=None, top_p=None), 'MinPLogitsWarper(min_p=0.05)', 8)
    """
    settings = _merge(generation_config, hf_kwargs, logits_processor)
    from_config = generation_config is not None
    sampler = _resolve_sampler(sampler, settings, hf_kwargs, from_config, default_sampler)
    eos = _eos(settings, tokenizer)
    limits = _limits(settings, hf_kwargs, eos)
    stages = _stages(settings, sampler, list(logits_processor or []), eos, limits)
    recorded = {k: v for k, v in settings.items() if k not in SAMPLING and k not in _INERT}
    if logits_processor:
        recorded["logits_processor"] = [type(p).__name__ for p in logits_processor]
    return sampler, Processing(sampler, stages, recorded), limits


build.__doc__ = build.__doc__.format(SAMPLING=", ".join(SAMPLING), PROCESSORS=", ".join(PROCESSORS),
                                     WARPERS=", ".join(WARPERS), LIMITS=", ".join(LIMITS))


def _merge(generation_config, hf_kwargs: dict, logits_processor) -> dict:
    for name, value in hf_kwargs.items():
        if name in REFUSED:
            _refuse(name, value)
    unknown = sorted(set(hf_kwargs) - set(ACCEPTED) - set(REFUSED))
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}. Accepted HF generate arguments: sampling {list(SAMPLING)}; "
            f"processors {list(PROCESSORS)}; warpers {list(WARPERS)}; limits {list(LIMITS)}; plus "
            "generation_config= and logits_processor=."
        )
    if logits_processor is not None:
        import transformers

        for p in logits_processor:
            if not callable(p):
                raise TypeError(f"logits_processor entries must be callables (input_ids, scores) -> scores, got {p!r}")
            if isinstance(p, transformers.generation.logits_process.InfNanRemoveLogitsProcessor):
                _refuse("remove_invalid_values", True)
    settings: dict = {}
    if generation_config is not None:
        import transformers

        if not isinstance(generation_config, transformers.GenerationConfig):
            raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        for name, value in generation_config.to_diff_dict().items():
            if name in _INERT or value is None:
                continue
            if name in REFUSED:
                _refuse(name, value, "generation_config.")
            elif name in ACCEPTED:
                settings[name] = value
            elif name.startswith("output_") or name == "return_dict_in_generate":
                continue  # what generate returns, not what it samples: cfgen returns its own result object
            else:
                raise ValueError(
                    f"generation_config.{name}={value!r} is not supported by cfgen. Supported fields: "
                    f"{list(ACCEPTED)}; refused (they break the Gumbel-max SCM): {sorted(REFUSED)}."
                )
    settings.update(hf_kwargs)
    return {k: v for k, v in settings.items() if k not in REFUSED}  # what is left of those is neutral


def _refuse(name: str, value, prefix: str = "") -> None:
    applies, why = REFUSED[name]
    if applies(value):
        raise ValueError(f"{prefix}{name}={value!r} is not supported by cfgen: {why}.")


def _resolve_sampler(sampler, settings, hf_kwargs, from_config, default_sampler) -> Sampler:
    given = [k for k in SAMPLING if k in hf_kwargs]
    if sampler is not None:
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a cfgen.Sampler, got {type(sampler).__name__}")
        if given:
            raise TypeError("pass either sampler= or HF-style temperature / top_k / top_p / do_sample, not both")
        if from_config and any(k in settings for k in SAMPLING):
            raise TypeError(
                f"sampler= and generation_config's {[k for k in SAMPLING if k in settings]} both say how to "
                "sample: pass one of them"
            )
        return sampler
    if not from_config and not given:
        if not isinstance(default_sampler, Sampler):
            raise TypeError(f"default_sampler must be a cfgen.Sampler, got {type(default_sampler).__name__}")
        return default_sampler
    if from_config:
        # HF generate's defaults for unset fields: greedy, and top_k=50 when sampling.
        do_sample = settings.get("do_sample", False)
        if not do_sample:
            ignored = [k for k in ("temperature", "top_k", "top_p", *WARPERS) if settings.get(k) is not None]
            ignored = [k for k in ignored if k not in hf_kwargs]
            if ignored:
                warnings.warn(
                    f"generation_config sets {ignored} but do_sample is not True: decoding greedily, as HF "
                    "generate does, and those sampling settings do nothing. Set do_sample=True to sample.",
                    UserWarning, stacklevel=3,
                )
                for k in ignored:
                    settings.pop(k)
            return Sampler(temperature=0.0)
        return Sampler(settings.get("temperature", 1.0), settings.get("top_k", 50), settings.get("top_p"))
    if settings.get("do_sample", True) is False:  # as today: do_sample=False is greedy
        return Sampler(temperature=0.0)
    return Sampler(settings.get("temperature", 1.0), settings.get("top_k"), settings.get("top_p"))


def _eos(settings, tokenizer) -> Optional[list[int]]:
    eos = settings.get("eos_token_id")
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos.tolist() if isinstance(eos, torch.Tensor) else eos)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
    return ids


def _token_ids(settings, name: str, *, single: bool = False) -> None:
    v = settings.get(name)
    if v is None:
        return
    ids = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    ok = (isinstance(ids, (list, tuple)) and (not single or isinstance(v, int))
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))
    if not ok:
        raise ValueError(f"{name} must be {'a token id' if single else 'a token id or a list of them'}, got {v!r}")


def _positive_int(settings, name: str, *, zero_ok: bool = True) -> Optional[int]:
    v = settings.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        raise ValueError(f"{name} must be an int >= {0 if zero_ok else 1}, got {v!r}")
    return v


def _limits(settings, hf_kwargs, eos) -> Limits:
    new = _positive_int(settings, "max_new_tokens", zero_ok=False)
    length = _positive_int(settings, "max_length", zero_ok=False)
    if "max_new_tokens" in hf_kwargs and "max_length" in hf_kwargs:
        raise ValueError("pass max_new_tokens or max_length, not both (max_length counts the prompt too)")
    if new is not None and "max_new_tokens" in hf_kwargs:
        length = None
    elif length is not None and "max_length" in hf_kwargs:
        new = None
    return Limits(new, None if new is not None else length, None if eos is None else tuple(eos))


def _float(settings, name: str, lo: float, hi: float) -> Optional[float]:
    v = settings.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _stages(settings, sampler: Sampler, user: list, eos, limits: Limits) -> tuple[_Stage, ...]:
    from transformers.generation import logits_process as lp

    def need_eos(name):
        if eos is None:
            raise ValueError(f"{name} needs an end-of-sequence id: pass eos_token_id= (or a tokenizer that has one)")
        return list(eos)

    default: list[_Stage] = []

    def add(arg, name, kind, make, key=lambda prompt: (), validate=True):
        default.append(_Stage(name, kind, make, key))
        if validate:  # build once now: bad values fail before any model work, naming the argument
            _validate(arg, settings, lambda: default[-1].processor([1, 1], "cpu"))

    def length(prompt):
        return len(prompt)

    def ids(prompt):
        return tuple(prompt)

    s = settings
    if s.get("sequence_bias") is not None:
        bias = s["sequence_bias"]
        add("sequence_bias", "SequenceBiasLogitsProcessor", "rows", lambda p, d: lp.SequenceBiasLogitsProcessor(sequence_bias=bias))
    pen = _float(s, "encoder_repetition_penalty", 0.0, math.inf)
    if pen is not None and pen != 1.0:
        add("encoder_repetition_penalty", f"EncoderRepetitionPenaltyLogitsProcessor(penalty={pen:g})", "rows",
            lambda p, d: lp.EncoderRepetitionPenaltyLogitsProcessor(pen, torch.tensor([p], device=d)), ids)
    rep = _float(s, "repetition_penalty", 0.0, math.inf)
    if rep is not None and rep != 1.0:
        add("repetition_penalty", f"RepetitionPenaltyLogitsProcessor(penalty={rep:g})", "rows",
            lambda p, d: lp.RepetitionPenaltyLogitsProcessor(rep))
    n = _positive_int(s, "no_repeat_ngram_size")
    if n:
        add("no_repeat_ngram_size", f"NoRepeatNGramLogitsProcessor(ngram_size={n})", "rows", lambda p, d: lp.NoRepeatNGramLogitsProcessor(n))
    en = _positive_int(s, "encoder_no_repeat_ngram_size")
    if en:
        add("encoder_no_repeat_ngram_size", f"EncoderNoRepeatNGramLogitsProcessor(ngram_size={en})", "rows",
            lambda p, d: lp.EncoderNoRepeatNGramLogitsProcessor(en, torch.tensor([p], device=d)), ids)
    if s.get("bad_words_ids") is not None:
        bad, e = s["bad_words_ids"], eos
        add("bad_words_ids", "NoBadWordsLogitsProcessor", "rows", lambda p, d: lp.NoBadWordsLogitsProcessor(bad, e))
    ml = _positive_int(s, "min_length")
    if ml:
        e = need_eos("min_length")
        add("min_length", f"MinLengthLogitsProcessor(min_length={ml})", "rows",
            lambda p, d: lp.MinLengthLogitsProcessor(ml, e, device=d))
    mn = _positive_int(s, "min_new_tokens")
    if mn:
        e = need_eos("min_new_tokens")
        add("min_new_tokens", f"MinNewTokensLengthLogitsProcessor(min_new_tokens={mn})", "rows",
            lambda p, d: lp.MinNewTokensLengthLogitsProcessor(len(p), mn, e, device=d), length)
    bos = s.get("forced_bos_token_id")
    _token_ids(s, "forced_bos_token_id", single=True)
    _token_ids(s, "forced_eos_token_id")
    _token_ids(s, "suppress_tokens")
    _token_ids(s, "begin_suppress_tokens")
    if bos is not None:
        add("forced_bos_token_id", f"ForcedBOSTokenLogitsProcessor({bos})", "rows", lambda p, d: lp.ForcedBOSTokenLogitsProcessor(bos))
    feos = s.get("forced_eos_token_id")
    if feos is not None:
        if limits.max_new_tokens is None and limits.max_length is None:
            raise ValueError("forced_eos_token_id forces its token at the last allowed step: pass max_new_tokens "
                             "or max_length")
        _validate("forced_eos_token_id", settings, lambda: lp.ForcedEOSTokenLogitsProcessor(2, feos))
        add("forced_eos_token_id", f"ForcedEOSTokenLogitsProcessor({feos})", "rows",
            lambda p, d: lp.ForcedEOSTokenLogitsProcessor(len(p) + limits.max_new(len(p)), feos, device=d), length,
            validate=False)
    decay = s.get("exponential_decay_length_penalty")
    if decay is not None:
        e = need_eos("exponential_decay_length_penalty")
        add("exponential_decay_length_penalty", f"ExponentialDecayLengthPenalty{tuple(decay)}", "rows",
            lambda p, d: lp.ExponentialDecayLengthPenalty(tuple(decay), e, len(p)), length)
    if s.get("suppress_tokens") is not None:
        sup = list(s["suppress_tokens"])
        add("suppress_tokens", f"SuppressTokensLogitsProcessor({sup})", "batch", lambda p, d: lp.SuppressTokensLogitsProcessor(sup, d))
    if s.get("begin_suppress_tokens") is not None:
        beg = list(s["begin_suppress_tokens"])

        def begin(p, d):
            # HF's begin index: the prompt length, one later when a forced BOS follows a one-token prompt.
            index = len(p) + (1 if len(p) == 1 and bos is not None else 0)
            return lp.SuppressTokensAtBeginLogitsProcessor(beg, index, device=d)

        add("begin_suppress_tokens", f"SuppressTokensAtBeginLogitsProcessor({beg})", "rows", begin, length)

    # HF's merge: a user processor of a built-in's class replaces it in place; the rest follow.
    chain: list[_Stage] = []
    used: set[int] = set()
    for stage in default:
        cls = getattr(lp, stage.name.split("(")[0])
        mine = next((i for i, p in enumerate(user) if i not in used and type(p) is cls), None)
        if mine is None:
            chain.append(stage)
        else:
            used.add(mine)
            chain.append(_user_stage(user[mine]))
    chain += [_user_stage(p) for i, p in enumerate(user) if i not in used]

    warpers: list[_Stage] = []
    top_h = _float(s, "top_h", 0.0, 1.0)
    min_p = _float(s, "min_p", 0.0, 1.0)
    typical = _float(s, "typical_p", 0.0, 1.0)
    eps = _float(s, "epsilon_cutoff", 0.0, 1.0)
    eta = _float(s, "eta_cutoff", 0.0, 1.0)
    active = {k: v for k, v in [("top_h", top_h), ("min_p", min_p), ("typical_p", typical if typical != 1.0 else None),
                                ("epsilon_cutoff", eps or None), ("eta_cutoff", eta or None)] if v is not None}
    if active and sampler.greedy:
        raise ValueError(
            f"{sorted(active)} reshape the sampling distribution, but decoding is greedy (temperature=0 / "
            "do_sample=False), where HF generate ignores them. Remove them, or sample (temperature > 0)."
        )

    def warp(arg, name, make):
        warpers.append(_Stage(name, "batch", make))
        _validate(arg, settings, lambda: warpers[-1].processor([], "cpu"))

    if min_p is not None:
        warp("min_p", f"MinPLogitsWarper(min_p={min_p:g})", lambda p, d: lp.MinPLogitsWarper(min_p=min_p))
    if typical is not None and typical < 1.0:
        warp("typical_p", f"TypicalLogitsWarper(mass={typical:g})", lambda p, d: lp.TypicalLogitsWarper(mass=typical))
    if eps:
        if eps >= 1.0:
            raise ValueError(f"epsilon_cutoff must be in [0, 1), got {eps}")
        warp("epsilon_cutoff", f"EpsilonLogitsWarper(epsilon={eps:g})", lambda p, d: lp.EpsilonLogitsWarper(epsilon=eps))
    if eta:
        if eta >= 1.0:
            raise ValueError(f"eta_cutoff must be in [0, 1), got {eta}")
        warp("eta_cutoff", f"EtaLogitsWarper(epsilon={eta:g})", lambda p, d: lp.EtaLogitsWarper(epsilon=eta, device=d))

    renorm = s.get("renormalize_logits")
    if renorm not in (None, False, True):
        raise ValueError(f"renormalize_logits must be True or False, got {renorm!r}")
    norm = [_Stage("LogitNormalization", "batch", lambda p, d: lp.LogitNormalization())] if renorm else []

    if sampler.greedy:  # HF greedy: processors, normalisation, then argmax (no warpers)
        return tuple(chain + norm + [_sampler_stage(sampler)])
    if top_h is not None:  # HF: temperature, then top-h, then top-k / top-p
        mid = [_sampler_stage(Sampler(sampler.temperature)),
               _Stage(f"TopHLogitsWarper(top_h={top_h:g})", "batch", lambda p, d: lp.TopHLogitsWarper(top_h=top_h)),
               _sampler_stage(Sampler(1.0, sampler.top_k, sampler.top_p))]
        _validate("top_h", settings, lambda: mid[1].processor([], "cpu"))
    else:
        mid = [_sampler_stage(sampler)]
    return tuple(chain + mid + warpers + norm)


def _validate(arg: str, settings: dict, construct: Callable[[], Any]) -> None:
    try:
        construct()
    except (ValueError, TypeError) as err:
        raise ValueError(f"{arg}={settings.get(arg)!r} is invalid: {err}") from None


def _sampler_stage(sampler: Sampler) -> _Stage:
    return _Stage(f"Sampler({sampler.describe()})", "sampler", lambda p, d: None, sampler=sampler)


def _user_stage(proc) -> _Stage:
    return _Stage(type(proc).__name__, "rows", lambda p, d: proc)
