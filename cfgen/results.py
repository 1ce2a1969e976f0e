"""Result objects: factual and counterfactual texts side by side."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .sampler import Sampler

__all__ = ["CounterfactualResult"]


def _first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class CounterfactualResult:
    """Factual and counterfactual continuations, one row per (prompt, sample).

    Everything needed to regenerate a row is recorded: the prompt ids, the
    seed, the sampler settings, the mode (``"prior"``: both texts from the same
    prior noise; ``"hindsight"``: the factual text was observed and the noise
    drawn from its posterior) and the intervention schedule.

    Example:
        >>> import cfgen
        >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
        ...     counterfactual_ids=[[5, 7]], seeds=[0], sampler=cfgen.Sampler())
        >>> r.first_divergence
        [1]
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    factual_ids: list[list[int]]
    counterfactual_ids: list[list[int]]
    seeds: list[int]
    sampler: Sampler
    mode: str = "prior"
    interventional_ids: Optional[list[list[int]]] = None
    prompt_index: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    finish_reasons: dict[str, list[str]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.factual_ids)
        if not (len(self.counterfactual_ids) == len(self.seeds) == n):
            raise ValueError("factual_ids, counterfactual_ids and seeds must have one entry per row")
        self.prompt_index = self.prompt_index or list(range(n))
        self.sample_index = self.sample_index or [0] * n

    def __len__(self) -> int:
        return len(self.factual_ids)

    # ---- texts -----------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def factual_texts(self) -> list[str]:
        return [self._decode(t) for t in self.factual_ids]

    @property
    def counterfactual_texts(self) -> list[str]:
        return [self._decode(t) for t in self.counterfactual_ids]

    @property
    def interventional_texts(self) -> Optional[list[str]]:
        return None if self.interventional_ids is None else [self._decode(t) for t in self.interventional_ids]

    @property
    def first_divergence(self) -> list[Optional[int]]:
        """First generation step where factual and counterfactual tokens differ (None: identical)."""
        return [_first_divergence(a, b) for a, b in zip(self.factual_ids, self.counterfactual_ids)]

    @property
    def identical(self) -> list[bool]:
        return [d is None for d in self.first_divergence]

    def metrics(self) -> dict[str, Any]:
        """Effect metrics over all rows (see :mod:`cfgen.metrics`)."""
        from .metrics import effect_summary

        summary = effect_summary(self.factual_ids, self.counterfactual_ids)
        return summary.to_dict() if hasattr(summary, "to_dict") else summary

    # ---- export ----------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per row, with everything needed to regenerate it."""
        records = []
        fact, cf = self.factual_texts, self.counterfactual_texts
        inter = self.interventional_texts
        for r in range(len(self)):
            p = self.prompt_index[r]
            rec = {
                "prompt": self.prompts[p],
                "prompt_index": p,
                "sample_index": self.sample_index[r],
                "prompt_ids": self.prompt_ids[p],
                "factual": fact[r],
                "counterfactual": cf[r],
                "factual_ids": self.factual_ids[r],
                "counterfactual_ids": self.counterfactual_ids[r],
                "first_divergence": self.first_divergence[r],
                "seed": self.seeds[r],
                "sampler": self.sampler.to_dict(),
                "mode": self.mode,
                "settings": self.settings,
            }
            if inter is not None:
                rec["interventional"] = inter[r]
                rec["interventional_ids"] = self.interventional_ids[r]
            for name, reasons in self.finish_reasons.items():
                rec[f"{name}_finish"] = reasons[r]
            records.append(rec)
        return records

    def to_jsonl(self, path) -> None:
        """Write :meth:`to_records` as JSON lines."""
        with open(path, "w", encoding="utf-8") as f:
            for rec in self.to_records():
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    # ---- display ---------------------------------------------------------
    def _split(self, ids: list[int], at: Optional[int]) -> tuple[str, str]:
        if at is None:
            return self._decode(ids), ""
        return self._decode(ids[:at]), self._decode(ids[at:])

    def __repr__(self) -> str:
        lines = [f"CounterfactualResult({len(self)} rows, mode={self.mode}, sampler: {self.sampler.describe()})"]
        for r in range(min(len(self), 8)):
            d = self.first_divergence[r]
            p = self.prompt_index[r]
            prompt = self.prompts[p] if len(self.prompts[p]) <= 70 else "…" + self.prompts[p][-69:]
            lines.append(f"[{r}] prompt {p} seed {self.seeds[r]}: {prompt!r}")
            for label, ids in (("factual", self.factual_ids[r]), ("counterfactual", self.counterfactual_ids[r])):
                same, rest = self._split(ids, d)
                lines.append(f"    {label:>14}: {same}" + (f"⟦{rest}⟧" if rest else ""))
            lines.append("    " + ("identical" if d is None else f"diverges at step {d} (⟦…⟧ marks the divergence)"))
        if len(self) > 8:
            lines.append(f"... {len(self) - 8} more rows")
        return "\n".join(lines)

    def to_html(self) -> str:
        """An HTML table (inline styles, no JavaScript) with the divergent part highlighted."""
        esc = html.escape
        rows = []
        for r in range(len(self)):
            d = self.first_divergence[r]
            p = self.prompt_index[r]
            cells = []
            for ids, colour in ((self.factual_ids[r], "#fde2e1"), (self.counterfactual_ids[r], "#dff3e4")):
                same, rest = self._split(ids, d)
                cells.append(
                    f"<td style='vertical-align:top;white-space:pre-wrap'>{esc(same)}"
                    + (f"<span style='background:{colour}'>{esc(rest)}</span>" if rest else "")
                    + "</td>"
                )
            status = "identical" if d is None else f"step {d}"
            rows.append(
                f"<tr><td style='vertical-align:top'>{r}</td><td style='vertical-align:top;white-space:pre-wrap'>"
                f"<b>{esc(self.prompts[p])}</b></td>{''.join(cells)}<td style='vertical-align:top'>{self.seeds[r]}</td>"
                f"<td style='vertical-align:top'>{status}</td></tr>"
            )
        head = "".join(f"<th style='text-align:left'>{h}</th>"
                       for h in ("#", "prompt", "factual", "counterfactual", "seed", "diverges"))
        caption = esc(f"mode={self.mode}; sampler: {self.sampler.describe()}")
        return (f"<table style='border-collapse:collapse;font-family:sans-serif;font-size:13px'>"
                f"<caption style='text-align:left'>{caption}</caption><tr>{head}</tr>{''.join(rows)}</table>")

    def _repr_html_(self) -> str:
        return self.to_html()
