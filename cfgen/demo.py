"""``cfgen demo``: what a noise-matched counterfactual is, shown on the embedded model.

Three sections, each with the same three texts per row: the **factual** text
(the model without intervention), the **counterfactual** text (the intervened
model on the *same* Gumbel noise: every difference is the intervention's doing)
and the **interventional** baseline (the intervened model on *fresh* noise: what
sampling the intervened model again would give). Changed tokens are marked
against the factual text.

1. An activation patch from cfgen's catalogue (``patch_landmark_city``): the
   layer-24 residual stream at the last token of "The Eiffel Tower is located in
   the city of" is taken from "The Colosseum is located in the city of". The
   counterfactual keeps the factual text's wording around what the patch changes
   (Paris, France -> Rome, Italy); the interventional baseline is another text.
2. The catalogue's "dark" steering vector (``steering_dark``) at a strength whose
   counterfactuals stay fluent, chosen from a measured sweep
   (``interventions/steering_dark/scale_sweep.md`` in the repository).
3. Hindsight: a sentence cfgen did not write, its noise inferred from the exact
   posterior, replayed under the patch (several posterior draws).

It writes an HTML report (every model text escaped) next to the terminal output.

Example (takes about a minute on two CPU cores; ``cfgen demo`` does the same):
    >>> from cfgen import demo
    >>> sections = demo.run(out="cfgen_report.html")       # doctest: +SKIP
    >>> [s.name for s in sections]                          # doctest: +SKIP
    ['patch', 'steering', 'hindsight']
"""

from __future__ import annotations

import difflib
import html
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from .results import CounterfactualResult

__all__ = ["run", "Section", "STORY", "OBSERVED", "STEERING_SCALE", "TEMPERATURE", "chat_prompt", "scale_steering",
           "marked_spans", "changed_share", "format_section", "report_html"]

STORY = "Write a short story about a lighthouse keeper."
OBSERVED = " Paris, France. It was built in 1889 as the entrance to the World's Fair."
# The largest multiple of the shipped vector whose counterfactuals stay fluent: chosen by
# interventions/steering_dark/scale_sweep.py (table and rule in scale_sweep.md there).
STEERING_SCALE = 0.25
TEMPERATURE = 0.7
PATCH = "patch_landmark_city"
PATCH_TOKENS = 20  # "Paris, France." plus a sentence is enough to see what the patch changes
LABELS = {"factual": "factual", "counterfactual": "counterfactual", "interventional": "interventional"}
NOTES = {"factual": "no intervention", "counterfactual": "same noise", "interventional": "fresh noise"}


@dataclass
class Section:
    """One demo section: a result and what to read in it."""

    name: str
    title: str
    about: str
    prompt: str  # shown to the reader (the chat template is left out)
    result: CounterfactualResult


