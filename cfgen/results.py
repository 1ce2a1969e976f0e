"""Result objects: factual, counterfactual (and interventional) texts side by side.

A :class:`CounterfactualResult` is a table with one row per (prompt, sample):
``len(r)``, ``r[i]`` (a :class:`ResultRow` view), ``r[2:5]`` / ``r[[0, 3]]`` (a
result with those rows) and ``for row in r`` work as for a list. ``to_records``
/ ``to_jsonl`` write plain JSON that ``from_records`` / ``from_jsonl`` read
back into an equal result; ``to_pandas`` gives a DataFrame; ``to_html`` the
notebook view.
"""

from __future__ import annotations

import html
import json
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from .sampler import Sampler

__all__ = ["CounterfactualResult", "ResultRow"]

_STREAMS = ("factual", "counterfactual", "interventional")
# Background of a token that differs from the reference text at the same step, per stream.
_MARK = {"factual": "#f9d0cd", "counterfactual": "#c8ecd2", "interventional": "#cfe0fa"}
_CELL = "text-align:left;vertical-align:top;padding:6px 10px;border-top:1px solid #e3e3e3;"
_PROSE = _CELL + "white-space:pre-wrap;overflow-wrap:anywhere;word-break:normal;line-height:1.55;"
_REQUIRED = ("prompt", "prompt_index", "sample_index", "prompt_ids", "factual_ids", "counterfactual_ids", "seed",
             "sampler", "mode", "settings")


def _first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _stable_prefix(decode, ids: list[int], text: str) -> list[str]:
    """Per-token pieces from windowed decodes (O(n) short decodes); the caller checks they concatenate to ``text``."""
    pieces, prefix, read = [], 0, 0
    for i in range(len(ids)):
        prev = decode(ids[prefix:read]) if read > prefix else ""
        new = decode(ids[prefix:i + 1])
        # A token that ends inside a multi-byte character decodes to U+FFFD: wait for the token that completes it.
        if len(new) > len(prev) and new.startswith(prev) and not new.endswith("\ufffd"):
            pieces.append(new[len(prev):])
            prefix, read = read, i + 1
        else:
            pieces.append("")
    return pieces


def _exact_pieces(decode, ids: list[int], text: str) -> list[str]:
    """Per-token pieces cut at prefix decodes that are prefixes of ``text``: concatenation is ``text`` by construction."""
    pieces, end = [], 0
    for i in range(len(ids)):
        if i == len(ids) - 1:
            cut = len(text)
        else:
            pre = decode(ids[:i + 1])
            ok = len(pre) >= end and text.startswith(pre) and not pre.endswith("\ufffd")
            cut = len(pre) if ok else end
        pieces.append(text[end:cut])
        end = cut
    return pieces


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, ensure_ascii=False))


def _sampler_from_dict(d: Any, where: str) -> Sampler:
    if isinstance(d, Sampler):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where}: 'sampler' must be a dict of Sampler settings, got {type(d).__name__}")
    try:
        return Sampler.from_dict(d) if hasattr(Sampler, "from_dict") else Sampler(**d)
    except TypeError as err:
        raise ValueError(f"{where}: 'sampler' {d!r} is not a cfgen.Sampler's settings ({err})") from None


