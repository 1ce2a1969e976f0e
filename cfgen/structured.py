"""Structured generation of records (e.g. census profiles) with well-defined field interventions.

A record is a fixed sequence of fields. Each field is written as a **forced
label** (e.g. ``"Sex:"``, fed to the model as context, never sampled) followed
by a **sampled value** that ends at the first sampled token whose text contains
a newline::

    <prompt>Sex: Female\\nRace: Asian\\nAge: 34\\n...

Because only values are sampled, ``do(field = value)`` is well defined: keep the
earlier fields, set the field's value tokens, and regenerate the later fields'
values with the same noise at the same generation steps (the noise-matched
counterfactual), or with fresh noise (the interventional baseline).

**Generation steps.** Value token ``j`` (from 0) of field ``i`` (from 0) is
drawn with the noise of generation step ``i * max_value_tokens + j``: each
field owns a fixed block of ``max_value_tokens`` steps. A value that becomes
longer or shorter under an intervention therefore never shifts the noise of
later fields: field ``i``'s value always starts at step ``i * max_value_tokens``.
Label tokens and forced newlines consume no steps.

**Forced tokens.** Labels are tokenized once, on their own; a value that ends
without a newline (it reached ``max_value_tokens`` tokens, or the model sampled
EOS, which is dropped) is followed by a forced newline so the next label starts
a new line. ``Records.finish`` says how each value ended (``"newline"``,
``"length"``, ``"eos"``, ``"set"`` for an intervened value).

**Parsing.** ``Records.values`` gives each value's text up to its first newline,
stripped; an empty value is ``None``. ``Records.parsed()`` applies the schema's
per-field parsers (e.g. :func:`parse_number`, :func:`choice`); a parser that
raises ``ValueError`` or returns ``None`` marks the value unparseable, and
``Records.unparseable()`` counts them per field.

The loop keeps one KV cache per batch across fields (labels are fed, values
are sampled, rows wait with masked padding while others finish their value),
so a batch costs one prefill (rows that share a prompt prefill it once) and
about one batched forward per value token. Models: a plain Hugging Face causal LM, or a ``(factual_model,
counterfactual_model)`` pair of them (the second regenerates under
:func:`do_field`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from . import engine as E
from .engine import INTERVENTIONAL
from .noise import PRIOR
from .sampler import Sampler

__all__ = ["Schema", "Records", "FieldCounterfactual", "generate_records", "do_field", "parse_number", "choice"]

Prompt = Union[str, Sequence[int]]
Value = Union[str, Sequence[int], Callable[[dict], str]]


# ----------------------------------------------------------------- parsers --
_NUM = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_SCALE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "mn": 1e6, "million": 1e6, "b": 1e9, "billion": 1e9}


def parse_number(text: str) -> float:
    """The first number in ``text``: ``"$45,000"``, ``"45k"``, ``"1.2 million per year"``, ``"34 years"``.

    Thousands separators and currency signs are ignored; a ``k`` / ``thousand`` /
    ``m`` / ``million`` / ``b`` / ``billion`` right after the number scales it.

    Raises:
        ValueError: there is no number in ``text``.

    Example:
        >>> parse_number("$45,000 per year"), parse_number("about 52k"), parse_number("1.5 million")
        (45000.0, 52000.0, 1500000.0)
    """
    m = _NUM.search(text)
    if m is None:
        raise ValueError(f"no number in {text!r}")
    value = float(m.group().replace(",", ""))
    unit = re.match(r"\s*([a-zA-Z]+)", text[m.end():])
    if unit and unit.group(1).lower() in _SCALE:
        value *= _SCALE[unit.group(1).lower()]
    return value


def choice(options: Mapping[str, Sequence[str]]) -> Callable[[str], Optional[str]]:
    """A parser mapping text to one of ``options``' keys, by case-insensitive whole-word synonyms.

    ``options`` maps each canonical value to its synonyms (the key itself always
    counts). The earliest match in the text wins; no match returns ``None``
    (unparseable).

    Example:
        >>> sex = choice({"Male": ["man", "m"], "Female": ["woman", "f"]})
        >>> sex(" female."), sex("Man"), sex("unknown")
        ('Female', 'Male', None)
    """
    pats = []
    for key, syns in options.items():
        for s in [key, *syns]:
            pats.append((re.compile(r"(?<![A-Za-z])" + re.escape(s.lower()) + r"(?![A-Za-z])"), key))

    def parse(text: str) -> Optional[str]:
        low = text.lower()
        hits = [(m.start(), -len(p.pattern), key) for p, key in pats if (m := p.search(low))]
        return min(hits)[2] if hits else None

    return parse


# ------------------------------------------------------------------ schema --
@dataclass(frozen=True)
class Schema:
    """The fields of a record, their forced labels, and each value's token budget.

    Args:
        fields: field names, in generation order.
        labels: the forced label text of each field (default ``"<name>:"``).
        max_value_tokens: the most tokens a value may have; also the size of each
            field's block of noise steps (field ``i`` uses steps
            ``i * max_value_tokens ...``).
        parsers: optional ``{field: text -> value}`` used by :meth:`Records.parsed`.

    Example:
        >>> s = Schema(["Sex", "Age"], max_value_tokens=6, parsers={"Age": parse_number})
        >>> s.labels, s.steps("Age")
        (('Sex:', 'Age:'), range(6, 12))
    """

    fields: Sequence[str]
    labels: Sequence[str] = ()
    max_value_tokens: int = 12
    parsers: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = tuple(self.fields)
        if not names or not all(isinstance(f, str) and f for f in names):
            raise ValueError(f"fields must be a non-empty list of field names, got {self.fields!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique, got {list(names)}")
        labels = tuple(self.labels) or tuple(f"{f}:" for f in names)
        if len(labels) != len(names):
            raise ValueError(f"{len(labels)} labels for {len(names)} fields; give one label per field")
        if not all(isinstance(lb, str) and lb for lb in labels):
            raise ValueError("every label must be a non-empty string")
        m = self.max_value_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_value_tokens must be a positive int, got {m!r}")
        unknown = set(self.parsers) - set(names)
        if unknown:
            raise ValueError(f"parsers given for unknown fields {sorted(unknown)}; the fields are {list(names)}")
        object.__setattr__(self, "fields", names)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "parsers", dict(self.parsers))

    def index(self, name: str) -> int:
        """The position of field ``name``; a clear KeyError for an unknown field."""
        if name not in self.fields:
            raise KeyError(f"unknown field {name!r}; the schema's fields are {list(self.fields)}")
        return self.fields.index(name)

    def steps(self, name: str) -> range:
        """The generation steps whose noise field ``name``'s value tokens use."""
        i = self.index(name)
        return range(i * self.max_value_tokens, (i + 1) * self.max_value_tokens)