# ------------------------------------------------------------- helpers --
def chat_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as one user turn in the tokenizer's chat template, ready for the reply.

    Example:
        >>> import cfgen
        >>> _, tok = cfgen.load_default_model()
        >>> tok.decode(chat_prompt(tok, "Hi")).endswith("<|im_start|>assistant\\n")
        True
    """
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def scale_steering(intervenable, scale: float):
    """Multiply every constant source vector of ``intervenable`` by ``scale`` and return it.

    For steering vectors (``pv.AdditionIntervention`` and other constant-source
    interventions). The interventions get new tensors: the caller's vector is left
    as it was. Raises ``ValueError`` when ``intervenable`` has none.

    Example:
        >>> import cfgen, torch
        >>> model, tok = cfgen.load_default_model()
        >>> saved = cfgen.catalogue.load("steering_dark", model)
        >>> half = scale_steering(cfgen.catalogue.load("steering_dark", model), 0.5)
        >>> a, b = (next(iter(m.interventions.values())).source_representation for m in (saved, half))
        >>> torch.equal(b, a * 0.5)
        True
    """
    import torch

    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale == scale:
        raise TypeError(f"scale must be a number, got {scale!r}")
    steering = [iv for iv in intervenable.interventions.values()
                if isinstance(getattr(iv, "source_representation", None), torch.Tensor)]
    if not steering:
        raise ValueError("scale_steering needs a steering intervention (a constant source_representation, e.g. "
                         "pv.AdditionIntervention); this one has none: use scale 1")
    for iv in steering:
        old = iv.source_representation
        new = old.detach() * float(scale)
        # a buffer or plain attribute takes the tensor; a parameter must stay a parameter
        iv.source_representation = torch.nn.Parameter(new, old.requires_grad) if isinstance(
            old, torch.nn.Parameter) else new
    return intervenable


def _text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _unchanged(reference: Sequence[int], ids: list[int], min_run: int) -> list[bool]:
    """Per token of ``ids``: is it part of text it shares with ``reference``?"""
    keep = [False] * len(ids)
    for b in difflib.SequenceMatcher(None, list(reference), ids, autojunk=False).get_matching_blocks():
        # after the shared prefix, a match shorter than min_run (" of the") is a coincidence, not shared text
        if b.size and (b.size >= min_run or b.a == b.b == 0):
            keep[b.b:b.b + b.size] = [True] * b.size
    return keep


def marked_spans(tokenizer, reference: Sequence[int], ids: Sequence[int], *,
                 min_run: int = 3) -> list[tuple[str, bool]]:
    """``ids`` decoded as (text, changed) spans; unchanged = shared with ``reference`` token for token.

    Shared text is the common prefix plus every run of at least ``min_run`` tokens
    that difflib matches between the two (shorter matches such as " of the" in two
    different stories are coincidences). Each span's text is the difference of
    decoded prefixes, so characters split across tokens come out whole.

    Example:
        >>> class Tok:
        ...     def decode(self, ids, skip_special_tokens=True):
        ...         return "".join({1: " Paris", 2: " Rome", 3: ",", 4: " France", 5: " Italy", 6: ".",
        ...                         7: " It", 8: " was"}[i] for i in ids)
        >>> marked_spans(Tok(), [1, 3, 4, 6, 7, 8], [2, 3, 5, 6, 7, 8])
        [(' Rome, Italy', True), ('. It was', False)]
    """
    ids = list(ids)
    keep = _unchanged(reference, ids, min_run)
    spans: list[tuple[str, bool]] = []
    done, start = "", 0
    for i in range(1, len(ids) + 1):
        if i < len(ids) and keep[i] == keep[start]:
            continue
        text = _text(tokenizer, ids[:i])
        piece, done = text[len(done):], text
        if piece:
            spans.append((piece, not keep[start]))
        start = i
    return spans


def changed_share(reference: Sequence[int], ids: Sequence[int], *, min_run: int = 3) -> float:
    """The share of ``ids``' tokens not shared with ``reference`` (as :func:`marked_spans` marks them).

    Example:
        >>> changed_share([1, 3, 4, 6, 7, 8], [2, 3, 5, 6, 7, 8])
        0.5
    """
    ids = list(ids)
    if not ids:
        return 0.0 if not list(reference) else 1.0
    return 1.0 - sum(_unchanged(reference, ids, min_run)) / len(ids)


def _rows(result) -> list[dict[str, Any]]:
    inter = result.interventional_ids
    rows = []
    for r in range(len(result)):
        row = {"seed": result.seeds[r], "sample": result.sample_index[r], "factual": result.factual_ids[r],
               "counterfactual": result.counterfactual_ids[r]}
        if inter is not None:
            row["interventional"] = inter[r]
        rows.append(row)
    return rows


def _summary(result) -> str:
    rows = _rows(result)
    parts = []
    for kind in ("counterfactual", "interventional"):
        if rows and kind in rows[0]:
            share = sum(changed_share(r["factual"], r[kind]) for r in rows) / len(rows)
            parts.append(f"{kind} {share:.0%}")
    return "tokens changed against the factual text (mean over rows): " + ", ".join(parts)


# ------------------------------------------------------------ terminal --
def _wrap(label: str, spans: list[tuple[str, bool]], width: int) -> list[str]:
    text = "".join(f"⟦{t}⟧" if changed else t for t, changed in spans).replace("\n", " ↵ ")
    head = f"  {label:<30} "
    return textwrap.wrap(text, width=width, initial_indent=head, subsequent_indent=" " * len(head),
                         drop_whitespace=False, replace_whitespace=False) or [head]


def format_section(section: Section, tokenizer, *, width: int = 110) -> str:
    """The section as plain text for a terminal: per row, the three texts with ⟦changed⟧ spans marked.

    Example: see :func:`run`, which prints every section with it.
    """
    res = section.result
    lines = [f"== {section.title}", *textwrap.wrap(section.about, width=width, initial_indent="   ",
                                                  subsequent_indent="   "),
             f"   prompt: {section.prompt!r}   sampler: {res.sampler.describe()}", ""]
    for row in _rows(res):
        lines.append(f"  seed {row['seed']}" + (f", posterior draw {row['sample']}" if res.mode == "hindsight" else ""))
        for kind in ("factual", "counterfactual", "interventional"):
            if kind not in row:
                continue
            spans = ([(_text(tokenizer, row[kind]), False)] if kind == "factual"
                     else marked_spans(tokenizer, row["factual"], row[kind]))
            label = ("observed" if kind == "factual" and res.mode == "hindsight" else LABELS[kind])
            lines += _wrap(f"{label} ({NOTES[kind]})", spans, width)
        lines.append("")
    lines.append("   " + _summary(res) + "  (⟦…⟧ marks them)")
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML --
_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table.cf{border-collapse:collapse;margin:.4rem 0 1rem 0;width:100%}
table.cf td{vertical-align:top;padding:.2rem .5rem;text-align:left}
table.cf td.k{white-space:nowrap;color:#555;width:12rem}
table.cf td.t{white-space:pre-wrap}
mark{background:#ffe08a}
pre.p{background:#f4f4f4;padding:.4rem;white-space:pre-wrap}
"""


