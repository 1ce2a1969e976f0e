"""Causal abstraction: DAS and MDAS training on pyvene's rotated-space interventions.

Distributed Alignment Search (DAS, Geiger et al.) learns an orthogonal rotation
of one representation (e.g. a layer's residual stream at the entity's last
token) such that swapping a few rotated coordinates from a *source* run into a
*base* run makes the model answer as the source would on one attribute
(interchange-intervention training). The model stays frozen; only the rotation
trains. MDAS (RAVEL, Huang et al.) adds a second objective so the subspace is
*disentangled*: on the other attributes' prompts the intervened model must keep
the base entity's value.

* **Cause** examples: prompts about the target attribute, label = the source
  entity's value (first label token).
* **Isolate** examples: prompts about the other attributes, label = the base
  entity's value.
* ``cause_score`` / ``isolate_score``: accuracy of the greedy next token after
  the interchange against those labels; ``disentangle_score`` is their mean, as
  RAVEL defines them.

The helpers are deliberately small and compose with pyvene as its users write
it::

    config = rotation_config(layer=8, rank=4)             # a pv.IntervenableConfig
    intervenable = make_intervenable(model, config, seed=0)
    train_das(intervenable, cause_examples, steps=200)    # or train_mdas(..., isolate_examples)
    cause_score(intervenable, held_out_cause)

A runnable miniature (a random 2-layer GPT-2; scores are just numbers here):

>>> import torch, transformers
>>> from cfgen.abstraction import (InterchangeExample, rotation_config, make_intervenable,
...                                train_das, cause_score)
>>> _ = torch.manual_seed(0)
>>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
...     vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
>>> examples = [InterchangeExample(base_ids=[3, 10], source_ids=[4, 10], label=7, base_position=0,
...                                source_position=0)]
>>> intervenable = make_intervenable(gpt2, rotation_config(layer=0, rank=2), seed=0)
>>> _ = train_das(intervenable, examples, steps=3, progress=False)
>>> 0.0 <= cause_score(intervenable, examples) <= 1.0
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    import pyvene as pv


def _pyvene():
    """Import pyvene lazily (it costs seconds), hiding its 'nnsight is not detected' print."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import pyvene
    return pyvene

__all__ = [
    "InterchangeExample",
    "make_examples",
    "rotation_config",
    "make_intervenable",
    "interchange_logits",
    "interchange_accuracy",
    "interchange_loss",
    "train_das",
    "train_mdas",
    "cause_score",
    "isolate_score",
    "disentangle_score",
    "evaluate",
]


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class InterchangeExample:
    """One interchange-intervention example.

    ``base_ids`` / ``source_ids`` are unpadded prompt token ids; the intervention
    replaces the base run's representation at ``base_position`` with the source
    run's at ``source_position`` (inside the learned subspace); ``label`` is the
    token id the intervened model should predict right after the base prompt.
    Positions may be negative (counted from the prompt's end, ``-1`` = last
    token) and are checked against the prompt lengths.

    >>> ex = InterchangeExample([5, 6, 7], [8, 9], label=3, base_position=-2, source_position=0)
    >>> ex.resolved_positions()
    (1, 0)
    >>> InterchangeExample([5, 6], [8], label=3, base_position=2)
    Traceback (most recent call last):
    ...
    ValueError: base_position 2 is outside the base prompt (length 2)
    """

    base_ids: Sequence[int]
    source_ids: Sequence[int]
    label: int
    base_position: int = -1
    source_position: int = -1

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_ids", tuple(int(t) for t in self.base_ids))
        object.__setattr__(self, "source_ids", tuple(int(t) for t in self.source_ids))
        if not self.base_ids or not self.source_ids:
            raise ValueError("base_ids and source_ids must be non-empty token id sequences")
        for name, ids in (("base", self.base_ids), ("source", self.source_ids)):
            pos = getattr(self, f"{name}_position")
            if not isinstance(pos, int) or isinstance(pos, bool):
                raise TypeError(f"{name}_position must be an int, got {type(pos).__name__}")
            if not -len(ids) <= pos < len(ids):
                raise ValueError(f"{name}_position {pos} is outside the {name} prompt (length {len(ids)})")
        if not isinstance(self.label, int) or isinstance(self.label, bool) or self.label < 0:
            raise ValueError(f"label must be a non-negative token id, got {self.label!r}")

    def resolved_positions(self) -> tuple[int, int]:
        """(base_position, source_position) as non-negative indices."""
        return self.base_position % len(self.base_ids), self.source_position % len(self.source_ids)


