"""One KV-cached decode loop for factual, counterfactual and interventional rows.

Every row carries its own context (prompt, plus any forced tokens), its true
prompt length (schedules are absolute positions counted from the prompt's
first token), the generation step of its first sampled token, and its noise:
prior noise keyed by (seed, step) or precomputed posterior noise. Rows that
share a model step together in one batch; in an ``IntervenableModel`` the
factual rows ride along with the intervention masked off, so they compute
exactly the un-intervened model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .noise import PRIOR, gumbel_noise
from .sampler import Sampler, check_logits

__all__ = ["Rows", "Schedule", "PlainRunner", "PyveneRunner", "decode"]

Schedule = Union[str, Sequence[int]]


@dataclass
class Rows:
    """What each decoded row is (all lists have one entry per row)."""

    context: list[list[int]]
    prompt_len: list[int]
    seed: list[int]
    max_new: list[int]
    step_offset: list[int] = field(default_factory=list)
    stream: list[int] = field(default_factory=list)
    intervene: list[bool] = field(default_factory=list)
    posterior: list[Optional[torch.Tensor]] = field(default_factory=list)  # [T_r, V] noise for the first steps

    def __post_init__(self) -> None:
        n = len(self.context)
        self.step_offset = self.step_offset or [0] * n
        self.stream = self.stream or [PRIOR] * n
        self.intervene = self.intervene or [False] * n
        self.posterior = self.posterior or [None] * n

    def __len__(self) -> int:
        return len(self.context)

    def select(self, idx: Sequence[int]) -> Rows:
        return Rows(**{k: [getattr(self, k)[i] for i in idx] for k in self.__dataclass_fields__})


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


def _last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: the prefill then skips V x d work per prompt position."""
    try:
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


class PlainRunner:
    """A Hugging Face causal LM, no interventions."""

    def __init__(self, model):
        self.model = model
        self.extra = _last_logits_only(model)

    def __call__(self, ids, mask, pos, cache, *, abs_pos, prompt_len, rows, prefill):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         **self.extra)
        return out.logits[:, -1], out.past_key_values


class PyveneRunner:
    """An ``IntervenableModel``; interventions act on intervened rows at scheduled positions only.

    Args:
        intervenable: the pyvene model.
        schedule: ``"prompt"``, ``"generation"``, ``"all"`` or absolute positions.
        base_locations: per intervention, per row, prompt positions (user ``unit_locations``),
            or None to intervene wherever the schedule says.
        sources: per pyvene group, a dict of padded source inputs ``[R, S]`` (prefill only).
        source_locations: per intervention, per row, padded source positions.
        source_representations: per intervention key, ``[R, d]`` tensors.
        subspaces: pyvene's subspaces, per intervention, per row.
        passive: intervention keys that are markers (never intervene).
    """

    def __init__(self, intervenable, *, schedule: Schedule = "all", base_locations=None, sources=None,
                 source_locations=None, source_representations=None, subspaces=None, passive=()):
        self.pv = intervenable
        self.schedule = schedule
        self.base_locations = base_locations
        self.sources = sources
        self.source_locations = source_locations
        self.source_representations = source_representations
        self.subspaces = subspaces
        self.keys = list(intervenable.sorted_keys)
        self.passive = set(passive)
        self.extra = _last_logits_only(intervenable.model)
        self._masks: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def masked(self):
        """Patch each intervention's forward so unscheduled (row, unit) pairs keep their base value."""
        saved = {}
        for key in self.keys:
            iv = self.pv.interventions[key]
            saved[key] = iv.__dict__.get("forward")
            iv.forward = self._masked_forward(key, iv.forward)
        try:
            yield self
        finally:
            for key, fwd in saved.items():
                iv = self.pv.interventions[key]
                if fwd is None:
                    del iv.forward
                else:
                    iv.forward = fwd

    def _masked_forward(self, key: str, forward: Callable):
        def run(base, source=None, subspaces=None, **kwargs):
            mask = self._masks.get(key)
            if mask is None:
                return forward(base, source, subspaces, **kwargs)
            kept = base.clone()  # some pyvene interventions (e.g. AdditionIntervention) write into base
            out = forward(base, source, subspaces, **kwargs)
            tensor = getattr(out, "output", out)
            k = mask.shape[1]
            if tensor.dim() == 3 and tensor.shape[1] == k:
                m = mask[:, :, None]
            elif tensor.dim() == 2 and tensor.shape[1] % k == 0:
                m = mask.repeat_interleave(tensor.shape[1] // k, dim=1)
            else:
                m = mask.any(1).reshape((-1,) + (1,) * (tensor.dim() - 1))
            merged = torch.where(m, tensor, kept.to(tensor.dtype))
            if tensor is out:
                return merged
            out.output = merged
            return out

        return run

    def __call__(self, ids, mask, pos, cache, *, abs_pos, prompt_len, rows, prefill):
        n, k = ids.shape
        intervene = torch.tensor(rows.intervene, device=ids.device)[:, None]
        base_locs, sources, source_locs, reps = [], None, None, None
        for i, key in enumerate(self.keys):
            if key in self.passive:  # the logits' last position (the only one kept, where supported)
                locs = torch.full((n, 1), 0 if self.extra else k - 1, device=ids.device)
                self._masks[key] = torch.zeros(n, 1, dtype=torch.bool, device=ids.device)
            elif self.base_locations is not None:
                if prefill:
                    pad = k - (abs_pos >= 0).sum(1, keepdim=True)
                    locs = torch.as_tensor(self.base_locations[i], device=ids.device) + pad
                    self._masks[key] = intervene.expand_as(locs).clone()
                else:
                    locs = torch.zeros(n, 1, dtype=torch.long, device=ids.device)
                    self._masks[key] = torch.zeros(n, 1, dtype=torch.bool, device=ids.device)
            else:
                locs = torch.arange(k, device=ids.device).expand(n, k)
                real = abs_pos >= 0
                self._masks[key] = intervene & real & _scheduled(self.schedule, abs_pos, prompt_len[:, None])
            base_locs.append(locs.tolist())
        if prefill and self.sources is not None:
            sources, source_locs = self.sources, self.source_locations
        if self.source_representations is not None:
            reps = {key: rep[:, None, :].expand(n, len(base_locs[i][0]), rep.shape[-1])
                    for i, key in enumerate(self.keys) if (rep := self.source_representations.get(key)) is not None}
        unit_locations = {"sources->base": (source_locs if sources is not None else None, base_locs)}
        base = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "past_key_values": cache,
                "use_cache": True, **self.extra}
        _, out = self.pv(base, sources=sources, unit_locations=unit_locations, source_representations=reps,
                         subspaces=self.subspaces)
        return out.logits[:, -1], out.past_key_values


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, device=device)
            mask[r, width - len(s):] = 1
    return ids, mask


