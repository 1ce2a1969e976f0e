"""Compatibility matrix: model family x pyvene intervention type x component x schedule, on tiny random models.

Every cell builds a tiny random model of the family (hidden 16, 2 layers, vocab 32), wraps it in a
``pyvene.IntervenableModel`` with the intervention at layer 1, runs ``cfgen.generate`` on a batch of 3
prompts of different lengths (4, 7 and 11 tokens, left-padded) and checks:

* **equal**: cfgen's KV-cached counterfactual tokens equal a no-cache recompute through pyvene, one row at a
  time (``IntervenableModel.forward`` on the whole sequence at every step, ``cfgen.gumbel_noise`` for the
  noise); the factual tokens equal the plain model's;
* **identity** (where the type has an exact identity form: a zero vector for Addition / Subtraction, the
  same prompt as source at the same positions for the interchange types, Collect): the counterfactual text
  equals the factual text.

Columns (schedules): ``prompt``, ``generation``, ``all`` (``intervene_on=``; a constant vector through
``source_representations`` for the types that take a source) and ``locations``: ``unit_locations`` at
the last prompt position (an interchange from source prompts for the types that take a source; ``base``
locations for the sourceless and constant-source ones; 4 positions for Noise, which needs exactly 4).

Run:  ``PYTHONPATH=. python bench/compat_matrix.py --pyvene-tests /tmp/pyvene-src`` (writes
docs/compatibility.md; ``--families gpt2,llama`` to restrict, ``--out -`` to print; ``--pyvene-tests``: a
``git archive v0.1.8`` of pyvene's repository with its ``pyvene/`` folder removed, whose offline tests are run
plain and with cfgen imported and used first). tests/test_matrix.py imports the helpers below.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import cfgen

VOCAB = 32
PROMPTS = ["hell", "abcdefg", "the quick b"]  # 4, 7 and 11 tokens: a left-padded batch
SOURCES = ["xyzw", "qrstuvwxyz", "mnop"]  # different lengths from the prompts on purpose
N_NEW = 5
SEED = 7
LAYER = 1


class CharTokenizer:
    """One id per character (3 + ord % 29), ids 0-2 reserved (pad, bos, eos): no download."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 29) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + (i - 3) % 26) if i >= 3 else f"<{i}>" for i in ids)


TOK = CharTokenizer()


# ---------------------------------------------------------------------------------------------- families


def _families() -> dict[str, Callable]:
    import transformers as T

    special = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dec = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **special)
    return {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **special)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**dec)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**dec)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=4, **dec)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=4, sliding_window=8, **dec)),
        "gpt_neo": lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]], window_size=8,
            max_position_embeddings=64, **special)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **special)),
        "olmo": lambda: T.OlmoForCausalLM(T.OlmoConfig(**dec)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**dec)),
    }


FAMILIES = [
    "gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "gpt_neo", "gpt_neox", "olmo", "phi3"]


def build_model(family: str, seed: int = 0, init: float = 0.3):
    """A tiny random causal LM of ``family`` (weights large enough that interventions change tokens)."""
    make = _families()[family]
    torch.manual_seed(seed)  # model construction only; cfgen itself never touches the global RNG
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init)
    return model.eval()


# ---------------------------------------------------------------------------------------------- interventions


@dataclass(frozen=True)
class Kind:
    """How a pyvene intervention type is built and driven."""

    name: str
    build: Callable  # (pv, d, vec) -> intervention instance
    source: bool  # takes a per-call source (interchange / source_representations)
    identity: Optional[str] = None  # "zero": a zero vector; "self": the prompt as its own source


def _boundless(pv, d, vec):
    iv = pv.BoundlessRotatedSpaceIntervention(embed_dim=d)
    with torch.no_grad():  # starts near the identity: open the boundary so it does something
        iv.intervention_boundaries.fill_(1.0)
        iv.temperature.fill_(0.01)
    return iv


def _sigmoid_mask(pv, d, vec):
    iv = pv.SigmoidMaskIntervention(embed_dim=d)
    with torch.no_grad():
        iv.mask.copy_(torch.linspace(-1, 1, d))
    return iv


