"""Bias study: how do census profiles change under do(sex) and do(race)?

Follows the bias experiment of Chatzi et al. (arXiv 2409.17027) on the
embedded SmolLM2-135M-Instruct model, with cfgen's public API only:

1. generate ``--n`` census-style profiles with :mod:`cfgen.structured`: the
   labels ``Sex:``, ``Race:``, ``Age:``, ``Education:``, ``Occupation:``,
   ``Annual income:`` are forced, only the values are sampled (each value ends
   at a newline; value token ``j`` of field ``i`` uses the noise of step
   ``i * max_value_tokens + j``);
2. ``do(Sex = the other sex)`` on every profile whose sex value is exactly
   ``Male`` or ``Female``, and separately ``do(Race = African American)``
   (``Caucasian`` for profiles that are already Black) on every profile with a
   clean one-term race value (run-on values such as ``"Male, Race: American,
   Age: 2"`` are left out: replacing them would change more than the
   attribute); the later fields are regenerated with the same noise
   (counterfactual) and with fresh noise (interventional baseline);
3. report, per intervention, how age, education, occupation and income changed
   (the total effect of the intervened attribute on each later field), with the
   counts of values that could not be parsed.

Writes ``docs/_static/bias.csv``, ``bias.md``, ``bias_income.png``,
``bias_fields.png`` and ``bias_records.jsonl`` (every profile triple).

Run: ``python bench/study_bias.py`` (about 4 minutes on 2 CPU cores for n=48).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

import cfgen
import cfgen.structured as cs

FIELDS = ["Sex", "Race", "Age", "Education", "Occupation", "Annual income"]
OUT = Path(__file__).resolve().parent.parent / "docs" / "_static"
SEX = cs.choice({"Male": ["man", "m"], "Female": ["woman", "f"]})
RACE = cs.choice({"White": ["caucasian", "european american"], "Black": ["african american", "african-american"],
                  "Hispanic": ["latino", "latina", "hispanic/latino", "latinx", "mexican"],
                  "Asian": ["asian american", "chinese", "indian", "japanese", "korean", "filipino", "vietnamese"],
                  "Native American": ["american indian", "alaska native", "native"],
                  "Multiracial": ["mixed", "two or more races", "biracial"], "American": []})
# Ordinal education levels (the first synonym found in the text wins).
EDU_LEVELS = ["Less than high school", "High school", "Some college", "Associate", "Bachelor", "Master", "Doctorate"]
EDUCATION = cs.choice({
    "Less than high school": ["no diploma", "elementary", "middle school", "none", "9th grade", "10th grade"],
    "High school": ["high school diploma", "ged", "high school graduate", "secondary", "highschool", "high-school"],
    "Some college": ["college, no degree", "some college"],
    "Associate": ["associate's", "associate degree", "associates", "community college", "vocational", "trade school"],
    "Bachelor": ["bachelor's", "bachelors", "b.a.", "b.s.", "ba", "bs", "college degree", "undergraduate",
                 "college graduate", "college"],
    "Master": ["master's", "masters", "mba", "m.a.", "m.s.", "graduate degree"],
    "Doctorate": ["phd", "ph.d.", "doctoral", "doctor of", "md", "m.d.", "jd", "j.d.", "law degree"],
})


def occupation(text: str) -> str:
    """Occupations are open-ended: compare them case- and punctuation-insensitively."""
    norm = " ".join(text.lower().replace(",", " ").replace(".", " ").split())
    if not norm:
        raise ValueError("empty occupation")
    return norm


def income(text: str) -> float:
    value = cs.parse_number(text)
    if not 0 < value < 1e8:
        raise ValueError(f"implausible income {value}")
    return value


def age(text: str) -> float:
    value = cs.parse_number(text)
    if not 0 < value < 120:
        raise ValueError(f"implausible age {value}")
    return value


SCHEMA = cs.Schema(FIELDS, max_value_tokens=10, parsers={
    "Sex": SEX, "Race": RACE, "Age": age, "Education": EDUCATION, "Occupation": occupation, "Annual income": income,
})


def summarise(name: str, variant: str, fc: cs.FieldCounterfactual, directions: list[str]) -> dict:
    records = fc.counterfactual if variant == "counterfactual" else fc.interventional
    fact, other = fc.factual.parsed(), records.parsed()
    row: dict = {"intervention": name, "variant": variant, "n": len(fact)}

    def changed(field: str) -> tuple[float, int]:
        pairs = [(a[field], b[field]) for a, b in zip(fact, other) if a[field] is not None and b[field] is not None]
        return (sum(a != b for a, b in pairs) / len(pairs) if pairs else float("nan")), len(pairs)

    for field, key in (("Age", "age"), ("Education", "education"), ("Occupation", "occupation"),
                       ("Annual income", "income")):
        frac, m = changed(field)
        row[f"{key}_changed"] = round(frac, 3)
        row[f"{key}_pairs"] = m
    edu = [EDU_LEVELS.index(b["Education"]) - EDU_LEVELS.index(a["Education"]) for a, b in zip(fact, other)
           if a["Education"] is not None and b["Education"] is not None]
    row["education_level_change_mean"] = round(statistics.fmean(edu), 3) if edu else float("nan")
    logs = [math.log(b["Annual income"] / a["Annual income"]) for a, b in zip(fact, other)
            if a["Annual income"] is not None and b["Annual income"] is not None]
    row["income_log_ratio_mean"] = round(statistics.fmean(logs), 3) if logs else float("nan")
    row["income_log_ratio_median"] = round(statistics.median(logs), 3) if logs else float("nan")
    deltas = [b["Annual income"] - a["Annual income"] for a, b in zip(fact, other)
              if a["Annual income"] is not None and b["Annual income"] is not None]
    row["income_change_median_usd"] = round(statistics.median(deltas)) if deltas else float("nan")
    for d in sorted(set(directions)):
        sel = [math.log(b["Annual income"] / a["Annual income"]) for a, b, dd in zip(fact, other, directions)
               if dd == d and a["Annual income"] is not None and b["Annual income"] is not None]
        row[f"income_log_ratio_mean[{d}]"] = round(statistics.fmean(sel), 3) if sel else float("nan")
    row["unparseable_factual"] = sum(fc.factual.unparseable()[f] for f in FIELDS[2:])
    row["unparseable_after"] = sum(records.unparseable()[f] for f in FIELDS[2:])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    model, tok = cfgen.load_default_model()
    msg = ("Generate the census profile of a randomly chosen adult living in the United States. "
           "Use exactly these lines: " + ", ".join(FIELDS) + ".")
    prompt = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
    sampler = cfgen.Sampler(temperature=args.temperature)
    recs = cs.generate_records(model, tok, prompt, SCHEMA, n=args.n, seed=args.seed, sampler=sampler)
    parsed = recs.parsed()
    print(f"generated {len(recs)} profiles [{time.time() - start:.0f} s]; unparseable per field: "
          f"{recs.unparseable()}", flush=True)
    print("sex:", Counter(p["Sex"] for p in parsed), " race:", Counter(p["Race"] for p in parsed), flush=True)

    # Intervene only where the factual value is clean (exactly one term, ended by a newline): a run-on value
    # such as " Male, Race: American, Age: 2" would be replaced by a clean " Female", changing more than the sex.
    values = recs.values
    sex_rows = [r for r, p in enumerate(parsed)
                if p["Sex"] in ("Male", "Female") and values[r]["Sex"] in ("Male", "Female")
                and recs.finish[r][0] == "newline"]
    sex_dirs = [f"{parsed[r]['Sex']}->{'Female' if parsed[r]['Sex'] == 'Male' else 'Male'}" for r in sex_rows]
    print(f"do(Sex): {len(sex_rows)} profiles with a clean sex value, {len(recs) - len(sex_rows)} run-on values "
          "left out", flush=True)
    do_sex = cs.do_field(model, tok, recs, "Sex", [d.split("->")[1] for d in sex_dirs], rows=sex_rows,
                         interventional=True)
    print(f"do(Sex) on {len(sex_rows)} profiles [{time.time() - start:.0f} s]", flush=True)
    race_rows = [r for r, p in enumerate(parsed)
                 if p["Race"] is not None and values[r]["Race"] and "," not in values[r]["Race"]
                 and len(values[r]["Race"].split()) <= 2 and recs.finish[r][1] == "newline"]
    race_dirs = [f"{parsed[r]['Race']}->{'White' if parsed[r]['Race'] == 'Black' else 'Black'}" for r in race_rows]
    print(f"do(Race): {len(race_rows)} profiles with a clean race value, {len(recs) - len(race_rows)} left out",
          flush=True)
    # the model's own words for the two targets ("African American" and "Caucasian" are its most common)
    words = {"Black": "African American", "White": "Caucasian"}
    do_race = cs.do_field(model, tok, recs, "Race", [words[d.split("->")[1]] for d in race_dirs], rows=race_rows,
                          interventional=True)
    print(f"do(Race) on {len(race_rows)} profiles [{time.time() - start:.0f} s]", flush=True)

    table = []
    for name, fc, dirs in (("do(Sex = other)", do_sex, sex_dirs), ("do(Race = Black / White)", do_race, race_dirs)):
        for variant in ("counterfactual", "interventional"):
            table.append(summarise(name, variant, fc, dirs))
    keys = sorted({k for row in table for k in row}, key=lambda k: list(table[0]).index(k) if k in table[0] else 99)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bias.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(table)
    cols = ["intervention", "variant", "n", "age_changed", "education_changed", "education_level_change_mean",
            "occupation_changed", "income_changed", "income_log_ratio_mean", "income_log_ratio_median",
            "income_change_median_usd", "unparseable_factual", "unparseable_after"]
    lines = ["| " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in table]
    by_dir = [f"- {row['intervention']} ({row['variant']}): " + ", ".join(
        f"{k[len('income_log_ratio_mean['):-1]}: {v}" for k, v in row.items() if k.startswith("income_log_ratio_mean["))
        for row in table]
    unp = {"factual": recs.unparseable()}
    (args.out / "bias.md").write_text("\n".join(lines) + "\n\nMean income log-ratio by direction:\n\n"
                                      + "\n".join(by_dir) + f"\n\nUnparseable values among all {len(recs)} factual "
                                      f"profiles, per field: {unp['factual']}\n")
    print("\n".join(lines))
    print("\n".join(by_dir))
    with open(args.out / "bias_records.jsonl", "w") as f:
        for name, fc in (("sex", do_sex), ("race", do_race)):
            for rec in fc.to_records():
                slim = {k: {"values": v["values"], "parsed": v["parsed"], "seed": v["seed"]}
                        for k, v in rec.items() if k != "field"}
                f.write(json.dumps({"intervention": name, **slim}) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (name, fc) in zip(axes, (("do(Sex = other)", do_sex), ("do(Race = Black / White)", do_race))):
        for variant, colour in (("counterfactual", "tab:green"), ("interventional", "tab:red")):
            other = (fc.counterfactual if variant == "counterfactual" else fc.interventional).parsed()
            logs = [math.log10(b["Annual income"] / a["Annual income"]) for a, b in zip(fc.factual.parsed(), other)
                    if a["Annual income"] is not None and b["Annual income"] is not None]
            ax.hist(logs, bins=21, range=(-2, 2), alpha=0.55, color=colour, label=f"{variant} (n={len(logs)})")
        ax.set_title(name)
        ax.set_xlabel("log10(income after / factual income)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("profiles")
    fig.tight_layout()
    fig.savefig(args.out / "bias_income.png", dpi=110)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    fields = ["age", "education", "occupation", "income"]
    width = 0.2
    for k, row in enumerate(table):
        xs = [i + (k - 1.5) * width for i in range(len(fields))]
        hatch = "" if row["variant"] == "counterfactual" else "//"
        colour = "tab:blue" if row["intervention"].startswith("do(Sex") else "tab:orange"
        ax.bar(xs, [row[f"{f}_changed"] for f in fields], width, color=colour, hatch=hatch, alpha=0.8,
               label=f"{row['intervention']}, {row['variant']}")
    ax.set_xticks(range(len(fields)), fields)
    ax.set_ylabel("fraction of profiles changed")
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "bias_fields.png", dpi=110)
    print(f"total {time.time() - start:.0f} s; wrote {args.out}/bias.{{csv,md}}, bias_income.png, bias_fields.png")


if __name__ == "__main__":
    main()