def report_html(sections: Sequence[Section], tokenizer, *, title: str = "cfgen demo") -> str:
    """A standalone HTML page: per section its explanation, the three texts per row with changed
    tokens marked, and the result's own table (``result.to_html()``). Every text is HTML-escaped.

    Example: see :func:`run`, which writes it to ``out``.
    """
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>",
            "<p>Each row: the <b>factual</b> text (no intervention), the <b>counterfactual</b> text "
            "(the intervened model on the same Gumbel noise) and the <b>interventional</b> baseline (the "
            "intervened model on fresh noise). <mark>Marked</mark> tokens differ from the factual text.</p>"]
    for s in sections:
        res = s.result
        body.append(f"<h2>{esc(s.title)}</h2><p>{esc(s.about)}</p>")
        body.append(f"<p>Prompt:</p><pre class='p'>{esc(s.prompt)}</pre>"
                    f"<p>Sampler: {esc(res.sampler.describe())}</p>")
        for row in _rows(res):
            head = f"seed {row['seed']}" + (f", posterior draw {row['sample']}" if res.mode == "hindsight" else "")
            cells = [f"<tr><td colspan='2'><b>{esc(head)}</b></td></tr>"]
            for kind in ("factual", "counterfactual", "interventional"):
                if kind not in row:
                    continue
                spans = ([(_text(tokenizer, row[kind]), False)] if kind == "factual"
                         else marked_spans(tokenizer, row["factual"], row[kind]))
                text = "".join(f"<mark>{esc(t)}</mark>" if changed else esc(t) for t, changed in spans)
                label = "observed" if kind == "factual" and res.mode == "hindsight" else LABELS[kind]
                cells.append(f"<tr><td class='k'>{esc(label)} ({esc(NOTES[kind])})</td>"
                             f"<td class='t'>{text}</td></tr>")
            body.append(f"<table class='cf'>{''.join(cells)}</table>")
        body.append(f"<p>{esc(_summary(res))}.</p>")
        body.append(f"<details><summary>The result object (<code>result.to_html()</code>)</summary>"
                    f"{res.to_html()}</details>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


# ----------------------------------------------------------------- run --
def run(
    *,
    seed: int = 3,
    temperature: float = TEMPERATURE,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    max_new_tokens: int = 40,
    num_samples: int = 3,
    prompt: str = STORY,
    observed: str = OBSERVED,
    steering: Union[str, Path] = "steering_dark",
    steering_scale: float = STEERING_SCALE,
    out: Union[str, Path, None] = "cfgen_report.html",
    model=None,
    tokenizer=None,
    echo: Callable[[str], Any] = print,
) -> list[Section]:
    """Run the three demo sections, print them with ``echo`` and write the HTML report to ``out``.

    Args:
        seed: the first seed; sample ``j`` of a section uses ``seed + j``.
        temperature, top_k, top_p: the sampler (one for every section).
        max_new_tokens: new tokens of the steering section (the patch section uses at most 20).
        num_samples: seeds per section, posterior draws for hindsight.
        prompt: the user turn of the steering section (wrapped in the chat template).
        observed: the continuation of "The Eiffel Tower is located in the city of" taken in hindsight.
        steering: a catalogue name or a folder written by :func:`cfgen.save` with a steering vector.
        steering_scale: multiplies the steering vector (1 = as saved).
        out: the HTML report's path (None: no report).
        model, tokenizer: default: :func:`cfgen.load_default_model` (the catalogue's entries were built for it).
        echo: where the terminal text goes.

    Returns:
        the three :class:`Section` objects (``.result`` is each :class:`cfgen.CounterfactualResult`).

    Example:
        >>> from cfgen import demo
        >>> sections = demo.run(max_new_tokens=8, num_samples=1, out=None, echo=lambda s: None)  # doctest: +SKIP
        >>> sections[0].result.interventional_texts is not None                                   # doctest: +SKIP
        True
    """
    import cfgen
    from cfgen import catalogue

    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    sampler = cfgen.Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    steering_folder = catalogue.resolve(steering)  # before any model work: a bad name fails at once
    if model is None or tokenizer is None:
        echo("Loading the embedded SmolLM2-135M-Instruct (offline; the first run converts it, about 40 s) ...")
        model, tokenizer = cfgen.load_default_model()
    tok = tokenizer
    sections = []

    example = catalogue.example(PATCH)
    patch = catalogue.load(PATCH, model)
    where = dict(sources=[example["source"]],
                 unit_locations={"sources->base": tuple(example["unit_locations"]["sources->base"])})
    res = cfgen.generate(patch, tok, [example["prompt"]], max_new_tokens=min(PATCH_TOKENS, max_new_tokens),
                         sampler=sampler, seed=seed, num_samples=num_samples, interventional=True, **where)
    sections.append(Section(
        "patch", f"1. Activation patch: the Eiffel Tower's city, patched from the Colosseum (catalogue: {PATCH})",
        f"pyvene VanillaIntervention on layer {example['layer']}'s block output at the prompt's last token, "
        f"taken from {example['source']!r}. The counterfactual is the factual text with what the patch changes "
        "(the city and what follows from it) and the same noise elsewhere; the interventional baseline is the "
        "patched model sampled again, a different text.",
        example["prompt"], res))
    echo("\n" + format_section(sections[-1], tok))

    steer = scale_steering(cfgen.load(steering_folder, model), steering_scale) if steering_scale != 1 \
        else cfgen.load(steering_folder, model)
    res = cfgen.generate(steer, tok, [chat_prompt(tok, prompt)], max_new_tokens=max_new_tokens, sampler=sampler,
                         seed=seed, num_samples=num_samples, interventional=True)
    sections.append(Section(
        "steering", f"2. Steering vector: 'dark', {steering_scale:g} x the saved vector ({steering})",
        "pyvene AdditionIntervention added at every position. The saved strength turns the story into word salad; "
        f"{STEERING_SCALE:g} x is the strongest of a measured sweep (interventions/steering_dark/scale_sweep.md in the "
        "repository) whose counterfactuals stay fluent. The vector tips the story within the first tokens, and from "
        "there the counterfactual is a different, still readable story: same noise, but each new token now sees "
        "another history.",
        prompt, res))
    echo("\n" + format_section(sections[-1], tok))

    res = cfgen.counterfactual(patch, tok, [example["prompt"]], [observed], sampler=sampler, seed=seed,
                               num_samples=num_samples, interventional=True, **where)
    sections.append(Section(
        "hindsight", "3. Hindsight: a sentence cfgen did not write, replayed under the patch",
        f"The noise of the observed continuation is drawn from its exact posterior ({num_samples} draws; "
        "each draw reproduces the observed text without intervention), then the patched model runs on it: how "
        "the sentence would have read had the model's representation said 'Colosseum'.",
        example["prompt"], res))
    echo("\n" + format_section(sections[-1], tok))

    if out is not None:
        path = Path(out)
        path.write_text(report_html(sections, tok), encoding="utf-8")
        echo(f"\nHTML report: {path.resolve()}")
    return sections