def _sigmoid_mask_rotated(pv, d, vec):
    iv = pv.SigmoidMaskRotatedSpaceIntervention(embed_dim=d)
    with torch.no_grad():
        iv.masks.copy_(torch.linspace(-1, 1, d))
        iv.temperature.fill_(0.5)
    return iv


def _autoencoder(pv, d, vec):
    iv = pv.AutoencoderIntervention(embed_dim=d, latent_dim=8)
    iv.set_interchange_dim(3)  # pyvene indexes the latent with interchange_dim (default embed_dim: out of range)
    return iv


KINDS = [
    Kind("Vanilla", lambda pv, d, v: pv.VanillaIntervention(embed_dim=d), True, "self"),
    Kind("Vanilla (constant source)", lambda pv, d, v: pv.VanillaIntervention(embed_dim=d, source_representation=v),
         False),
    Kind("Addition", lambda pv, d, v: pv.AdditionIntervention(embed_dim=d), True, "zero"),
    Kind("Addition (constant source)",
         lambda pv, d, v: pv.AdditionIntervention(embed_dim=d, source_representation=v), False),
    Kind("Subtraction", lambda pv, d, v: pv.SubtractionIntervention(embed_dim=d), True, "zero"),
    Kind("Zero", lambda pv, d, v: pv.ZeroIntervention(embed_dim=d), False),
    Kind("Collect", lambda pv, d, v: pv.CollectIntervention(embed_dim=d), False, "collect"),
    Kind("Skip", lambda pv, d, v: pv.SkipIntervention(embed_dim=d), True),
    Kind("Noise", lambda pv, d, v: pv.NoiseIntervention(embed_dim=d), False),
    Kind("SigmoidMask", _sigmoid_mask, True),
    Kind("RotatedSpace", lambda pv, d, v: pv.RotatedSpaceIntervention(embed_dim=d), True),
    Kind("BoundlessRotatedSpace", _boundless, True),
    Kind("SigmoidMaskRotatedSpace", _sigmoid_mask_rotated, True),
    Kind("LowRankRotatedSpace", lambda pv, d, v: pv.LowRankRotatedSpaceIntervention(embed_dim=d,
                                                                                     low_rank_dimension=4),
         True, "self"),
    Kind("Autoencoder", _autoencoder, True),
]
KIND = {k.name: k for k in KINDS}

COMPONENTS = ["block_output", "mlp_output", "attention_output", "attention_value_output",
              "head_attention_value_output"]
SCHEDULES = ["prompt", "generation", "all", "locations"]
HEADS = [1]  # the head a head unit touches ("h.pos" on head_attention_value_output)


def component_dim(pv, model, component: str) -> int:
    """The ``embed_dim`` pyvene's dimension mapping gives ``component`` (head size for head components)."""
    probe = pv.IntervenableModel({"layer": LAYER, "component": component,
                                  "intervention_type": pv.VanillaIntervention}, model)
    return int(next(iter(probe.interventions.values())).embed_dim)


def intervenable(model, kind: Kind, component: str, seed: int = 3):
    """(IntervenableModel, its intervention, the constant vector) for one cell."""
    import pyvene as pv

    d = component_dim(pv, model, component)
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(d, generator=g) * 3
    torch.manual_seed(seed)  # the trainable types draw their initial weights from the global RNG
    iv = kind.build(pv, d, vec)
    cfg = {"layer": LAYER, "component": component, "intervention": iv}
    if component.startswith("head_"):
        cfg["unit"] = "h.pos"
    return pv.IntervenableModel(cfg, model), iv, vec


# ---------------------------------------------------------------------------------------------- reference


def scheduled(schedule, length: int, prompt_len: int) -> list[int]:
    """The absolute positions a schedule intervenes on in a sequence of ``length`` tokens."""
    if schedule == "all":
        return list(range(length))
    if schedule == "prompt":
        return list(range(min(prompt_len, length)))
    if schedule == "generation":
        return list(range(prompt_len - 1, length))
    return [p for p in schedule if p < length]


def base_positions(kind: Kind, prompt_len: int) -> list[int]:
    """The prompt positions of the ``locations`` column (Noise needs exactly 4)."""
    if kind.name == "Noise":
        return list(range(prompt_len - 4, prompt_len))
    return [prompt_len - 1]


def source_position(source_len: int) -> int:
    return source_len - 1