# ----------------------------------------------------------------- records --
@dataclass
class Records:
    """A batch of generated records (one per row) and everything needed to regenerate them.

    ``value_ids[r][i]`` are the value tokens of field ``i`` in row ``r`` (sampled,
    or set by an intervention), ``filler_ids[r][i]`` the forced newline after it
    (empty when the value ended with a newline), ``finish[r][i]`` how it ended.
    """

    schema: Schema
    prompts: list[list[int]]
    seeds: list[int]
    sampler: Sampler
    label_ids: list[list[int]]
    value_ids: list[list[list[int]]]
    filler_ids: list[list[list[int]]]
    finish: list[list[str]]
    stream: int = PRIOR
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.seeds)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def ids(self, r: int) -> list[int]:
        """Row ``r``'s record tokens (labels, values, forced newlines; the prompt excluded)."""
        out: list[int] = []
        for i in range(len(self.schema.fields)):
            out += self.label_ids[i] + self.value_ids[r][i] + self.filler_ids[r][i]
        return out

    def sampled_mask(self, r: int) -> list[bool]:
        """For each token of :meth:`ids`, whether it was sampled (True) or forced (label / newline / set value)."""
        out: list[bool] = []
        for i in range(len(self.schema.fields)):
            sampled = self.finish[r][i] != "set"
            out += [False] * len(self.label_ids[i]) + [sampled] * len(self.value_ids[r][i])
            out += [False] * len(self.filler_ids[r][i])
        return out

    @property
    def texts(self) -> list[str]:
        """Each record's text (without the prompt)."""
        return [self._decode(self.ids(r)) for r in range(len(self))]

    @property
    def values(self) -> list[dict[str, Optional[str]]]:
        """Each value's text up to its first newline, stripped (``None`` when empty)."""
        out = []
        for r in range(len(self)):
            row = {}
            for i, name in enumerate(self.schema.fields):
                text = self._decode(self.value_ids[r][i]).split("\n", 1)[0].strip()
                row[name] = text or None
            out.append(row)
        return out

    def parsed(self) -> list[dict[str, Any]]:
        """Values passed through the schema's parsers; ``None`` where a value is missing or unparseable."""
        out = []
        for row in self.values:
            parsed = {}
            for name, text in row.items():
                fn = self.schema.parsers.get(name)
                if text is None or fn is None:
                    parsed[name] = text
                    continue
                try:
                    parsed[name] = fn(text)
                except ValueError:
                    parsed[name] = None
            out.append(parsed)
        return out

    def unparseable(self) -> dict[str, int]:
        """Per field, how many rows have no value or a value its parser rejects."""
        parsed = self.parsed()
        return {name: sum(p[name] is None for p in parsed) for name in self.schema.fields}

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per row: seed, values, parsed values, finish reasons, text, token ids."""
        vals, parsed, texts = self.values, self.parsed(), self.texts
        return [{"seed": self.seeds[r], "values": vals[r], "parsed": parsed[r],
                 "finish": dict(zip(self.schema.fields, self.finish[r])), "text": texts[r],
                 "ids": self.ids(r), "prompt_ids": self.prompts[r], "sampler": self.sampler.to_dict(),
                 "stream": self.stream} for r in range(len(self))]


@dataclass
class FieldCounterfactual:
    """The result of :func:`do_field`: factual, counterfactual (same noise) and interventional (fresh noise) records."""

    field: str
    factual: Records
    counterfactual: Records
    interventional: Optional[Records] = None

    def changes(self, name: str, *, parsed: bool = True, interventional: bool = False) -> list[tuple[Any, Any]]:
        """``(factual value, counterfactual value)`` of field ``name`` per row (parsed by default)."""
        other = self.interventional if interventional else self.counterfactual
        if other is None:
            raise ValueError("no interventional records: call do_field(..., interventional=True)")
        a = self.factual.parsed() if parsed else self.factual.values
        b = other.parsed() if parsed else other.values
        return [(x[name], y[name]) for x, y in zip(a, b)]

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per row with the factual, counterfactual (and interventional) values."""
        out = []
        inter = self.interventional.to_records() if self.interventional is not None else None
        for r, (f, c) in enumerate(zip(self.factual.to_records(), self.counterfactual.to_records())):
            rec = {"field": self.field, "factual": f, "counterfactual": c}
            if inter is not None:
                rec["interventional"] = inter[r]
            out.append(rec)
        return out


