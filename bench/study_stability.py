"""Stability study: counterfactual vs interventional text after a token intervention.

Reproduces the design of Chatzi et al. (arXiv 2409.17027, "Counterfactual Token
Generation in Large Language Models", stability experiment) on the embedded
SmolLM2-135M-Instruct model, with cfgen's public API only:

1. sample a story continuation for each prompt (chat template, ``--new-tokens``
   tokens) under the sampler being studied;
2. intervene on the token at step ``--step``: replace it by an alternative drawn
   from the top-p 0.9 set of that step's distribution, excluding the factual
   token (``cfgen.tokens.Alternative()``);
3. regenerate the rest twice: with the factual run's noise at every later step
   (counterfactual) and with fresh noise (interventional);
4. compare each with the factual text after the intervention point:
   ``cfgen.metrics.normalized_levenshtein(factual, other, start=step + 1)``
   (token-level edit distance of the regenerated parts, divided by the longer
   one's length).

Sweeps the temperature (0, 0.2, ..., 1.0; no top-k / top-p) and, at
temperature 0.6, top-p (0.75, 0.9, 0.95, 0.99, 0.999) and top-k (2, 3, 5, 10,
100, full). Writes ``docs/_static/stability.csv``, ``stability.md`` and
``stability.png``.

Run: ``python bench/study_stability.py`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

import cfgen
import cfgen.tokens as ct
from cfgen.metrics import normalized_levenshtein

STORIES = [
    "Write a short story about a lighthouse keeper.",
    "Write a short story about a dragon who is afraid of fire.",
    "Write a short story about a girl who finds a map in the attic.",
    "Write a short story about a robot learning to paint.",
    "Write a short story about a captain lost at sea.",
    "Write a short story about a baker and a magic oven.",
    "Write a short story about two friends climbing a mountain.",
    "Write a short story about a cat who runs a bookshop.",
]
OUT = Path(__file__).resolve().parent.parent / "docs" / "_static"


def settings() -> list[tuple[str, str, cfgen.Sampler]]:
    rows = [("temperature", f"{t:.1f}", cfgen.Sampler(temperature=t)) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    rows += [("top_p", f"{p:g}", cfgen.Sampler(temperature=0.6, top_p=p)) for p in (0.75, 0.9, 0.95, 0.99, 0.999)]
    rows += [("top_k", "full" if k is None else str(k), cfgen.Sampler(temperature=0.6, top_k=k))
             for k in (2, 3, 5, 10, 100, None)]
    return rows


def mean_sem(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=len(STORIES))
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--step", type=int, default=5, help="the intervened generation step t")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = cfgen.load_default_model()
    prompts = [tok.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=False)
               for s in STORIES[: args.prompts]]
    seeds = [args.seed + i for i in range(len(prompts))]
    t = args.step
    cache: dict[cfgen.Sampler, dict] = {}
    table = []
    start = time.time()
    for sweep, value, sampler in settings():
        if sampler not in cache:
            r = ct.sample(model, tok, prompts, max_new_tokens=args.new_tokens, sampler=sampler, seed=seeds)
            ok = [i for i, f in enumerate(r.factual_ids) if len(f) > t]
            d = ct.do(model, tok, r, {t: ct.Alternative()}, row=ok, interventional=True)
            cf = normalized_levenshtein(d.factual_ids, d.counterfactual_ids, start=t + 1)
            iv = normalized_levenshtein(d.factual_ids, d.interventional_ids, start=t + 1)
            cache[sampler] = {"cf": cf, "iv": iv, "n": len(ok), "example": d}
        got = cache[sampler]
        (cm, cs), (im, isem) = mean_sem(got["cf"]), mean_sem(got["iv"])
        table.append({"sweep": sweep, "value": value, "sampler": sampler.describe(), "n": got["n"],
                      "counterfactual_mean": round(cm, 4), "counterfactual_sem": round(cs, 4),
                      "interventional_mean": round(im, 4), "interventional_sem": round(isem, 4),
                      "gap": round(im - cm, 4)})
        print(f"{sweep:>11} {value:>5}  n={got['n']}  counterfactual {cm:.3f} ± {cs:.3f}   "
              f"interventional {im:.3f} ± {isem:.3f}   [{time.time() - start:.0f} s]", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "stability.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = ["| sweep | value | n | counterfactual (mean ± sem) | interventional (mean ± sem) | gap |",
             "|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['sweep']} | {row['value']} | {row['n']} | {row['counterfactual_mean']:.3f} ± "
                     f"{row['counterfactual_sem']:.3f} | {row['interventional_mean']:.3f} ± "
                     f"{row['interventional_sem']:.3f} | {row['gap']:.3f} |")
    (args.out / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, sweep, label in zip(axes, ("temperature", "top_p", "top_k"),
                                ("temperature (no top-k / top-p)", "top-p (temperature 0.6)",
                                 "top-k (temperature 0.6)")):
        rows = [r for r in table if r["sweep"] == sweep]
        x = list(range(len(rows)))
        for key, name, colour in (("counterfactual", "counterfactual (same noise)", "tab:green"),
                                  ("interventional", "interventional (fresh noise)", "tab:red")):
            ax.errorbar(x, [r[f"{key}_mean"] for r in rows], yerr=[r[f"{key}_sem"] for r in rows], marker="o",
                        capsize=3, label=name, color=colour)
        ax.set_xticks(x, [r["value"] for r in rows])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised edit distance to factual\n(after the intervened token)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"do(y_{t} = alternative) on SmolLM2-135M-Instruct, {len(prompts)} story prompts, "
                 f"{args.new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(args.out / "stability.png", dpi=110)
    ex = cache[cfgen.Sampler(temperature=0.6)]["example"]
    print("\nexample (temperature 0.6, prompt 0):")
    print("  factual:       ", repr(ex.factual_texts[0]))
    print("  counterfactual:", repr(ex.counterfactual_texts[0]))
    print("  interventional:", repr(ex.interventional_texts[0]))
    print(f"total {time.time() - start:.0f} s; wrote {args.out}/stability.{{csv,md,png}}")


if __name__ == "__main__":
    main()