@contextlib.contextmanager
def per_unit(iv):
    """pyvene's distributed types built without ``keep_last_dim`` take one unit at a time; the reference runs
    them with ``keep_last_dim=True`` (what cfgen documents it does for them) so several positions can be given."""
    distributed = any(c.__name__ in ("DistributedRepresentationIntervention", "AutoencoderIntervention",
                                     "CollectIntervention")
                      for c in type(iv).__mro__)
    saved = iv.keep_last_dim
    iv.keep_last_dim = saved or distributed
    try:
        yield
    finally:
        iv.keep_last_dim = saved


def _locs(component: str, positions: list[list[int]]):
    """Unit locations of one intervention for a batch (one position list per prompt), in pyvene's nesting
    ``[prompt][units]`` (``[2][prompt][units]``: heads, then positions, for head components)."""
    if component.startswith("head_"):
        return [[HEADS for _ in positions], positions]
    return positions


def reference(model, im, iv, kind: Kind, component: str, prompt: str, schedule, *, sampler, seed: int = SEED,
              n: int = N_NEW, source: Optional[str] = None, vec=None, factual: bool = False) -> list[int]:
    """No KV cache, one row: recompute the whole sequence through pyvene at every step."""
    seq = list(TOK(prompt)["input_ids"])
    plen = len(seq)
    for step in range(n):
        ids = torch.tensor([seq])
        kwargs = None
        if not factual and schedule == "locations":
            base = base_positions(kind, plen)
            if source is not None:
                src = TOK(source)["input_ids"]
                kwargs = {"sources": [{"input_ids": torch.tensor([src])}],
                          "unit_locations": {"sources->base": ([_locs(component, [[source_position(len(src))]])],
                                                               [_locs(component, [base])])}}
            else:
                kwargs = {"unit_locations": {"base": [_locs(component, [base])]}}
        elif not factual:
            positions = scheduled(schedule, len(seq), plen)
            if positions:
                kwargs = {"unit_locations": {"base": [_locs(component, [positions])]}}
                if kind.source:
                    kwargs["source_representations"] = vec
        with torch.no_grad():
            if kwargs is None:
                logits = model(input_ids=ids).logits[0, -1]
            else:
                with per_unit(iv):
                    _, out = im({"input_ids": ids}, **kwargs)
                logits = out.logits[0, -1]
        noise = cfgen.gumbel_noise(seed, step, logits.shape[-1])[0]
        seq.append(int(sampler.sample(logits.float(), noise)))
    return seq[plen:]


def cfgen_call(im, kind: Kind, component: str, schedule, *, sampler, vec=None, sources=None, seed: int = SEED,
               n: int = N_NEW):
    """cfgen.generate for one cell (``sources``: the source prompts of the ``locations`` column)."""
    kwargs: dict = {}
    if schedule == "locations":
        plens = [len(TOK(p)["input_ids"]) for p in PROMPTS]
        base = _locs(component, [base_positions(kind, p) for p in plens])
        if sources is not None:
            src = _locs(component, [[source_position(len(TOK(s)["input_ids"]))] for s in sources])
            kwargs = {"sources": list(sources), "unit_locations": {"sources->base": ([src], [base])}}
        else:
            kwargs = {"unit_locations": {"base": [base]}}
    else:
        kwargs = {"intervene_on": schedule}
        if kind.source:
            kwargs["source_representations"] = vec
    return cfgen.generate(im, TOK, PROMPTS, max_new_tokens=n, sampler=sampler, seed=seed, eos_token_id=[],
                          **kwargs)


def identity_call(model, kind: Kind, component: str, *, sampler, n: int = N_NEW):
    """cfgen's counterfactual under the type's exact identity form, or None where the type has none."""
    if kind.identity is None:
        return None
    im, _, vec = intervenable(model, kind, component)
    plens = [len(TOK(p)["input_ids"]) for p in PROMPTS]
    loc = _locs(component, [[p - 1] for p in plens])
    if kind.identity in ("zero", "collect"):
        kw = {"source_representations": torch.zeros_like(vec)} if kind.identity == "zero" else {}
        if component.startswith("head_"):  # head units need locations: the last prompt position
            kw["unit_locations"] = {"base": [loc]}
        else:
            kw["intervene_on"] = "all"
        return cfgen.generate(im, TOK, PROMPTS, max_new_tokens=n, sampler=sampler, seed=SEED, eos_token_id=[], **kw)
    return cfgen.generate(im, TOK, PROMPTS, max_new_tokens=n, sampler=sampler, seed=SEED, eos_token_id=[],
                          sources=list(PROMPTS), unit_locations={"sources->base": ([loc], [loc])})