# --------------------------------------------------------------- the loop --
def _newline_test(tokenizer):
    seen: dict[int, bool] = {}

    def has_newline(tok: int) -> bool:
        if tok not in seen:
            seen[tok] = "\n" in tokenizer.decode([tok], skip_special_tokens=False)
        return seen[tok]

    return has_newline


class _Fields:
    """The decode program of a record: feed each field's label (after the previous value's pending tokens),
    sample its value with the noise of steps ``i * max_value_tokens + j`` until a newline, EOS or the budget;
    rows whose value ended wait (fed nothing) while the others finish theirs."""

    def __init__(self, schema: Schema, label_ids, n: int, start: int, eos: list[int], newline_ids: list[int],
                 has_nl: Callable[[int], bool]):
        self.schema, self.label_ids, self.n, self.i, self.j = schema, label_ids, n, start, 0
        self.eos, self.newline = set(eos), list(newline_ids)
        self.has_nl = has_nl
        nf = len(schema.fields)
        self.values = [[[] for _ in range(nf)] for _ in range(n)]
        self.fillers = [[[] for _ in range(nf)] for _ in range(n)]
        self.finish = [["" for _ in range(nf)] for _ in range(n)]
        self.pending: list[list[int]] = [[] for _ in range(n)]
        self.active = [True] * n

    def where(self) -> str:
        return f"field {self.schema.fields[self.i]!r}, value token {self.j}"

    def _open_field(self):
        if self.i >= len(self.schema.fields):
            return None
        feeds = [self.pending[r] + self.label_ids[self.i] for r in range(self.n)]
        self.pending = [[] for _ in range(self.n)]
        self.active, self.j = [True] * self.n, 0
        return feeds, [self.i * self.schema.max_value_tokens] * self.n

    def next(self, sel, token):
        if token is None:
            return self._open_field()
        i, j, m = self.i, self.j, self.schema.max_value_tokens
        feed: list[list[int]] = [[] for _ in range(self.n)]
        for r, tok in zip(sel, token.tolist()):
            if tok in self.eos:
                self.finish[r][i], self.fillers[r][i], self.active[r] = "eos", list(self.newline), False
                self.pending[r] = list(self.newline)
                continue
            self.values[r][i].append(tok)
            if self.has_nl(tok):
                self.finish[r][i], self.active[r] = "newline", False
                self.pending[r] = [tok]
            elif j == m - 1:
                self.finish[r][i], self.fillers[r][i], self.active[r] = "length", list(self.newline), False
                self.pending[r] = [tok] + list(self.newline)
            else:
                feed[r] = [tok]
        if not any(self.active):
            self.i += 1
            return self._open_field()
        self.j = j + 1
        return feed, [i * m + self.j if self.active[r] else None for r in range(self.n)]