def _first_label_token(tokenizer: Any, label: str | int) -> int:
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    ids = tokenizer(label, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"label {label!r} tokenizes to no tokens")
    return int(ids[0])


def make_examples(
    tokenizer: Any,
    bases: Sequence[str],
    sources: Sequence[str],
    labels: Sequence[str | int],
    *,
    base_positions: int | Sequence[int] = -1,
    source_positions: int | Sequence[int] = -1,
) -> list[InterchangeExample]:
    """Tokenize prompt pairs into :class:`InterchangeExample` s.

    ``labels`` are token ids or strings (the text that continues the prompt,
    e.g. ``" Paris"``; only its first token is used, as in RAVEL). Positions
    are one int for all examples or one per example (negative = from the end).

    >>> class Tok:  # a stand-in tokenizer: one token per character
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> [e.label for e in make_examples(Tok(), ["ab", "cd"], ["ef", "gh"], [" x", 5])]
    [32, 5]
    >>> make_examples(Tok(), ["ab"], ["ef", "gh"], [1])
    Traceback (most recent call last):
    ...
    ValueError: bases, sources and labels must have the same length (got 1, 2, 1)
    """
    n = len(bases)
    if len(sources) != n or len(labels) != n:
        raise ValueError(
            f"bases, sources and labels must have the same length (got {n}, {len(sources)}, {len(labels)})"
        )

    def per_example(value: int | Sequence[int], name: str) -> list[int]:
        if isinstance(value, int):
            return [value] * n
        value = list(value)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} examples")
        return value

    bpos, spos = per_example(base_positions, "base_positions"), per_example(source_positions, "source_positions")
    out = []
    for i in range(n):
        out.append(
            InterchangeExample(
                base_ids=tokenizer(bases[i])["input_ids"],
                source_ids=tokenizer(sources[i])["input_ids"],
                label=_first_label_token(tokenizer, labels[i]),
                base_position=bpos[i],
                source_position=spos[i],
            )
        )
    return out


# --------------------------------------------------------------------------- configs


def rotation_config(
    layer: int,
    *,
    rank: int,
    component: str = "block_output",
    low_rank: bool = True,
    unit: str = "pos",
) -> pv.IntervenableConfig:
    """A one-site ``pv.IntervenableConfig`` with a rotated-space intervention.

    ``low_rank=True`` uses ``pv.LowRankRotatedSpaceIntervention`` (a d x rank
    orthonormal matrix); ``False`` uses ``pv.RotatedSpaceIntervention`` (a full
    d x d rotation whose first ``rank`` coordinates are interchanged;
    :func:`make_intervenable` sets its ``interchange_dim``).

    >>> cfg = rotation_config(3, rank=2)
    >>> (cfg.representations[0].layer, cfg.representations[0].component, cfg.representations[0].low_rank_dimension)
    (3, 'block_output', 2)
    >>> rotation_config(3, rank=0)
    Traceback (most recent call last):
    ...
    ValueError: rank must be a positive int, got 0
    """
    pv = _pyvene()

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    kind = pv.LowRankRotatedSpaceIntervention if low_rank else pv.RotatedSpaceIntervention
    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=layer, component=component, unit=unit, low_rank_dimension=rank, intervention_type=kind
            )
        ]
    )