# ---------------------------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    ok: bool
    why: str = ""  # the reason when not ok
    changed: int = 0  # rows whose counterfactual differs from the factual text
    identity: Optional[bool] = None


def _short(exc: BaseException, limit: int = 160) -> str:
    msg = re.sub(r"'layer_\d+_comp_[\w.]+?#\d+'", "'<key>'", " ".join(str(exc).split()))  # same reason, any cell
    return f"{type(exc).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def run_cell(family: str, kind: Kind, component: str, schedule, *, sampler=None, model=None) -> Cell:
    """One cell: cfgen vs the no-cache reference on every row (exceptions become the cell's reason)."""
    sampler = sampler or cfgen.Sampler(temperature=0.8)
    try:
        model = model if model is not None else build_model(family)
        im, iv, vec = intervenable(model, kind, component)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return Cell(False, "pyvene: " + _short(exc))
    sources = SOURCES if (schedule == "locations" and kind.source) else None
    try:
        r = cfgen_call(im, kind, component, schedule, sampler=sampler, vec=vec, sources=sources)
    except Exception as exc:  # noqa: BLE001
        why = "cfgen: " + _short(exc)
        if isinstance(exc, ValueError) and "pyvene" not in str(exc):
            return Cell(False, why)  # cfgen's own refusal, before any model work
        try:  # does pyvene's own forward (one row, no cache) run this cell?
            reference(model, im, iv, kind, component, PROMPTS[-1], schedule, sampler=sampler, n=1,
                      source=sources[-1] if sources else None, vec=vec)
        except Exception as ref_exc:  # noqa: BLE001
            return Cell(False, "pyvene: " + _short(ref_exc, 90) + " (IntervenableModel.forward, one row, fails too; "
                        + why + ")")
        return Cell(False, why)
    changed = 0
    for i, prompt in enumerate(PROMPTS):
        try:
            fact = reference(model, im, iv, kind, component, prompt, schedule, sampler=sampler, factual=True)
            cf = reference(model, im, iv, kind, component, prompt, schedule, sampler=sampler,
                           source=sources[i] if sources else None, vec=vec)
        except Exception as exc:  # noqa: BLE001
            return Cell(False, "pyvene reference: " + _short(exc))
        if r.factual_ids[i] != fact:
            return Cell(False, f"factual row {i}: cfgen {r.factual_ids[i]} != reference {fact}")
        if r.counterfactual_ids[i] != cf:
            return Cell(False, f"counterfactual row {i}: cfgen {r.counterfactual_ids[i]} != reference {cf}")
        changed += cf != fact
    return Cell(True, changed=changed)


# ---------------------------------------------------------------------------------------------- the document


def _versions() -> str:
    import pyvene
    import transformers

    return (f"pyvene {getattr(pyvene, '__version__', '0.1.8')}, transformers {transformers.__version__}, "
            f"torch {torch.__version__}, Python {sys.version.split()[0]}")


PYVENE_SUITE = """## pyvene's own test suite with cfgen in the process

pyvene 0.1.8's offline tests (tag `v0.1.8`, `tests/`, run with pytest against the installed pyvene, hub
access off) were run twice on {date}: plain, and with a pytest plugin that imports cfgen and runs
`cfgen.generate` and `cfgen.counterfactual` on a tiny Llama before the tests.

{outcome}

The tests that fail in both runs need a model hub download (offline here) or are the two GPT-2 helper tests
that lack a causal mask under transformers 5 (fixed upstream in pyvene commit 42c5550). The CI test
`tests/test_pyvene_unchanged.py` checks the same property cheaply: cfgen leaves pyvene's module-level registries
and a plain pyvene forward exactly as it found them.
"""


