"""The sampler hook: HF greedy decoding that is Gumbel-max sampling with cfgen's noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch
from transformers import LogitsProcessor

from .noise import gumbel_noise
from .sampler import Sampler

__all__ = ["SamplerHook"]


class SamplerHook(LogitsProcessor):
    """A ``LogitsProcessor`` that turns greedy ``generate`` into noise-explicit sampling.

    It returns ``sampler.log_probs(scores) + U`` with ``U = gumbel_noise(seeds, step, V)``,
    so ``model.generate(do_sample=False, logits_processor=[hook])`` draws exactly
    what Gumbel-max sampling with cfgen's noise draws. ``step`` is the generation
    step (0 for the first new token) for every row, whatever the left padding,
    because it is counted from the length of the prompt batch.

    Args:
        sampler: the sampler; its temperature / top-k / top-p replace HF's warpers.
        seeds: an int (every row) or an int64 tensor ``[B]``.
        noise: optional ``step -> Tensor[B, V]`` overriding the prior noise (e.g.
            posterior noise for hindsight replay).

    The hook re-arms itself (steps count from 0 again) whenever the ``input_ids`` it
    sees are not the previous call's ``input_ids`` plus one token per row: a new
    ``generate`` call with a longer, shorter or different prompt, or another batch
    size. A ``generate`` call that continues exactly from the previous call's output
    therefore continues the steps, and draws what one longer call would have drawn;
    call :meth:`reset` to start from step 0 anyway. ``steps_seen`` records the steps
    since the last re-arm.

    Example:
        >>> import cfgen, transformers, torch
        >>> cfg = transformers.GPT2Config(vocab_size=16, n_layer=1, n_head=2, n_embd=8)
        >>> model = transformers.GPT2LMHeadModel(cfg).eval()
        >>> hook = cfgen.SamplerHook(cfgen.Sampler(temperature=1.0), seeds=7)
        >>> out = model.generate(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
        ...     do_sample=False, max_new_tokens=3, logits_processor=[hook], pad_token_id=0)
        >>> hook.steps_seen
        [0, 1, 2]
    """

    def __init__(
        self,
        sampler: Sampler = Sampler(),
        seeds: Union[int, torch.Tensor] = 0,
        *,
        noise: Optional[Callable[[int], torch.Tensor]] = None,
    ):
        self.sampler = sampler
        self.seeds = seeds
        self.noise = noise
        self._prompt_length: Optional[int] = None
        self._last_ids: Optional[torch.Tensor] = None
        self.steps_seen: list[int] = []

    def reset(self) -> None:
        """Start counting steps from 0 at the next call."""
        self._prompt_length, self._last_ids, self.steps_seen = None, None, []

    def _continues(self, input_ids: torch.Tensor) -> bool:
        # Within one generate call each call sees the previous input_ids plus one token per row;
        # anything else (length alone is ambiguous: a new prompt can be one token longer) starts anew.
        last = self._last_ids
        return (
            last is not None
            and input_ids.shape[0] == last.shape[0]
            and input_ids.shape[1] == last.shape[1] + 1
            and torch.equal(input_ids[:, :-1], last.to(input_ids.device))
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if self._prompt_length is None or not self._continues(input_ids):
            self._prompt_length, self.steps_seen = length, []
        self._last_ids = input_ids.detach().clone()
        step = length - self._prompt_length
        self.steps_seen.append(step)
        if self.noise is not None:
            u = self.noise(step).to(scores.device)
        else:
            seeds = self.seeds
            if isinstance(seeds, torch.Tensor) and seeds.numel() != scores.shape[0]:
                raise ValueError(f"SamplerHook has {seeds.numel()} seeds for a batch of {scores.shape[0]} rows")
            u = gumbel_noise(seeds, step, scores.shape[-1], device=scores.device)
            u = u.expand(scores.shape[0], -1)
        return self.sampler.log_probs(scores) + u