def _fill(model, tokenizer, schema: Schema, label_ids, contexts, seeds, streams, start: int, sampler: Sampler,
          eos: list[int], newline_ids: list[int]):
    """Sample the values of fields start.. for every row; contexts end right before label ``start``."""
    device = next(model.parameters()).device
    vocab = E.vocab_size(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    n = len(contexts)
    rows = E.Rows(context=contexts, prompt_len=[len(c) for c in contexts], seed=list(seeds),
                  max_new=[0] * n, stream=list(streams))
    program = _Fields(schema, label_ids, n, start, eos, newline_ids, _newline_test(tokenizer))
    try:
        with torch.no_grad():
            # One KV cache per batch across fields; rows sharing a prompt prefill it once.
            batch = E.KVBatch(E.PlainRunner(model), rows, pad=pad, vocab=vocab, device=device, share_prefix=True)
            E.decode([(batch, list(range(n)))], rows, program, sampler=sampler, vocab_size=vocab, device=device)
    except E.StepError as err:
        raise ValueError(str(err)) from None
    return program.values, program.fillers, program.finish


def _resolve(model):
    if E.is_intervenable(model):
        raise TypeError(
            "cfgen.structured works on plain Hugging Face models; for an intervened model pass a "
            "(factual_model, counterfactual_model) pair of plain models"
        )
    if isinstance(model, (tuple, list)):
        if len(model) != 2:
            raise ValueError(f"a model pair must be (factual_model, counterfactual_model), got {len(model)} items")
        fact, cf = model
        if E.is_intervenable(fact) or E.is_intervenable(cf):
            raise TypeError("cfgen.structured works on plain Hugging Face models (no IntervenableModel in the pair)")
        if E.vocab_size(fact) != E.vocab_size(cf):
            raise ValueError("the factual and counterfactual models must share one vocabulary")
        return fact, cf
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM or a pair of them, got {type(model).__name__}")
    return model, model


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token of text")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt has no tokens")
    return ids


def _newline(tokenizer) -> list[int]:
    return list(tokenizer("\n", add_special_tokens=False)["input_ids"])