def write(results: dict, families: list[str], seconds: float, pyvene_outcome: str) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        "# Compatibility matrix",
        "",
        "Which pyvene intervention types, on which components of which model families, cfgen turns into",
        "noise-matched counterfactual text, checked on tiny random models. Generated by",
        "`PYTHONPATH=. python bench/compat_matrix.py --pyvene-tests DIR` on " + date + f" ({_versions()}; {seconds:.0f} s).",
        "",
        "Each cell runs `cfgen.generate` on a batch of 3 prompts of 4, 7 and 11 tokens (left-padded),",
        f"{N_NEW} new tokens at temperature 0.8, intervention at layer {LAYER}, and is **✓** when cfgen's KV-cached",
        "factual and counterfactual tokens equal a no-cache recompute through `IntervenableModel.forward`, one",
        "row at a time (with `cfgen.gumbel_noise` for the noise), on every row. The number after ✓ is how many",
        "of the 3 counterfactual rows differ from the factual text (0: the intervention did not change the",
        "sampled tokens, so that cell shows agreement but not the effect). Columns: `intervene_on=` `prompt`,",
        "`generation`, `all` (a constant vector through `source_representations` for the types that take a",
        "source), and `loc`: `unit_locations` at the last prompt position (an interchange from 3 source prompts",
        "for the types that take a source, `base` locations for the others; Noise: 4 positions). Head",
        "components use `unit=\"h.pos\"` on head 1. **id** is the identity check where the type has an exact",
        "identity form (zero vector; the prompt as its own source at the same position; Collect): ✓ when",
        "every counterfactual text equals its factual text. **✗ n** refers to the reasons listed under the table.",
        "",
    ]
    head_len = len(lines)
    total = passed = id_total = id_passed = 0
    blame = {"cfgen": 0, "pyvene": 0}
    for family in families:
        cells = results[family]
        lines += [f"## {family}", ""]
        if "__model__" in cells:
            lines += [f"Not supported: {cells['__model__']}", ""]
            continue
        reasons: list[str] = []
        header = "| intervention | component | prompt | generation | all | loc | id |"
        lines += [header, "|" + "---|" * 7]
        for kind in KINDS:
            for component in COMPONENTS:
                row = [kind.name, f"`{component}`"]
                for schedule in SCHEDULES:
                    cell = cells[(kind.name, component, schedule)]
                    total += 1
                    if cell.ok:
                        passed += 1
                        row.append(f"✓ {cell.changed}")
                    else:
                        blame["pyvene" if cell.why.startswith("pyvene") else "cfgen"] += 1
                        if cell.why not in reasons:
                            reasons.append(cell.why)
                        row.append(f"✗ {reasons.index(cell.why) + 1}")
                ident = cells.get((kind.name, component, "identity"))
                if ident is None:
                    row.append("")
                else:
                    id_total += 1
                    id_passed += ident.ok
                    if ident.ok:
                        row.append("✓")
                    else:
                        if ident.why not in reasons:
                            reasons.append(ident.why)
                        row.append(f"✗ {reasons.index(ident.why) + 1}")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if reasons:
            lines += ["Reasons:", ""]
            lines += [f"{i + 1}. {w.replace('|', '/')}" for i, w in enumerate(reasons)]
            lines.append("")
    wrong = sum(c.why.startswith(("factual row", "counterfactual row", "identity changed"))
                for cells in results.values() for c in cells.values() if isinstance(c, Cell))
    summary = [f"**Summary**: {passed} / {total} cells ✓ (cfgen equals the no-cache reference), "
               f"{id_passed} / {id_total} identity cells ✓. Of the {total - passed} ✗ cells, {blame['pyvene']} fail "
               "in pyvene 0.1.8 itself (reason starting `pyvene:`: building the IntervenableModel, or its own "
               f"forward on one row without a cache, fails) and {blame['cfgen']} are cfgen's (reason starting "
               "`cfgen:`: cfgen refuses or fails where pyvene's forward runs). "
               + ("No cell that runs gives tokens different from the reference." if not wrong else
                  f"**{wrong} cells run and give tokens different from the reference.**"), ""]
    lines[head_len:head_len] = summary
    lines += [PYVENE_SUITE.format(date=date, outcome=pyvene_outcome)]
    return "\n".join(lines) + "\n"