@dataclass
class CounterfactualResult:
    """Factual and counterfactual continuations, one row per (prompt, sample).

    Everything needed to regenerate a row is recorded: the prompt ids, the
    seed, the sampler settings, the mode (``"prior"``: both texts from the same
    prior noise; ``"hindsight"``: the factual text was observed and the noise
    drawn from its posterior), the intervention schedule (``settings``) and,
    when the producing call fills it, ``provenance``: the model, the
    intervention, the sampler and processors and the library versions (see
    :mod:`cfgen.provenance`).

    A result behaves like a list of rows: ``len(r)``; ``r[i]`` is a
    :class:`ResultRow` (a view with ``factual_text``, ``counterfactual_text``,
    ``seed``, ...); ``r[a:b]`` or ``r[[i, j]]`` is a ``CounterfactualResult`` with
    those rows (prompts and ``prompt_index`` unchanged, so its records equal the
    original's records of those rows); ``for row in r`` iterates over rows.

    Texts are decoded once and cached; pickling keeps the decoded texts and
    drops the tokenizer, so a reloaded result has everything but the tokenizer.

    Example:
        >>> import cfgen
        >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
        ...     counterfactual_ids=[[5, 7]], seeds=[0], sampler=cfgen.Sampler())
        >>> r.first_divergence
        [1]
        >>> len(r), r[0].seed, r[0].counterfactual_ids
        (1, 0, [5, 7])
        >>> cfgen.CounterfactualResult.from_records(r.to_records()) == r
        True
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
    provenance: dict[str, Any] = field(default_factory=dict)
    # ids tuple -> (text, per-token pieces or None); filled by decoding, by from_records or by unpickling.
    _decoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.factual_ids)
        if not (len(self.counterfactual_ids) == len(self.seeds) == n):
            raise ValueError("factual_ids, counterfactual_ids and seeds must have one entry per row")
        if self.interventional_ids is not None and len(self.interventional_ids) != n:
            raise ValueError(f"interventional_ids has {len(self.interventional_ids)} rows, factual_ids {n}")
        self.prompt_index = self.prompt_index or list(range(n))
        self.sample_index = self.sample_index or [0] * n

    def __len__(self) -> int:
        return len(self.factual_ids)

    # ---- rows ------------------------------------------------------------
    def _row(self, i: Any) -> int:
        if isinstance(i, bool):
            raise TypeError("a row index must be an int, not a bool")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"a row index must be an int, got {type(i).__name__}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a result with {n} rows")
        return i % n

    def __getitem__(self, key: Union[int, slice, list]) -> Union[ResultRow, CounterfactualResult]:
        """``r[i]``: a :class:`ResultRow`; ``r[a:b]`` or ``r[[i, j, ...]]``: a result with those rows."""
        if isinstance(key, slice):
            return self.select(range(len(self))[key])
        if isinstance(key, (list, tuple)):
            return self.select(key)
        return ResultRow(self, self._row(key))

    def __iter__(self) -> Iterator[ResultRow]:
        return (ResultRow(self, i) for i in range(len(self)))

    def select(self, rows) -> CounterfactualResult:
        """A result with the given rows (ints, negative allowed), in that order.

        ``prompts``, ``prompt_ids``, ``settings`` and ``provenance`` are kept whole, so
        ``prompt_index`` keeps its meaning: ``r.select(rows).to_records()`` equals
        ``[r.to_records()[i] for i in rows]``.

        Example:
            >>> import cfgen
            >>> r = cfgen.CounterfactualResult(prompts=["a"], prompt_ids=[[1]], factual_ids=[[5], [6], [7]],
            ...     counterfactual_ids=[[5], [6], [8]], seeds=[0, 1, 2], sampler=cfgen.Sampler(),
            ...     prompt_index=[0, 0, 0], sample_index=[0, 1, 2])
            >>> r.select([2, 0]).seeds
            [2, 0]
        """
        idx = [self._row(i) for i in rows]
        out = CounterfactualResult(
            prompts=list(self.prompts),
            prompt_ids=[list(p) for p in self.prompt_ids],
            factual_ids=[list(self.factual_ids[i]) for i in idx],
            counterfactual_ids=[list(self.counterfactual_ids[i]) for i in idx],
            seeds=[self.seeds[i] for i in idx],
            sampler=self.sampler,
            mode=self.mode,
            interventional_ids=None if self.interventional_ids is None
            else [list(self.interventional_ids[i]) for i in idx],
            prompt_index=[self.prompt_index[i] for i in idx],
            sample_index=[self.sample_index[i] for i in idx],
            finish_reasons={k: [v[i] for i in idx] for k, v in self.finish_reasons.items()},
            settings=dict(self.settings),
            tokenizer=self.tokenizer,
            provenance=dict(self.provenance),
        )
        out._decoded = self._decoded  # same ids, same tokenizer: the cache is shared
        return out

    # ---- texts -----------------------------------------------------------
    def _text(self, ids: list[int]) -> str:
        hit = self._decoded.get(tuple(ids))
        if hit is not None:
            return hit[0]
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        self._decoded[tuple(ids)] = (text, None)
        return text

    def _pieces(self, ids: list[int]) -> Optional[list[str]]:
        """The text each token adds (``"".join(pieces) == text``); ``None`` when unknown (no tokenizer, no cache)."""
        key = tuple(ids)
        hit = self._decoded.get(key)
        if hit is not None and hit[1] is not None:
            return hit[1]
        if hit is None and self.tokenizer is None:
            return [(" " if i else "") + str(t) for i, t in enumerate(ids)]
        if self.tokenizer is None:
            return None
        self._fill_pieces([ids])
        return self._decoded[key][1]

    def _fill_pieces(self, id_lists) -> None:
        """Decode every listed sequence and its per-token pieces, single tokens in one batch."""
        tok = self.tokenizer
        todo = {}
        for ids in id_lists:
            key = tuple(ids)
            hit = self._decoded.get(key)
            if key not in todo and (hit is None or hit[1] is None):
                todo[key] = hit[0] if hit is not None else None
        if not todo or tok is None:
            return

        def decode(x):
            return tok.decode(list(x), skip_special_tokens=False)

        uniq = sorted({t for key in todo for t in key})
        if hasattr(tok, "batch_decode"):
            single = dict(zip(uniq, tok.batch_decode([[t] for t in uniq], skip_special_tokens=False)))
        else:
            single = {t: decode([t]) for t in uniq}
        for key, text in todo.items():
            ids = list(key)
            text = decode(ids) if text is None else text
            pieces = [single[t] for t in ids]
            if "".join(pieces) != text:  # leading-space rules, split characters, cleanup: window-decode instead
                pieces = _stable_prefix(decode, ids, text)
                if "".join(pieces) != text:
                    pieces = _exact_pieces(decode, ids, text)
            self._decoded[key] = (text, pieces)

    def _texts(self, name: str) -> Optional[list[str]]:
        seqs = getattr(self, f"{name}_ids")
        if seqs is None:
            return None
        tok = self.tokenizer
        todo = list({tuple(t): None for t in seqs if tuple(t) not in self._decoded})
        if todo and tok is not None and hasattr(tok, "batch_decode"):  # one call: fast tokenizers decode in parallel
            for key, text in zip(todo, tok.batch_decode([list(k) for k in todo], skip_special_tokens=False)):
                self._decoded[key] = (text, None)
        return [self._text(t) for t in seqs]

    @property
    def factual_texts(self) -> list[str]:
        return self._texts("factual")

    @property
    def counterfactual_texts(self) -> list[str]:
        return self._texts("counterfactual")

    @property
    def interventional_texts(self) -> Optional[list[str]]:
        return self._texts("interventional")

    @property
    def first_divergence(self) -> list[Optional[int]]:
        """First generation step where factual and counterfactual tokens differ (None: identical)."""
        return [_first_divergence(a, b) for a, b in zip(self.factual_ids, self.counterfactual_ids)]

    @property
    def interventional_divergence(self) -> Optional[list[Optional[int]]]:
        """First step where the interventional tokens differ from the factual ones (None: identical); None without them."""
        if self.interventional_ids is None:
            return None
        return [_first_divergence(a, b) for a, b in zip(self.factual_ids, self.interventional_ids)]

    @property
    def identical(self) -> list[bool]:
        return [d is None for d in self.first_divergence]

    def metrics(self) -> dict[str, Any]:
        """Effect metrics over all rows (see :mod:`cfgen.metrics`)."""
        from .metrics import effect_summary

        summary = effect_summary(self.factual_ids, self.counterfactual_ids)
        return summary.to_dict() if hasattr(summary, "to_dict") else summary

    # ---- pickling --------------------------------------------------------
    def _all_ids(self) -> list[list[int]]:
        return [*self.factual_ids, *self.counterfactual_ids, *(self.interventional_ids or [])]

    def __getstate__(self) -> dict[str, Any]:
        # The tokenizer (MBs, often unpicklable) stays behind; the decoded texts and pieces travel instead.
        self._fill_pieces(self._all_ids())
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("tokenizer", "_decoded")}
        keys = {tuple(ids) for ids in self._all_ids()}
        state["_decoded"] = {k: v for k, v in self._decoded.items() if k in keys}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_decoded", {})
        self.__dict__.setdefault("provenance", {})
        self.tokenizer = None

    # ---- export ----------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per row, with everything needed to regenerate it.

        Keys: ``prompt``, ``prompt_index``, ``sample_index``, ``prompt_ids``, per stream
        (``factual``, ``counterfactual`` and, when sampled, ``interventional``) the text,
        ``<stream>_ids``, ``<stream>_tokens`` (the text each token adds; they concatenate
        to the text, a token ending inside a character adds ``""``) and
        ``<stream>_finish``; ``first_divergence`` (and ``interventional_divergence``,
        against the factual text); ``seed``, ``sampler``, ``mode``, ``settings`` and
        ``provenance``. :meth:`from_records` reads them back.
        """
        self._fill_pieces(self._all_ids())
        settings, provenance = _json_normal(self.settings), _json_normal(self.provenance)
        sampler = self.sampler.to_dict()
        first, inter_first = self.first_divergence, self.interventional_divergence
        records = []
        for r in range(len(self)):
            p = self.prompt_index[r]
            rec: dict[str, Any] = {
                "prompt": self.prompts[p],
                "prompt_index": p,
                "sample_index": self.sample_index[r],
                "prompt_ids": list(self.prompt_ids[p]),
            }
            for name in _STREAMS:
                seqs = getattr(self, f"{name}_ids")
                if seqs is None:
                    continue
                rec[name] = self._text(seqs[r])
                rec[f"{name}_ids"] = list(seqs[r])
                rec[f"{name}_tokens"] = self._pieces(seqs[r])
            rec["first_divergence"] = first[r]
            if inter_first is not None:
                rec["interventional_divergence"] = inter_first[r]
            rec.update(seed=self.seeds[r], sampler=sampler, mode=self.mode, settings=settings,
                       provenance=provenance)
            for name, reasons in self.finish_reasons.items():
                rec[f"{name}_finish"] = reasons[r]
            records.append(rec)
        return records

    def to_jsonl(self, path_or_file) -> None:
        """Write :meth:`to_records` as JSON lines to a path or an open text file."""
        lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in self.to_records())
        if hasattr(path_or_file, "write"):
            path_or_file.write(lines)
            return
        with open(path_or_file, "w", encoding="utf-8") as f:
            f.write(lines)

    @classmethod
    def from_records(cls, records) -> CounterfactualResult:
        """The result that :meth:`to_records` wrote (texts from the records; no tokenizer).

        Every record must come from one result: the same ``sampler``, ``mode``,
        ``settings`` and ``provenance``, one prompt text and ids per ``prompt_index``.
        Prompts never referenced (e.g. after slicing) come back as ``""`` / ``[]``.

        Raises:
            ValueError: a missing key, records from different results, or a
                ``first_divergence`` that its token ids contradict (the record was edited).

        Example:
            >>> import cfgen
            >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
            ...     counterfactual_ids=[[5, 7]], seeds=[3], sampler=cfgen.Sampler(top_k=4))
            >>> back = cfgen.CounterfactualResult.from_records(r.to_records())
            >>> back == r, back.sampler.top_k, back.counterfactual_texts == r.counterfactual_texts
            (True, 4, True)
        """
        records = list(records)
        if not records:
            raise ValueError("no records: from_records needs at least one record written by to_records")
        first = records[0]
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(f"record {i} is a {type(rec).__name__}, not a dict written by to_records")
            missing = [k for k in _REQUIRED if k not in rec]
            if missing:
                raise ValueError(f"record {i} lacks {missing}: not a CounterfactualResult record (to_records)")
            for key in ("sampler", "mode", "settings", "provenance"):
                a, b = rec.get(key, {}), first.get(key, {})
                if a != b:
                    which = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) \
                        if isinstance(a, dict) and isinstance(b, dict) else []
                    raise ValueError(f"record {i} has another {key!r} than record 0"
                                     + (f" (differs in {which})" if which else "")
                                     + ": from_records reads the records of one result; result-level entries "
                                     "must be equal in every record")
        streams = [s for s in _STREAMS if f"{s}_ids" in first]
        finish = [k[:-len("_finish")] for k in first if k.endswith("_finish")]
        for i, rec in enumerate(records):
            if [s for s in _STREAMS if f"{s}_ids" in rec] != streams:
                raise ValueError(f"record {i} has other streams than record 0 ({streams})")
            if [k[:-len("_finish")] for k in rec if k.endswith("_finish")] != finish:
                raise ValueError(f"record {i} has other finish reasons than record 0 ({finish})")
        n_prompts = max(int(rec["prompt_index"]) for rec in records) + 1
        prompts: list[Optional[str]] = [None] * n_prompts
        prompt_ids: list[Optional[list[int]]] = [None] * n_prompts
        for i, rec in enumerate(records):
            p = rec["prompt_index"]
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ValueError(f"record {i}: prompt_index must be an int >= 0, got {p!r}")
            if prompts[p] is None:
                prompts[p], prompt_ids[p] = rec["prompt"], list(rec["prompt_ids"])
            elif prompts[p] != rec["prompt"] or prompt_ids[p] != list(rec["prompt_ids"]):
                raise ValueError(f"record {i}: prompt_index {p} names another prompt than an earlier record")
        out = cls(
            prompts=["" if p is None else p for p in prompts],
            prompt_ids=[[] if p is None else p for p in prompt_ids],
            factual_ids=[list(rec["factual_ids"]) for rec in records],
            counterfactual_ids=[list(rec["counterfactual_ids"]) for rec in records],
            interventional_ids=[list(rec["interventional_ids"]) for rec in records]
            if "interventional" in streams else None,
            seeds=[rec["seed"] for rec in records],
            sampler=_sampler_from_dict(first["sampler"], "record 0"),
            mode=first["mode"],
            prompt_index=[rec["prompt_index"] for rec in records],
            sample_index=[rec["sample_index"] for rec in records],
            finish_reasons={name: [rec[f"{name}_finish"] for rec in records] for name in finish},
            settings=first["settings"],
            provenance=first.get("provenance", {}),
        )
        for i, (rec, d) in enumerate(zip(records, out.first_divergence)):
            if "first_divergence" in rec and rec["first_divergence"] != d:
                raise ValueError(f"record {i}: first_divergence {rec['first_divergence']} but its token ids "
                                 f"diverge at {d}; the record was edited")
            for name in streams:
                ids = tuple(rec[f"{name}_ids"])
                text, pieces = rec.get(name), rec.get(f"{name}_tokens")
                if text is None:
                    continue
                if pieces is not None and (len(pieces) != len(ids) or "".join(pieces) != text):
                    raise ValueError(f"record {i}: {name}_tokens do not match {name}_ids / {name} text")
                out._decoded[ids] = (text, None if pieces is None else list(pieces))
        return out

    @classmethod
    def from_jsonl(cls, path_or_file) -> CounterfactualResult:
        """Read what :meth:`to_jsonl` wrote (a path or an open text file); see :meth:`from_records`.

        Example:
            >>> import cfgen, io
            >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
            ...     counterfactual_ids=[[5, 7]], seeds=[0], sampler=cfgen.Sampler())
            >>> f = io.StringIO(); r.to_jsonl(f); _ = f.seek(0)
            >>> cfgen.CounterfactualResult.from_jsonl(f) == r
            True
        """
        if hasattr(path_or_file, "read"):
            lines = path_or_file.read().splitlines()
            where = "the file"
        else:
            with open(os.fspath(path_or_file), encoding="utf-8") as f:
                lines = f.read().splitlines()
            where = os.fspath(path_or_file)
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}, line {n}: not JSON ({err.msg}); expected lines written by to_jsonl") \
                    from None
        return cls.from_records(records)

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per result row and one column per :meth:`to_records` key.

        ``sampler``, ``settings`` and ``provenance`` stay dicts (object columns).

        Example:
            >>> import cfgen
            >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
            ...     counterfactual_ids=[[5, 7]], seeds=[0], sampler=cfgen.Sampler())
            >>> r.to_pandas()[["seed", "first_divergence"]].values.tolist()
            [[0, 1]]
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("CounterfactualResult.to_pandas needs pandas: pip install pandas "
                              "(or use to_records(), which needs nothing)") from None
        return pd.DataFrame.from_records(self.to_records())

    # ---- display ---------------------------------------------------------
    def _marked(self, ids: list[int], at: Optional[int]) -> str:
        pieces = self._pieces(ids)
        if pieces is None or at is None:
            return self._text(ids) + ("" if at is None else "  (split unknown: no tokenizer)")
        same, rest = "".join(pieces[:at]), "".join(pieces[at:])
        return same + (f"⟦{rest}⟧" if rest else "")

    def __repr__(self) -> str:
        lines = [f"CounterfactualResult({len(self)} rows, mode={self.mode}, sampler: {self.sampler.describe()})"]
        shown = min(len(self), 8)
        self._fill_pieces([ids for name in _STREAMS if getattr(self, f"{name}_ids") is not None
                           for ids in getattr(self, f"{name}_ids")[:shown]])
        first, inter_first = self.first_divergence, self.interventional_divergence
        for r in range(shown):
            d = first[r]
            p = self.prompt_index[r]
            prompt = self.prompts[p] if len(self.prompts[p]) <= 70 else "…" + self.prompts[p][-69:]
            lines.append(f"[{r}] prompt {p} seed {self.seeds[r]}: {prompt!r}")
            streams = [("factual", self.factual_ids[r], d), ("counterfactual", self.counterfactual_ids[r], d)]
            if inter_first is not None:
                streams.append(("interventional", self.interventional_ids[r], inter_first[r]))
            for label, ids, at in streams:
                lines.append(f"    {label:>14}: {self._marked(ids, at)}")
            status = "identical" if d is None else f"diverges at step {d} (⟦…⟧ marks the divergence)"
            if inter_first is not None:
                di = inter_first[r]
                status += "; interventional " + ("identical to factual" if di is None
                                                 else f"differs from factual from step {di}")
            lines.append("    " + status)
        if len(self) > 8:
            lines.append(f"... {len(self) - 8} more rows")
        return "\n".join(lines)

    def _html_tokens(self, ids: list[int], ref: list[int], at: Optional[int], colour: str) -> str:
        """Shared prefix plain; from the divergence on one span per token, highlighted where it differs from ``ref``."""
        esc = html.escape
        pieces = self._pieces(ids)
        if pieces is None:
            return esc(self._text(ids))
        if at is None:
            return esc("".join(pieces))
        out = [esc("".join(pieces[:at])), "<span style='border-left:2px solid #888;margin-left:1px'></span>"]
        for t in range(at, len(ids)):
            differs = t >= len(ref) or ref[t] != ids[t]
            style = (f"background:{colour};color:#111;border-radius:2px;box-shadow:inset 0 -1px #0003" if differs
                     else "border-bottom:1px dotted #999")
            title = f"step {t}, token {ids[t]}" + (" (differs)" if differs else " (same token as the reference)")
            out.append(f"<span style='{style}' title='{esc(title)}'>{esc(pieces[t])}</span>")
        return "".join(out)

    def to_html(self, max_rows: Optional[int] = 20) -> str:
        """The result as one HTML table (inline styles, no scripts), readable in Jupyter and a browser.

        Each prompt is shown once, collapsible, above its rows. In every text the
        part shared with the reference is plain; from the first divergence each
        token is its own span and tokens that differ from the reference *at the
        same step* (same noise) are highlighted: factual vs counterfactual,
        counterfactual vs factual, interventional vs factual. Hover a token for
        its step and id. All model text is HTML-escaped.

        Args:
            max_rows: rows shown at most (``None``: all); a last line counts the others.

        Example:
            >>> import cfgen
            >>> r = cfgen.CounterfactualResult(prompts=["<script>x</script>"], prompt_ids=[[1]], factual_ids=[[5, 6]],
            ...     counterfactual_ids=[[5, 7]], seeds=[0], sampler=cfgen.Sampler())
            >>> "&lt;script&gt;" in r.to_html() and "<script" not in r.to_html()
            True
        """
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0):
            raise ValueError(f"max_rows must be an int >= 0 or None (all rows), got {max_rows!r}")
        esc = html.escape
        n = len(self)
        shown = n if max_rows is None else min(n, max_rows)
        has_inter = self.interventional_ids is not None
        self._fill_pieces([ids for name in _STREAMS if getattr(self, f"{name}_ids") is not None
                           for ids in getattr(self, f"{name}_ids")[:shown]])
        first, inter_first = self.first_divergence, self.interventional_divergence
        heads = ["row", "factual", "counterfactual"] + (["interventional"] if has_inter else []) + ["diverges"]
        widths = ["4.5em"] + ["auto"] * (3 if has_inter else 2) + ["7.5em"]
        ncol = len(heads)
        th = "text-align:left;padding:6px 10px;border-bottom:2px solid #bbb;font-weight:600;"
        head = "".join(f"<th style='{th}width:{w}'>{h}</th>" for h, w in zip(heads, widths))
        body, last_prompt = [], None
        for r in range(shown):
            p = self.prompt_index[r]
            if p != last_prompt:
                last_prompt = p
                body.append(self._html_prompt(p, ncol))
            d, fact, cf = first[r], self.factual_ids[r], self.counterfactual_ids[r]
            cells = [f"<td style='{_CELL}color:#666'>{r}<br><span style='font-size:11px'>seed {self.seeds[r]}</span>"
                     + (f"<br><span style='font-size:11px'>sample {self.sample_index[r]}</span>"
                        if self.sample_index[r] else "") + "</td>",
                     f"<td style='{_PROSE}'>{self._html_tokens(fact, cf, d, _MARK['factual'])}</td>",
                     f"<td style='{_PROSE}'>{self._html_tokens(cf, fact, d, _MARK['counterfactual'])}</td>"]
            status = "identical" if d is None else f"step {d}"
            if has_inter:
                di, inter = inter_first[r], self.interventional_ids[r]
                cells.append(f"<td style='{_PROSE}'>{self._html_tokens(inter, fact, di, _MARK['interventional'])}</td>")
                status += "<br><span style='color:#666'>interv.: " + ("identical" if di is None else f"step {di}") \
                    + "</span>"
            reasons = [f"{k}: {v[r]}" for k, v in self.finish_reasons.items()]
            cells.append(f"<td style='{_CELL}' title='{esc('; '.join(reasons))}'>{status}</td>")
            body.append("<tr style='background:transparent'>" + "".join(cells) + "</tr>")
        if shown < n:
            body.append(f"<tr><td colspan='{ncol}' style='{_CELL}color:#666;font-style:italic'>… and {n - shown} more "
                        f"row{'s' if n - shown != 1 else ''} (to_html(max_rows=None) shows all)</td></tr>")
        legend = " ".join(
            f"<span style='background:{_MARK[s]};color:#111;padding:0 4px;border-radius:2px'>{s}</span>"
            for s in _STREAMS if s != "interventional" or has_inter)
        refs = "factual vs counterfactual; counterfactual" + (" and interventional" if has_inter else "") + " vs factual"
        caption = (f"<caption style='caption-side:top;text-align:left;padding:4px 0 8px;color:#444'>"
                   f"<b>CounterfactualResult</b>: {n} row{'s' if n != 1 else ''}, mode={esc(self.mode)}; sampler: "
                   f"{esc(self.sampler.describe())}<br><span style='font-size:12px'>After the first divergence "
                   f"(<span style='border-left:2px solid #888'></span>) each token is marked: {legend} a different "
                   f"token than the reference at the same step ({refs}); <span style='border-bottom:1px dotted #999'>dotted</span> the same "
                   "token. Hover a token for its step and id.</span></caption>")
        return ("<div style='text-align:left;font-family:system-ui,-apple-system,\"Segoe UI\",sans-serif;"
                "font-size:13px;max-width:100%;overflow-x:auto'>"
                "<table style='border-collapse:collapse;width:100%;table-layout:auto;margin:0;text-align:left'>"
                f"{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")

    def _html_prompt(self, p: int, ncol: int) -> str:
        esc = html.escape
        text = self.prompts[p]
        tail = text if len(text) <= 90 else "…" + text[-89:]
        tail = " ".join(tail.split())  # one line in the summary; the full prompt keeps its layout below
        n_tok = len(self.prompt_ids[p]) if p < len(self.prompt_ids) else 0
        return (f"<tr style='background:#f6f6f6'><td colspan='{ncol}' style='{_CELL}border-top:2px solid #ccc'>"
                f"<details><summary style='cursor:pointer;color:#333'><b>prompt {p}</b> "
                f"<span style='color:#777'>({n_tok} tokens)</span> <span style='font-family:ui-monospace,monospace;"
                f"font-size:12px'>{esc(tail)}</span></summary>"
                f"<div style='white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;"
                f"font-size:12px;margin:6px 0 2px;padding:6px;background:#fff;border:1px solid #e3e3e3'>"
                f"{esc(text)}</div></details></td></tr>")

    def _repr_html_(self) -> str:
        return self.to_html()