def generate_records(
    model,
    tokenizer,
    prompt: Union[Prompt, Sequence[Prompt]],
    schema: Schema,
    *,
    n: int = 1,
    seed: int = 0,
    sampler: Optional[Sampler] = None,
    eos_token_id: Union[int, Sequence[int], None] = None,
) -> Records:
    """Generate ``n`` records per prompt: labels forced, values sampled with explicit noise.

    Row ``r`` uses seed ``seed + r``; value token ``j`` of field ``i`` uses the
    noise of generation step ``i * schema.max_value_tokens + j`` (see the module
    docstring).

    Args:
        model: a plain Hugging Face causal LM (or a pair; the first model generates).
        tokenizer: its tokenizer (labels are tokenized once each, without special tokens).
        prompt: one prompt (string or token ids) or a list of prompts.
        schema: the :class:`Schema`.
        n: records per prompt.
        seed: the first row's seed.
        sampler: default ``Sampler()`` (temperature 1).
        eos_token_id: overrides the model's EOS token id(s).

    Example:
        >>> import cfgen.structured as cs, transformers, torch
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_layer=1, n_head=2,
        ...     n_embd=8)).eval()
        >>> class Tok:  # ids 3.. are characters
        ...     pad_token_id, eos_token_id = 0, 2
        ...     chars = "\\n :abcdefghijklmnopqrstuvwxyz0123456"
        ...     def __call__(self, s, add_special_tokens=True): return {"input_ids": [3 + self.chars.index(c) for c in s]}
        ...     def decode(self, ids, skip_special_tokens=False): return "".join(self.chars[i - 3] for i in ids if i >= 3)
        >>> recs = cs.generate_records(lm, Tok(), "record", cs.Schema(["a", "b"], max_value_tokens=4), n=3)
        >>> len(recs), recs.texts[0].startswith("a:"), recs.sampled_mask(0)[:2]
        (3, True, [False, False])
    """
    fact, _ = _resolve(model)
    if not isinstance(schema, Schema):
        raise TypeError(f"schema must be a cfgen.structured.Schema, got {type(schema).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    sampler = Sampler() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be a cfgen.Sampler, got {type(sampler).__name__}")
    single = isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], int))
    prompts = [_prompt_ids(tokenizer, p) for p in ([prompt] if single else list(prompt))]
    contexts = [p for p in prompts for _ in range(n)]
    seeds = [seed + r for r in range(len(contexts))]
    label_ids = [list(tokenizer(lb, add_special_tokens=False)["input_ids"]) for lb in schema.labels]
    eos = E.eos_ids(tokenizer, fact, eos_token_id)
    values, fillers, finish = _fill(fact, tokenizer, schema, label_ids, contexts, seeds, [PRIOR] * len(contexts), 0,
                                    sampler, eos, _newline(tokenizer))
    return Records(schema=schema, prompts=contexts, seeds=seeds, sampler=sampler, label_ids=label_ids,
                   value_ids=values, filler_ids=fillers, finish=finish, tokenizer=tokenizer)


def _set_value(tokenizer, value, row_values: dict, name: str) -> list[int]:
    if callable(value):
        value = value(row_values)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"the value for field {name!r} is empty")
        text = value if value[:1].isspace() else " " + value
        text = text if text.endswith("\n") else text + "\n"
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(value, Sequence) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    raise TypeError(f"the value for field {name!r} must be a string, a list of token ids, or a function of the "
                    f"row's values returning a string; got {value!r}")