def _noise_keys(rows: Rows, device) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Seeds, step offsets and the rows of each noise stream: fixed for a whole decode."""
    seeds = torch.tensor(rows.seed, dtype=torch.long, device=device)
    offsets = torch.tensor(rows.step_offset, dtype=torch.long, device=device)
    streams = torch.tensor(rows.stream, device=device)
    groups = [(s, (streams == s).nonzero()[:, 0]) for s in torch.unique(streams).tolist()]
    return seeds, offsets, groups


def _noise(keys, posterior: list[Optional[torch.Tensor]], step: int, vocab: int, device) -> torch.Tensor:
    seeds, offsets, groups = keys
    steps = offsets + step
    u = torch.empty(len(seeds), vocab, device=device)
    for stream, sel in groups:
        u[sel] = gumbel_noise(seeds[sel], steps[sel], vocab, stream=stream, device=device)
    for r, post in enumerate(posterior):
        if post is not None and step < post.shape[0]:
            u[r] = post[step].to(device)
    return u


class StepError(ValueError):
    pass


def decode(
    groups: list[tuple[Callable, list[int]]],
    rows: Rows,
    *,
    sampler: Sampler,
    vocab_size: int,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    stop: Optional[Callable[[list[int]], bool]] = None,
    device=None,
    progress=None,
) -> tuple[list[list[int]], list[str]]:
    """Decode every row; return each row's new tokens and why it stopped.

    ``groups`` pairs a runner with the rows it computes; all rows of one runner
    step together in one batch with a shared KV cache.
    """
    device = device or torch.device("cpu")
    n = len(rows)
    horizon = max(rows.max_new) if n else 0
    new_tokens: list[list[int]] = [[] for _ in range(n)]
    reason = ["length"] * n
    done = torch.tensor([m <= 0 for m in rows.max_new], device=device)
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    max_new = torch.tensor(rows.max_new, device=device)

    states = []
    for runner, idx in groups:
        sub = rows.select(idx)
        ids, mask = _left_pad(sub.context, pad_token_id, device)
        lengths = mask.sum(1, keepdim=True)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        abs_pos = pos.masked_fill(mask == 0, -1)
        prompt_len = torch.tensor(sub.prompt_len, device=device)
        logits, cache = runner(ids, mask, pos, None, abs_pos=abs_pos, prompt_len=prompt_len, rows=sub, prefill=True)
        states.append({"runner": runner, "idx": idx, "rows": sub, "mask": mask, "next_pos": lengths,
                       "prompt_len": prompt_len, "cache": cache, "logits": logits})

    keys = _noise_keys(rows, device)
    bar = progress(total=horizon, desc="decoding", leave=False) if progress else None
    try:
        for step in range(horizon):
            logits = torch.empty(n, vocab_size, device=device)
            for st in states:
                logits[st["idx"]] = st["logits"][:, :vocab_size].float()
            try:
                check_logits(logits)
            except ValueError as err:
                raise StepError(f"at generation step {step}: {err}") from None
            token = sampler.sample(logits, _noise(keys, rows.posterior, step, vocab_size, device))
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            for r in (~done).nonzero()[:, 0].tolist():
                new_tokens[r].append(int(token[r]))
            hit_eos = (token[:, None] == eos).any(1) & ~done
            for r in hit_eos.nonzero()[:, 0].tolist():
                new_tokens[r].pop()
                reason[r] = "eos"
            if stop is not None:
                for r in (~done & ~hit_eos).nonzero()[:, 0].tolist():
                    if stop(new_tokens[r]):
                        hit_eos[r] = True
                        reason[r] = "stop_string"
            done = done | hit_eos | (max_new <= step + 1)
            if bar:
                bar.update(1)
            if bool(done.all()):
                break
            for st in states:
                idx = torch.tensor(st["idx"], device=device)
                st["mask"] = torch.cat([st["mask"], torch.ones_like(st["mask"][:, :1])], 1)
                pos = st["next_pos"]
                st["logits"], st["cache"] = st["runner"](
                    token[idx][:, None], st["mask"], pos, st["cache"], abs_pos=pos, prompt_len=st["prompt_len"],
                    rows=st["rows"], prefill=False,
                )
                st["next_pos"] = pos + 1
    finally:
        if bar:
            bar.close()
    return new_tokens, reason