def _num_layers(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer"):
        if cfg is not None and isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def make_intervenable(model: torch.nn.Module, config: pv.IntervenableConfig, *, seed: int = 0) -> pv.IntervenableModel:
    """Wrap ``model`` in a ``pv.IntervenableModel`` with seeded rotation initialisation.

    pyvene initialises rotations with ``torch.nn.init.orthogonal_`` on the
    global RNG; this runs that under ``torch.random.fork_rng`` seeded with
    ``seed``, so the result is reproducible and the caller's global RNG state is
    unchanged. For a full ``RotatedSpaceIntervention`` the representation's
    ``low_rank_dimension`` (if given) becomes its ``interchange_dim``. As with
    any ``pv.IntervenableModel``, wrapping freezes the model (pyvene sets its
    parameters' ``requires_grad`` to False and puts it in eval mode).

    >>> import torch, transformers
    >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     vocab_size=8, n_positions=4, n_embd=4, n_layer=1, n_head=1, bos_token_id=0, eos_token_id=0)).eval()
    >>> state = torch.get_rng_state()
    >>> a = make_intervenable(m, rotation_config(0, rank=2), seed=1)
    >>> b = make_intervenable(m, rotation_config(0, rank=2), seed=1)
    >>> wa = next(iter(a.interventions.values())).rotate_layer.weight
    >>> torch.equal(wa, next(iter(b.interventions.values())).rotate_layer.weight)
    True
    >>> torch.equal(state, torch.get_rng_state())
    True
    """
    pv = _pyvene()

    n_layers = _num_layers(model)
    for rep in config.representations:
        if n_layers is not None and not 0 <= int(rep.layer) < n_layers:
            raise ValueError(f"layer {rep.layer} is outside the model's {n_layers} layers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        intervenable = pv.IntervenableModel(config, model)
    for rep, intervention in zip(config.representations, intervenable.interventions.values()):
        if isinstance(intervention, pv.RotatedSpaceIntervention) and rep.low_rank_dimension is not None:
            if int(rep.low_rank_dimension) > int(intervention.embed_dim):
                raise ValueError(f"rank {rep.low_rank_dimension} exceeds the representation size {int(intervention.embed_dim)}")
            intervention.set_interchange_dim(int(rep.low_rank_dimension))
    device = next(model.parameters()).device
    intervenable.set_device(device, set_model=False)
    return intervenable


# --------------------------------------------------------------------------- running


def _check_examples(examples: Sequence[InterchangeExample], name: str = "examples") -> None:
    if len(examples) == 0:
        raise ValueError(f"{name} is empty")
    for i, ex in enumerate(examples):
        if not isinstance(ex, InterchangeExample):
            raise TypeError(f"{name}[{i}] is a {type(ex).__name__}, expected InterchangeExample")


def _pad(seqs: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad (positions stay the unpadded indices; the mask hides the padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _num_interventions(intervenable: pv.IntervenableModel) -> int:
    return len(intervenable.interventions)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _base_inputs(intervenable: pv.IntervenableModel, batch: Sequence[InterchangeExample]) -> tuple[dict, list[int]]:
    """Right-padded base inputs; when the model supports it, only the needed positions get logits."""
    device = next(intervenable.model.parameters()).device
    base = _pad([ex.base_ids for ex in batch], device)
    last = [len(ex.base_ids) - 1 for ex in batch]
    if _accepts_logits_to_keep(intervenable.model):
        keep = sorted(set(last))
        base["logits_to_keep"] = torch.tensor(keep, device=device)
        last = [keep.index(p) for p in last]
    return base, last


def _unit_locations(intervenable: pv.IntervenableModel, batch: Sequence[InterchangeExample]) -> dict:
    positions = [ex.resolved_positions() for ex in batch]
    base_locs = [[p[0]] for p in positions]
    source_locs = [[p[1]] for p in positions]
    k = _num_interventions(intervenable)
    return {"sources->base": ([source_locs] * k, [base_locs] * k)}


def _check_labels(batch: Sequence[InterchangeExample], vocab: int) -> None:
    for ex in batch:
        if ex.label >= vocab:
            raise ValueError(f"label {ex.label} is outside the model's vocabulary ({vocab})")


def _forward_batch(
    intervenable: pv.IntervenableModel,
    batch: Sequence[InterchangeExample],
    source_representations: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Next-token logits [B, V] right after each base prompt, with the interchange applied.

    ``source_representations`` (per intervention key, [B, 1, d]) replace the
    source runs (they do not depend on the trainable rotation, so training
    caches them; see :func:`_collect_source_representations`).
    """
    base, last = _base_inputs(intervenable, batch)
    unit_locations = _unit_locations(intervenable, batch)
    if source_representations is None:
        device = base["input_ids"].device
        source = _pad([ex.source_ids for ex in batch], device)
        _, out = intervenable(base, [source], unit_locations=unit_locations)
    else:
        _, out = intervenable(base, unit_locations=unit_locations, source_representations=source_representations)
    _check_labels(batch, out.logits.shape[-1])
    rows = torch.arange(len(batch), device=out.logits.device)
    return out.logits[rows, torch.tensor(last, device=out.logits.device)]


@torch.no_grad()
def _collect_source_representations(
    intervenable: pv.IntervenableModel, examples: Sequence[InterchangeExample], *, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Each example's source representation at every intervened site: {key: [N, 1, d]}.

    Runs each distinct (source prompt, position) once with pyvene
    ``CollectIntervention`` s at the same representations.
    """
    pv = _pyvene()
    reps = [
        rep._replace(intervention_type=pv.CollectIntervention, intervention=None, low_rank_dimension=None)
        for rep in intervenable.representations.values()
    ]
    collector = pv.IntervenableModel(pv.IntervenableConfig(representations=reps), intervenable.model)
    keys = list(intervenable.interventions.keys())
    unique: dict[tuple, int] = {}
    for ex in examples:
        unique.setdefault((ex.source_ids, ex.resolved_positions()[1]), len(unique))
    items = list(unique)
    device = next(intervenable.model.parameters()).device
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        inputs = _pad([ids for ids, _ in chunk], device)
        locs = [[pos] for _, pos in chunk]
        (_, collected), _ = collector(inputs, unit_locations={"base": [locs] * len(keys)})
        for j in range(len(keys)):
            parts[j].append(collected[j].reshape(len(chunk), 1, -1))
    index = torch.tensor([unique[(ex.source_ids, ex.resolved_positions()[1])] for ex in examples], device=device)
    return {key: torch.cat(parts[j])[index] for j, key in enumerate(keys)}


def interchange_logits(
    intervenable: pv.IntervenableModel, examples: Sequence[InterchangeExample], *, batch_size: int = 64
) -> torch.Tensor:
    """Next-token logits ``[N, V]`` (float32, no grad) after each example's interchange."""
    _check_examples(examples)
    outs = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            outs.append(_forward_batch(intervenable, examples[i : i + batch_size]).float())
    return torch.cat(outs)


def interchange_accuracy(
    intervenable: pv.IntervenableModel, examples: Sequence[InterchangeExample], *, batch_size: int = 64
) -> float:
    """Fraction of examples whose greedy next token after the interchange equals the label."""
    logits = interchange_logits(intervenable, examples, batch_size=batch_size)
    labels = torch.tensor([ex.label for ex in examples], device=logits.device)
    return float((logits.argmax(-1) == labels).float().mean())


def interchange_loss(
    intervenable: pv.IntervenableModel,
    batch: Sequence[InterchangeExample],
    source_representations: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the labels after the interchange (differentiable w.r.t. the rotation).

    ``source_representations``: optional cached source activations ({key: [B, 1, d]}).
    """
    logits = _forward_batch(intervenable, batch, source_representations).float()
    labels = torch.tensor([ex.label for ex in batch], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, labels)


def cause_score(
    intervenable: pv.IntervenableModel, cause_examples: Sequence[InterchangeExample], *, batch_size: int = 64
) -> float:
    """RAVEL's Cause: accuracy of the source entity's value on the target attribute's prompts.

    ``cause_examples`` carry the source entity's value (first token) as label.
    """
    return interchange_accuracy(intervenable, cause_examples, batch_size=batch_size)


def isolate_score(
    intervenable: pv.IntervenableModel, isolate_examples: Sequence[InterchangeExample], *, batch_size: int = 64
) -> float:
    """RAVEL's Isolate: accuracy of the base entity's value on the other attributes' prompts.

    ``isolate_examples`` carry the base entity's value (first token) as label.
    """
    return interchange_accuracy(intervenable, isolate_examples, batch_size=batch_size)


def disentangle_score(
    intervenable: pv.IntervenableModel,
    cause_examples: Sequence[InterchangeExample],
    isolate_examples: Sequence[InterchangeExample],
    *,
    batch_size: int = 64,
) -> float:
    """RAVEL's Disentangle: the mean of :func:`cause_score` and :func:`isolate_score`."""
    return 0.5 * (
        cause_score(intervenable, cause_examples, batch_size=batch_size)
        + isolate_score(intervenable, isolate_examples, batch_size=batch_size)
    )


def evaluate(
    intervenable: pv.IntervenableModel,
    cause_examples: Sequence[InterchangeExample],
    isolate_examples: Sequence[InterchangeExample],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """``{"cause", "isolate", "disentangle"}`` in one call (each set evaluated once)."""
    c = cause_score(intervenable, cause_examples, batch_size=batch_size)
    i = isolate_score(intervenable, isolate_examples, batch_size=batch_size)
    return {"cause": c, "isolate": i, "disentangle": 0.5 * (c + i)}


# --------------------------------------------------------------------------- training


def _as_intervenable(model_or_intervenable: Any, config: Any, seed: int) -> pv.IntervenableModel:
    pv = _pyvene()

    if isinstance(model_or_intervenable, pv.IntervenableModel):
        if config is not None:
            raise ValueError("pass config only with a plain model, not with an IntervenableModel")
        return model_or_intervenable
    if config is None:
        raise ValueError("a plain model needs config= (e.g. rotation_config(layer, rank=...))")
    return make_intervenable(model_or_intervenable, config, seed=seed)


def _trainable_parameters(intervenable: pv.IntervenableModel) -> list[torch.nn.Parameter]:
    pv = _pyvene()

    params, seen = [], set()
    for intervention in intervenable.interventions.values():
        if isinstance(intervention, pv.TrainableIntervention):
            for p in intervention.parameters():
                if id(p) not in seen and p.is_floating_point():
                    seen.add(id(p))
                    params.append(p)
    if not params:
        raise ValueError("the IntervenableModel has no trainable intervention (use a rotated-space intervention)")
    return params


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless epochs of shuffled index batches drawn from a local generator."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size]


def _train(
    intervenable: pv.IntervenableModel,
    cause: Sequence[InterchangeExample],
    isolate: Sequence[InterchangeExample] | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    isolate_weight: float,
    seed: int,
    progress: bool,
    desc: str,
) -> pv.IntervenableModel:
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    params = _trainable_parameters(intervenable)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    cause_batches = _batches(len(cause), batch_size, generator)
    isolate_batches = _batches(len(isolate), batch_size, generator) if isolate else None

    model = intervenable.model
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)

    def step_loss(examples, cached, idx):
        return interchange_loss(intervenable, [examples[j] for j in idx], {k: v[idx] for k, v in cached.items()})

    try:
        # source activations do not depend on the rotation: run each source prompt once, not every step
        cause_src = _collect_source_representations(intervenable, cause) if steps else {}
        iso_src = _collect_source_representations(intervenable, isolate) if steps and isolate else {}
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(cause, cause_src, next(cause_batches))
            shown = {"cause": loss.item()}
            if isolate_batches is not None:
                iso = step_loss(isolate, iso_src, next(isolate_batches))
                shown["isolate"] = iso.item()
                loss = loss + isolate_weight * iso
            loss.backward()
            optimizer.step()
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
    finally:
        bar.close()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return intervenable


def train_das(
    model_or_intervenable: Any,
    examples: Sequence[InterchangeExample],
    *,
    config: pv.IntervenableConfig | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> pv.IntervenableModel:
    """Distributed Alignment Search: train the rotation on Cause examples only.

    ``model_or_intervenable`` is a ``pv.IntervenableModel`` (trained in place
    and returned) or a plain model together with ``config`` (wrapped with
    :func:`make_intervenable` using ``seed``). The model is frozen (its
    ``requires_grad`` flags and train/eval mode are restored afterwards); Adam
    updates only the trainable interventions. Batches are shuffled with a local
    ``torch.Generator(seed)``; the global RNG is neither used nor changed.
    ``progress=False`` disables the tqdm bar.
    """
    _check_examples(examples)
    intervenable = _as_intervenable(model_or_intervenable, config, seed)
    return _train(
        intervenable, examples, None, steps=steps, lr=lr, batch_size=batch_size, isolate_weight=0.0,
        seed=seed, progress=progress, desc="DAS",
    )


def train_mdas(
    model_or_intervenable: Any,
    cause_examples: Sequence[InterchangeExample],
    isolate_examples: Sequence[InterchangeExample],
    *,
    config: pv.IntervenableConfig | None = None,
    isolate_weight: float = 1.0,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> pv.IntervenableModel:
    """Multi-task DAS (RAVEL's MDAS): Cause loss + ``isolate_weight`` x Isolate loss.

    Each step draws one batch of ``cause_examples`` (labels = the source
    entity's value on the target attribute) and one of ``isolate_examples``
    (labels = the base entity's value on another attribute) and minimises the
    sum of their cross-entropies. Everything else is as in :func:`train_das`.

    >>> import torch, transformers
    >>> gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    ...     vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    >>> cause = [InterchangeExample([3, 10], [4, 10], label=7, base_position=0, source_position=0)]
    >>> isolate = [InterchangeExample([3, 11], [4, 11], label=8, base_position=0, source_position=0)]
    >>> trained = train_mdas(gpt2, cause, isolate, config=rotation_config(0, rank=2), steps=2, progress=False)
    >>> sorted(evaluate(trained, cause, isolate))
    ['cause', 'disentangle', 'isolate']
    """
    _check_examples(cause_examples, "cause_examples")
    _check_examples(isolate_examples, "isolate_examples")
    if not (isolate_weight >= 0 and math.isfinite(isolate_weight)):
        raise ValueError(f"isolate_weight must be a non-negative finite number, got {isolate_weight}")
    intervenable = _as_intervenable(model_or_intervenable, config, seed)
    return _train(
        intervenable, cause_examples, isolate_examples, steps=steps, lr=lr, batch_size=batch_size,
        isolate_weight=isolate_weight, seed=seed, progress=progress, desc="MDAS",
    )
