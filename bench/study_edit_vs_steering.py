"""Edit vs steering: how many counterfactual texts stay identical (Ravfogel et al. §5)?

Ravfogel et al. ("Gumbel Counterfactual Generation From Language Models",
arXiv 2411.07180) found, from their released counterfactuals, that after a
knowledge edit most texts stay *identical* to the factual ones (MEMIT on
GPT2-XL: 70.4 % and 81.8 % of 500 texts) while after steering almost none do
(0.0 % of 500 on Llama-3-8B-Instruct; 14.8 % for GPT-2 gender steering). This
script measures the same on the embedded SmolLM2-135M-Instruct with cfgen's
public API only, for:

* three rank-one (ROME-style) edits, ``cfgen.rank_one_edit``: the catalogue's
  ``rome_landmark`` (Eiffel Tower -> Rome, layer 6) and two more facts
  (Louvre -> London, Colosseum -> Paris), used as a model pair
  ``(model, edited)``;
* the catalogue's ``steering_dark`` vector at 0.5x, 1x and 2x its shipped
  strength (the stored vector scaled), added at every position;
* the catalogue's ``patch_landmark_city`` interchange (Colosseum -> Eiffel
  Tower prompt, layer 24, last position);
* the catalogue's DAS rotation for the city attribute Country
  (``ravel_country`` DAS, layer 8, the city's last token).

A control (an unedited copy of the model as the counterfactual model) checks
the machinery: both modes must keep every text. Hindsight conditions on each
factual text *including* the EOS token it ended with (the result's ids stop
before it), so that a finished text stays finished.

Edits and steering share one set of generic prompts (sentence beginnings not
about the edited subjects, as for the paper's Wikipedia prompts) and seeds,
so their factual texts are the same texts. The patch and the rotation are
defined on their own prompts (the Eiffel Tower prompt; city prompts).

Two modes per setting: **prior** (``cfgen.generate``: factual and
counterfactual text from the same prior noise) and **hindsight**
(``cfgen.counterfactual`` on the prior mode's factual texts, i.e. the model's
own texts, with posterior noise, as the paper does for its corpus texts).
Metrics over the generated tokens: share of counterfactual texts identical to
the factual one, normalised longest common prefix (``1`` = identical), and
normalised token edit distance, each with a bootstrap 95 % interval
(``cfgen.stats``), plus the hindsight - prior difference of the identical
share (paired by text; the two modes have the same law, so its interval should
contain 0).

Writes ``edit_vs_steering.csv``, ``.md``, ``.png`` and
``edit_vs_steering_records.jsonl`` (every text) under ``--out``.

Run: ``python bench/study_edit_vs_steering.py --n 200`` (see docs/studies.md for
the runtime); ``--smoke`` runs a tiny configuration (n = 2, 4 tokens).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cfgen
from cfgen.metrics import normalized_levenshtein, normalized_shared_prefix
from cfgen.stats import bootstrap, bootstrap_mean, bootstrap_proportion, paired_difference

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "_static"

# Sentence beginnings in the spirit of the paper's Wikipedia prompts, none about the edited subjects.
PROMPTS = [
    "The history of the region begins in the early",
    "In 1998, the company announced that",
    "The river flows north through a valley where",
    "She was born in a small town and later",
    "The album was recorded over three weeks in",
    "According to the report, the new policy",
    "The species is found mainly in",
    "During the war, the bridge was",
    "The school was founded by a group of",
    "His first novel tells the story of",
    "The museum's collection includes",
    "After the election, the new government",
    "The recipe calls for",
    "Scientists have long debated whether",
    "The team finished the season with",
    "The village is known for its",
    "In the summer of 2005, a storm",
    "The film received mixed reviews from",
    "Most of the island is covered by",
    "The engine was designed to",
    "Her research focuses on",
    "The festival takes place every year in",
    "The building was completed in",
    "Early in the morning, the market",
]
# rank-one edits: (name, prompt, subject, new object); rome_landmark's values from interventions/rome_landmark/
EDITS = [
    ("rome_landmark (Eiffel Tower -> Rome)", "The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome"),
    ("Louvre -> London", "The Louvre is located in the city of", "Louvre", " London"),
    ("Colosseum -> Paris", "The Colosseum is located in the city of", "Colosseum", " Paris"),
]
EDIT_LAYER = 6  # rome_landmark's layer (README: layers 2-8 behave alike)
STEERING_SCALES = (0.5, 1.0, 2.0)
SHIPPED_NORM = 72.6  # the saved vector's norm (interventions/steering_dark/sweep.md, layer 9)  # x the shipped coefficient (4): 2, 4 and 8 times the mean difference
# RAVEL-style city prompts for the DAS rotation: base city, a source city with another country
DAS_PAIRS = [("Beihai", "Magdeburg"), ("Toronto", "Osaka"), ("Lyon", "Seattle"), ("Munich", "Madrid")]
DAS_TEMPLATES = [
    "%s is a city in the country of",
    "I just moved to %s. The best thing about living here is",
    "Welcome to %s! This city is famous for",
]
DAS_SOURCE_TEMPLATE = "%s is a city in the country of"
# Ravfogel et al.'s numbers (DESIGN.md §6, issue 14), from the authors' released outputs
PAPER = {
    "control": "- (same model: 100 % expected)",
    "edit": "70.4 % / 81.8 % identical (MEMIT, GPT2-XL, 2 edits, 500 texts each)",
    "steering": "0.0 % identical (Llama-3-8B-Instruct); 14.8 % (GPT-2 gender steering); "
                "median normalised shared prefix ~0.25-0.3",
    "patch": "not in the paper",
    "das": "not in the paper",
}


def load_catalogue(name: str, model):
    """A catalogue entry around ``model``, and its example (prompts, positions) or None."""
    from cfgen import catalogue

    example = catalogue.example(name) if name == "patch_landmark_city" else None
    return catalogue.load(name, model), example


def steering(model, scale: float):
    """The catalogue's steering vector at ``scale`` x its shipped strength.

    The stored vector is scaled in place on a freshly loaded copy: pyvene's
    AdditionIntervention adds its stored ``source_representation`` and ignores
    one passed at call time, so ``source_representations=`` cannot rescale it.
    """
    iv, _ = load_catalogue("steering_dark", model)
    (intervention,) = iv.interventions.values()
    norm = float(intervention.source_representation.norm())
    if abs(norm - SHIPPED_NORM) > 0.01 * SHIPPED_NORM:  # a cached, already scaled copy would compound the scales
        raise RuntimeError(f"steering_dark's vector has norm {norm:.1f}, not the shipped {SHIPPED_NORM}: "
                           "the catalogue returned a modified copy")
    with torch.no_grad():
        intervention.source_representation.mul_(scale)
    return iv


def last_token_of(tok, text: str, word: str) -> int:
    """Index of the last token of ``word`` in ``text`` as cfgen encodes it (with special tokens)."""
    enc = tok(text, return_offsets_mapping=True)
    end = text.index(word) + len(word)
    return max(i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > s)


def build_settings(model, tok, args) -> list[dict]:
    """Each setting: a name, family, the model argument, prompts and intervention keywords (built lazily)."""
    n = args.n
    generic = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    # control: an unedited copy as the counterfactual model; both modes must keep every text.
    settings = [{"name": "control: unedited copy", "family": "control", "prompts": generic,
                 "make": lambda: ((model, copy.deepcopy(model)), {})}]
    for name, prompt, subject, new in EDITS:
        def make(prompt=prompt, subject=subject, new=new):
            edited = cfgen.rank_one_edit(model, tok, prompt, subject, new, layer=EDIT_LAYER,
                                         steps=args.edit_steps, progress=False)
            return (model, edited), {}
        settings.append({"name": f"rank-one edit: {name}", "family": "edit", "prompts": generic, "make": make})

    def steer(scale):
        return lambda: (steering(model, scale), {})

    for scale in STEERING_SCALES:
        settings.append({"name": f"steering_dark x{scale:g}", "family": "steering", "prompts": generic,
                         "make": steer(scale)})

    def patch():
        iv, example = load_catalogue("patch_landmark_city", model)
        src, base = example["unit_locations"]["sources->base"]
        return iv, {"sources": [example["source"]], "unit_locations": {"sources->base": ([[src]], [[base]])}}
    patch_prompt = "The Eiffel Tower is located in the city of"
    settings.append({"name": "patch_landmark_city", "family": "patch", "prompts": [patch_prompt] * n, "make": patch})

    das_rows = [(t % b, DAS_SOURCE_TEMPLATE % s, b, s) for b, s in DAS_PAIRS for t in DAS_TEMPLATES]
    das_rows = [das_rows[i % len(das_rows)] for i in range(n)]

    def das(rows=das_rows):
        iv, _ = load_catalogue("ravel_country_das", model)
        return iv, {"source_rows": [r[1] for r in rows],
                    "base_pos": [last_token_of(tok, r[0], r[2]) for r in rows],
                    "source_pos": [last_token_of(tok, r[1], r[3]) for r in rows]}
    settings.append({"name": "ravel_country DAS", "family": "das", "prompts": [r[0] for r in das_rows],
                     "make": das})
    return settings


def batch_kwargs(kw: dict, lo: int, hi: int) -> dict:
    """The intervention keywords for prompts lo..hi (per-prompt sources / positions sliced)."""
    if "source_rows" not in kw:
        return kw
    return {"sources": kw["source_rows"][lo:hi],
            "unit_locations": {"sources->base": ([[p] for p in kw["source_pos"][lo:hi]],
                                                 [[p] for p in kw["base_pos"][lo:hi]])}}


def summarise(name: str, family: str, mode: str, fact: list, cf: list, seed: int) -> tuple[dict, dict]:
    identical = [f == c for f, c in zip(fact, cf)]
    lcp = normalized_shared_prefix(fact, cf)
    lev = normalized_levenshtein(fact, cf)
    stats = {"identical": bootstrap_proportion(identical, seed=seed),
             "lcp_mean": bootstrap_mean(lcp, seed=seed + 1),
             "lcp_median": bootstrap(lcp, statistic="median", seed=seed + 2),
             "edit_distance": bootstrap_mean(lev, seed=seed + 3)}
    row = {"setting": name, "family": family, "mode": mode, "n": len(fact)}
    for key, iv in stats.items():
        row[key] = round(iv.estimate, 4)
        row[f"{key}_low"] = round(iv.low, 4)
        row[f"{key}_high"] = round(iv.high, 4)
    return row, {"identical": identical, "lcp": lcp, "lev": lev}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="factual texts per setting")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16, help="prompts per engine call")
    ap.add_argument("--edit-steps", type=int, default=25, help="Adam steps of each rank-one edit (25 as shipped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores when idle)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration for CI: n=2, 4 tokens, 1 edit step")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.new_tokens, args.edit_steps, args.batch = 2, 4, 1, 2
    if args.n < 1 or args.new_tokens < 1 or args.batch < 1:
        raise SystemExit("--n, --new-tokens and --batch must be positive")
    torch.set_num_threads(args.threads)
    start = time.time()
    model, tok = cfgen.load_default_model()
    sampler = cfgen.Sampler(temperature=args.temperature)
    eos = tok.eos_token_id
    if model.generation_config.eos_token_id not in (eos, [eos]):
        raise SystemExit(f"the model stops at {model.generation_config.eos_token_id}, the tokenizer's EOS is {eos}: "
                         "hindsight needs the one EOS token the factual texts ended with")
    settings = build_settings(model, tok, args)
    batches = [(lo, min(lo + args.batch, args.n)) for lo in range(0, args.n, args.batch)]
    bar = tqdm(total=2 * len(settings) * len(batches), desc="edit vs steering", unit="batch")
    table, records, timings = [], [], {}
    for k, s in enumerate(settings):
        t0 = time.time()
        bar.set_postfix_str(s["name"])
        target, kw = s["make"]()
        t_build = time.time() - t0
        seeds = [args.seed + i for i in range(args.n)]
        fact, ended, cf_prior, cf_hind = [], [], [], []
        for lo, hi in batches:
            r = cfgen.generate(target, tok, s["prompts"][lo:hi], max_new_tokens=args.new_tokens, sampler=sampler,
                               seed=seeds[lo:hi], **batch_kwargs(kw, lo, hi))
            fact += r.factual_ids
            ended += r.finish_reasons["factual"]
            cf_prior += r.counterfactual_ids
            bar.update()
        # factual ids stop before the EOS token they sampled: give it back to the posterior, else hindsight would
        # condition on an unfinished text and keep sampling after it (the texts would differ after their end)
        observed = [list(f) + [eos] if why == "eos" else list(f) for f, why in zip(fact, ended)]
        for lo, hi in batches:
            # hindsight on the model's own texts; posterior draws use other seeds than the prior noise
            r = cfgen.counterfactual(target, tok, s["prompts"][lo:hi], observed[lo:hi],
                                     max_new_tokens=args.new_tokens, sampler=sampler,
                                     seed=[1_000_000 + x for x in seeds[lo:hi]], **batch_kwargs(kw, lo, hi))
            cf_hind += r.counterfactual_ids
            bar.update()
        per_mode = {}
        for mode, cf in (("prior", cf_prior), ("hindsight", cf_hind)):
            row, raw = summarise(s["name"], s["family"], mode, fact, cf, seed=args.seed + 10 * k)
            per_mode[mode] = raw
            table.append(row)
        diff = paired_difference([float(x) for x in per_mode["hindsight"]["identical"]],
                                 [float(x) for x in per_mode["prior"]["identical"]], seed=args.seed + 10 * k + 5)
        for row in table[-2:]:
            row["identical_hindsight_minus_prior"] = round(diff.estimate, 4)
            row["identical_hindsight_minus_prior_low"] = round(diff.low, 4)
            row["identical_hindsight_minus_prior_high"] = round(diff.high, 4)
        timings[s["name"]] = {"build_s": round(t_build, 1), "total_s": round(time.time() - t0, 1)}
        for i in range(args.n):
            records.append({"setting": s["name"], "prompt": s["prompts"][i], "seed": seeds[i],
                            "factual": tok.decode(fact[i]), "counterfactual_prior": tok.decode(cf_prior[i]),
                            "counterfactual_hindsight": tok.decode(cf_hind[i])})
        tqdm.write(f"{s['name']:<40} prior identical {table[-2]['identical']:.3f} "
                   f"[{table[-2]['identical_low']:.3f}, {table[-2]['identical_high']:.3f}]  hindsight "
                   f"{table[-1]['identical']:.3f}  ({timings[s['name']]['total_s']:.0f} s)")
    bar.close()
    write(args, table, records, timings, time.time() - start)


def write(args, table: list[dict], records: list[dict], timings: dict, seconds: float) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "edit_vs_steering.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    with open(out / "edit_vs_steering_records.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")

    def ci(row, key, pct=False):
        s = 100 if pct else 1
        fmt = ".1f" if pct else ".3f"
        return f"{s * row[key]:{fmt}} [{s * row[key + '_low']:{fmt}}, {s * row[key + '_high']:{fmt}}]"

    lines = [f"n = {args.n} texts per setting, {args.new_tokens} new tokens, temperature {args.temperature:g}, "
             f"seed {args.seed}; 95 % bootstrap (BCa) intervals; {seconds / 60:.1f} min in all.", "",
             "| setting | mode | identical (%) | normalised shared prefix, mean | median | normalised edit distance "
             "| hindsight - prior, identical (%) | paper (Ravfogel et al.) |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['setting']} | {row['mode']} | {ci(row, 'identical', True)} | {ci(row, 'lcp_mean')} | "
                     f"{ci(row, 'lcp_median')} | {ci(row, 'edit_distance')} | "
                     f"{ci(row, 'identical_hindsight_minus_prior', True)} | {PAPER[row['family']]} |")
    lines += ["", "Seconds per setting (build = edit / loading; total includes both modes):", ""]
    lines += [f"- {k}: build {v['build_s']} s, total {v['total_s']} s" for k, v in timings.items()]
    (out / "edit_vs_steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["setting"] for r in table if r["mode"] == "prior"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.8), sharey=True)
    for ax, key, label in ((axes[0], "identical", "share of counterfactual texts identical to the factual"),
                           (axes[1], "lcp_mean", "normalised longest common prefix (mean)")):
        for j, (mode, colour) in enumerate((("prior", "tab:blue"), ("hindsight", "tab:orange"))):
            rows = [r for r in table if r["mode"] == mode]
            y = [i + (j - 0.5) * 0.35 for i in range(len(rows))]
            x = [r[key] for r in rows]
            err = [[r[key] - r[f"{key}_low"] for r in rows], [r[f"{key}_high"] - r[key] for r in rows]]
            ax.barh(y, x, height=0.35, xerr=err, color=colour, alpha=0.8, capsize=2, label=mode)
        ax.set_xlim(0, 1)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].axvspan(0.704, 0.818, color="tab:green", alpha=0.15, label="paper: MEMIT (GPT2-XL)")
    axes[0].axvline(0.148, color="tab:red", ls="--", lw=1, label="paper: GPT-2 steering")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SmolLM2-135M-Instruct, {args.n} texts per setting, {args.new_tokens} tokens, "
                 f"temperature {args.temperature:g} (95 % bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "edit_vs_steering.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out}/edit_vs_steering.{{csv,md,png}} and edit_vs_steering_records.jsonl")


if __name__ == "__main__":
    main()