def do_field(
    model,
    tokenizer,
    records: Records,
    field: str,
    value: Union[Value, Sequence[Value]],
    *,
    rows: Optional[Sequence[int]] = None,
    interventional: bool = False,
    eos_token_id: Union[int, Sequence[int], None] = None,
) -> FieldCounterfactual:
    """``do(field = value)``: keep earlier fields, set this one, regenerate the later values with the same noise.

    Args:
        model: the model that generated ``records`` (or a ``(factual, counterfactual)``
            pair: the second regenerates).
        records: from :func:`generate_records`.
        field: the field to set.
        value: a string (a leading space and a trailing newline are added when
            missing, as in ``"Sex: Female\\n"``; tokenized once), a list of token ids
            (used as is), a function ``row values -> string`` (e.g. the other sex), or
            one of these per selected row.
        rows: which rows (default all).
        interventional: also regenerate the later fields with fresh noise.

    Returns:
        a :class:`FieldCounterfactual`; its ``factual`` holds the selected rows.

    Example:
        >>> import cfgen.structured as cs, transformers, torch
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_layer=1, n_head=2,
        ...     n_embd=8)).eval()
        >>> class Tok:
        ...     pad_token_id, eos_token_id = 0, 2
        ...     chars = "\\n :abcdefghijklmnopqrstuvwxyz0123456"
        ...     def __call__(self, s, add_special_tokens=True): return {"input_ids": [3 + self.chars.index(c) for c in s]}
        ...     def decode(self, ids, skip_special_tokens=False): return "".join(self.chars[i - 3] for i in ids if i >= 3)
        >>> recs = cs.generate_records(lm, Tok(), "record", cs.Schema(["a", "b", "c"], max_value_tokens=4), n=2)
        >>> cf = cs.do_field(lm, Tok(), recs, "b", "zz")
        >>> [v["b"] for v in cf.counterfactual.values], cf.counterfactual.value_ids[0][0] == recs.value_ids[0][0]
        (['zz', 'zz'], True)
    """
    if not isinstance(records, Records):
        raise TypeError(f"records must be cfgen.structured.Records, got {type(records).__name__}")
    fact_model, cf_model = _resolve(model)
    schema = records.schema
    k = schema.index(field)
    sel = list(range(len(records))) if rows is None else [int(r) for r in rows]
    for r in sel:
        if not 0 <= r < len(records):
            raise IndexError(f"row {r} is out of range: there are {len(records)} records")
    per_row = list(value) if isinstance(value, (list, tuple)) and value and not isinstance(value[0], int) else None
    if per_row is not None and len(per_row) != len(sel):
        raise ValueError(f"{len(per_row)} values for {len(sel)} rows; give one value, or one per row")
    vals = records.values
    newline = _newline(tokenizer)
    has_nl = _newline_test(tokenizer)
    set_ids, set_fill = [], []
    for j, r in enumerate(sel):
        ids = _set_value(tokenizer, per_row[j] if per_row is not None else value, vals[r], field)
        set_ids.append(ids)
        set_fill.append([] if any(has_nl(t) for t in ids) else list(newline))

    def prefix(r: int, j: int) -> list[int]:
        out = list(records.prompts[r])
        for i in range(k):
            out += records.label_ids[i] + records.value_ids[r][i] + records.filler_ids[r][i]
        return out + records.label_ids[k] + set_ids[j] + set_fill[j]

    kinds = [PRIOR] + ([INTERVENTIONAL] if interventional else [])
    contexts = [prefix(r, j) for _ in kinds for j, r in enumerate(sel)]
    seeds = [records.seeds[r] for _ in kinds for r in sel]
    streams = [st for st in kinds for _ in sel]
    eos = E.eos_ids(tokenizer, fact_model, eos_token_id)
    if k + 1 < len(schema.fields):
        values, fillers, finish = _fill(cf_model, tokenizer, schema, records.label_ids, contexts, seeds, streams,
                                        k + 1, records.sampler, eos, newline)
    else:
        nf = len(schema.fields)
        values = [[[] for _ in range(nf)] for _ in contexts]
        fillers = [[[] for _ in range(nf)] for _ in contexts]
        finish = [["" for _ in range(nf)] for _ in contexts]

    def build(part: int, stream: int) -> Records:
        out_v, out_f, out_fin = [], [], []
        for j, r in enumerate(sel):
            g = part * len(sel) + j
            v = [list(records.value_ids[r][i]) for i in range(k)] + [set_ids[j]] + values[g][k + 1:]
            f = [list(records.filler_ids[r][i]) for i in range(k)] + [set_fill[j]] + fillers[g][k + 1:]
            fin = list(records.finish[r][:k]) + ["set"] + finish[g][k + 1:]
            out_v.append(v)
            out_f.append(f)
            out_fin.append(fin)
        return Records(schema=schema, prompts=[records.prompts[r] for r in sel], seeds=[records.seeds[r] for r in sel],
                       sampler=records.sampler, label_ids=records.label_ids, value_ids=out_v, filler_ids=out_f,
                       finish=out_fin, stream=stream, tokenizer=records.tokenizer or tokenizer)

    factual = Records(schema=schema, prompts=[records.prompts[r] for r in sel], seeds=[records.seeds[r] for r in sel],
                      sampler=records.sampler, label_ids=records.label_ids,
                      value_ids=[records.value_ids[r] for r in sel], filler_ids=[records.filler_ids[r] for r in sel],
                      finish=[records.finish[r] for r in sel], stream=records.stream,
                      tokenizer=records.tokenizer or tokenizer)
    return FieldCounterfactual(field=field, factual=factual, counterfactual=build(0, PRIOR),
                               interventional=build(1, INTERVENTIONAL) if interventional else None)