def run_identity(family, kind, component, model, sampler) -> Cell:
    try:
        intervenable(model, kind, component)
    except Exception as exc:  # noqa: BLE001
        return Cell(False, "pyvene: " + _short(exc))
    try:
        r = identity_call(model, kind, component, sampler=sampler)
    except Exception as exc:  # noqa: BLE001
        return Cell(False, "cfgen (identity): " + _short(exc))
    if not all(r.identical):
        return Cell(False, f"identity changed the text: {r.factual_ids} -> {r.counterfactual_ids}")
    return Cell(True)


PLUGIN = '''
import torch


class _Tok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 29) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + (i - 3) % 26) if i >= 3 else f"<{i}>" for i in ids)


def pytest_configure(config):
    import pyvene as pv
    import transformers

    import cfgen

    g = torch.Generator().manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    steer = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                  "intervention": pv.AdditionIntervention(
                                      embed_dim=16, source_representation=torch.randn(16, generator=g))}, model)
    r = cfgen.generate(steer, _Tok(), ["hello", "hi there"], max_new_tokens=4, seed=1)
    cfgen.counterfactual(steer, _Tok(), ["hello"], [r.factual_ids[0]], seed=2)
'''


def pyvene_suite(tests_dir: str) -> str:
    """Run pyvene's tests in ``tests_dir`` (a checkout of pyvene's tag without its ``pyvene/`` folder, so the
    installed pyvene is tested) plain and with cfgen imported and used first; markdown with the comparison."""
    import os
    import subprocess
    import tempfile

    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "cfgen_plugin.py").write_text(PLUGIN)
        root = str(Path(__file__).resolve().parent.parent)
        for name, extra in (("plain", []), ("with cfgen", ["-p", "cfgen_plugin"])):
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       PYTHONPATH=os.pathsep.join([tmp, root, os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *extra,
                                   "-o", "python_files=*TestCase.py", "tests"], cwd=tests_dir, env=env,
                                  capture_output=True, text=True)
            outcomes[name] = {m.group(2): m.group(1) for m in re.finditer(
                r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", proc.stdout, re.M)}
    plain, used = outcomes["plain"], outcomes["with cfgen"]
    differ = sorted(t for t in set(plain) | set(used) if plain.get(t) != used.get(t))
    count = {k: sum(v == k for v in plain.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    lines = ["| run | tests | passed | failed | errors |", "|---|---|---|---|---|"]
    for name, res in outcomes.items():
        lines.append(f"| {name} | {len(res)} | {sum(v == 'PASSED' for v in res.values())} | "
                     f"{sum(v == 'FAILED' for v in res.values())} | {sum(v == 'ERROR' for v in res.values())} |")
    lines.append("")
    lines.append("Tests whose outcome differs: " + (", ".join(differ) if differ else "**none** (identical pass/fail "
                                                     f"sets; {count['FAILED']} fail in both runs)."))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "compatibility.md"))
    ap.add_argument("--pyvene-tests", default=None,
                    help="a checkout of pyvene's tag (git archive v0.1.8) with its pyvene/ folder removed: run its "
                         "tests plain and with cfgen used first, and put the comparison in the document")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    families = args.families.split(",")
    sampler = cfgen.Sampler(temperature=0.8)
    t0 = time.time()
    results: dict = {}
    for family in families:
        cells: dict = {}
        results[family] = cells
        try:
            model = build_model(family)
            component_dim(__import__("pyvene"), model, "block_output")
        except Exception as exc:  # noqa: BLE001
            cells["__model__"] = "pyvene: " + _short(exc) + " (pyvene 0.1.8 has no mapping for this family)"
            print(family, cells["__model__"], file=sys.stderr)
            continue
        for kind in KINDS:
            for component in COMPONENTS:
                for schedule in SCHEDULES:
                    cells[(kind.name, component, schedule)] = run_cell(family, kind, component, schedule,
                                                                      sampler=sampler, model=model)
                if kind.identity:
                    cells[(kind.name, component, "identity")] = run_identity(family, kind, component, model,
                                                                             sampler)
            print(f"{family} {kind.name}: {sum(c.ok for c in cells.values())}/{len(cells)} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr)
    outcome = pyvene_suite(args.pyvene_tests) if args.pyvene_tests else "(not run in this generation: give --pyvene-tests)"
    text = write(results, families, time.time() - t0, outcome)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        print("wrote", args.out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