class ResultRow:
    """One row of a :class:`CounterfactualResult` (``result[i]``): a view, not a copy.

    Attributes are the row's entries: ``prompt``, ``prompt_ids``, ``prompt_index``,
    ``sample_index``, ``seed``, ``factual_ids`` / ``factual_text``,
    ``counterfactual_ids`` / ``counterfactual_text``, ``interventional_ids`` /
    ``interventional_text`` (None when not sampled), ``first_divergence``,
    ``interventional_divergence``, ``identical``, ``finish_reasons`` (stream -> reason);
    ``to_record()`` is the row's :meth:`CounterfactualResult.to_records` entry and
    ``result`` / ``index`` say where it comes from.

    Example:
        >>> import cfgen
        >>> r = cfgen.CounterfactualResult(prompts=["Hi"], prompt_ids=[[1]], factual_ids=[[5, 6]],
        ...     counterfactual_ids=[[5, 7]], seeds=[9], sampler=cfgen.Sampler())
        >>> row = r[-1]
        >>> row.index, row.seed, row.first_divergence, row.identical
        (0, 9, 1, False)
    """

    __slots__ = ("result", "index")

    def __init__(self, result: CounterfactualResult, index: int) -> None:
        self.result, self.index = result, index

    def _get(self, name: str):
        seqs = getattr(self.result, name)
        return None if seqs is None else seqs[self.index]

    prompt_index = property(lambda self: self.result.prompt_index[self.index])
    sample_index = property(lambda self: self.result.sample_index[self.index])
    seed = property(lambda self: self.result.seeds[self.index])
    prompt = property(lambda self: self.result.prompts[self.prompt_index])
    prompt_ids = property(lambda self: self.result.prompt_ids[self.prompt_index])
    factual_ids = property(lambda self: self._get("factual_ids"))
    counterfactual_ids = property(lambda self: self._get("counterfactual_ids"))
    interventional_ids = property(lambda self: self._get("interventional_ids"))

    @property
    def factual_text(self) -> str:
        return self.result._text(self.factual_ids)

    @property
    def counterfactual_text(self) -> str:
        return self.result._text(self.counterfactual_ids)

    @property
    def interventional_text(self) -> Optional[str]:
        ids = self.interventional_ids
        return None if ids is None else self.result._text(ids)

    @property
    def first_divergence(self) -> Optional[int]:
        return _first_divergence(self.factual_ids, self.counterfactual_ids)

    @property
    def interventional_divergence(self) -> Optional[int]:
        ids = self.interventional_ids
        return None if ids is None else _first_divergence(self.factual_ids, ids)

    @property
    def identical(self) -> bool:
        return self.first_divergence is None

    @property
    def finish_reasons(self) -> dict[str, str]:
        return {k: v[self.index] for k, v in self.result.finish_reasons.items()}

    def to_record(self) -> dict[str, Any]:
        """This row's :meth:`CounterfactualResult.to_records` entry."""
        return self.result.select([self.index]).to_records()[0]

    def __repr__(self) -> str:
        return repr(self.result.select([self.index])).replace("CounterfactualResult(1 rows",
                                                               f"ResultRow(row {self.index}", 1)

    def _repr_html_(self) -> str:
        return self.result.select([self.index]).to_html()
