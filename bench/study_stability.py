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

5. per setting, bootstrap 95 % intervals (``cfgen.stats``) for both mean
   distances and for the paired difference interventional - counterfactual
   (per story); the gap is called real when its interval excludes 0 (and at
   least 20 stories reached the intervened step).

``--n`` stories per setting (default 128): story request ``i mod 32`` with seed
``--seed + i``, batched ``--batch`` stories per engine call. Sweeps the
temperature (0, 0.2, ..., 1.0; no top-k / top-p) and, at temperature 0.6, top-p
(0.75, 0.9, 0.95, 0.99, 0.999) and top-k (2, 3, 5, 10, 100, full; "full" reuses
the temperature-0.6 run). Writes ``stability.csv``, ``stability.md`` and
``stability.png`` under ``--out`` (default ``docs/_static``).

Run: ``python bench/study_stability.py --n 128`` (runtime: docs/studies.md);
``--smoke`` runs a tiny configuration (n = 2, three settings).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import cfgen
import cfgen.tokens as ct
from cfgen.metrics import normalized_levenshtein
from cfgen.stats import bootstrap_mean, paired_difference

SUBJECTS = [
    "a lighthouse keeper", "a dragon who is afraid of fire", "a girl who finds a map in the attic",
    "a robot learning to paint", "a captain lost at sea", "a baker and a magic oven",
    "two friends climbing a mountain", "a cat who runs a bookshop", "a boy who can talk to birds",
    "an old clockmaker", "a village that disappears every night", "a detective who is afraid of the dark",
    "a musician with a broken violin", "a garden that grows in winter", "a train that never stops",
    "a queen who loses her crown", "a fox and a crow", "a scientist who builds a time machine",
    "a teacher on her last day of school", "a lost dog finding its way home", "a knight who hates fighting",
    "a city under the sea", "a farmer and a talking scarecrow", "a painter who paints the future",
    "a ghost who wants to make friends", "a pilot flying through a storm", "a child who collects stars",
    "a forest that whispers", "an astronaut on a lonely planet", "a thief with a good heart",
    "a fisherman who catches a golden fish", "a mountain that sings",
]
STORIES = [f"Write a short story about {s}." for s in SUBJECTS]
OUT = Path(__file__).resolve().parent.parent / "docs" / "_static"


def settings(smoke: bool = False) -> list[tuple[str, str, cfgen.Sampler]]:
    if smoke:
        return [("temperature", "0.6", cfgen.Sampler(temperature=0.6)),
                ("top_p", "0.9", cfgen.Sampler(temperature=0.6, top_p=0.9)),
                ("top_k", "5", cfgen.Sampler(temperature=0.6, top_k=5))]
    rows = [("temperature", f"{t:.1f}", cfgen.Sampler(temperature=t)) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
    rows += [("top_p", f"{p:g}", cfgen.Sampler(temperature=0.6, top_p=p)) for p in (0.75, 0.9, 0.95, 0.99, 0.999)]
    rows += [("top_k", "full" if k is None else str(k), cfgen.Sampler(temperature=0.6, top_k=k))
             for k in (2, 3, 5, 10, 100, None)]
    return rows


def ci(iv) -> tuple[float, float, float]:
    return round(iv.estimate, 4), round(iv.low, 4), round(iv.high, 4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128, help="stories per setting (prompt i %% 32, seed --seed + i)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--step", type=int, default=5, help="the intervened generation step t")
    ap.add_argument("--batch", type=int, default=32, help="stories per engine call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores when idle)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration for CI: n=2, 8 tokens, 3 settings")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.new_tokens, args.step, args.batch = 2, 8, 2, 2
    if args.n < 1 or args.batch < 1 or not 0 <= args.step < args.new_tokens - 1:
        raise SystemExit("--n and --batch must be positive and 0 <= --step < --new-tokens - 1")
    torch.set_num_threads(args.threads)
    model, tok = cfgen.load_default_model()
    prompts = [tok.apply_chat_template([{"role": "user", "content": STORIES[i % len(STORIES)]}],
                                       add_generation_prompt=True, tokenize=False) for i in range(args.n)]
    seeds = [args.seed + i for i in range(args.n)]
    t = args.step
    grid = settings(args.smoke)
    unique = list(dict.fromkeys(s for _, _, s in grid))
    batches = [(lo, min(lo + args.batch, args.n)) for lo in range(0, args.n, args.batch)]
    cache: dict[cfgen.Sampler, dict] = {}
    start = time.time()
    bar = tqdm(total=len(unique) * len(batches), desc="stability", unit="batch")
    for k, sampler in enumerate(unique):
        t0 = time.time()
        bar.set_postfix_str(sampler.describe())
        cf, iv, used, example = [], [], [], None
        for lo, hi in batches:
            r = ct.sample(model, tok, prompts[lo:hi], max_new_tokens=args.new_tokens, sampler=sampler,
                          seed=seeds[lo:hi])
            ok = [i for i, f in enumerate(r.factual_ids) if len(f) > t]
            if ok:
                d = ct.do(model, tok, r, {t: ct.Alternative()}, row=ok, interventional=True)
                cf += normalized_levenshtein(d.factual_ids, d.counterfactual_ids, start=t + 1)
                iv += normalized_levenshtein(d.factual_ids, d.interventional_ids, start=t + 1)
                used += [lo + i for i in ok]
                if example is None:
                    example = d
            bar.update()
        if not used:
            raise SystemExit(f"no story reached step {t} under {sampler.describe()}: lower --step")
        seed = args.seed + 100 * k
        cache[sampler] = {"cf": cf, "iv": iv, "n": len(used), "example": example, "seconds": time.time() - t0,
                          "cf_ci": bootstrap_mean(cf, seed=seed), "iv_ci": bootstrap_mean(iv, seed=seed + 1),
                          "gap_ci": paired_difference(iv, cf, seed=seed + 2)}
    bar.close()

    table = []
    for sweep, value, sampler in grid:
        got = cache[sampler]
        (cm, cl, ch), (im, il, ih), (gm, gl, gh) = ci(got["cf_ci"]), ci(got["iv_ci"]), ci(got["gap_ci"])
        gap = got["gap_ci"]
        real = ("too few stories (< 20)" if got["n"] < 20 else "yes" if gap.low > 0
                else "reversed" if gap.high < 0 else "no")
        table.append({"sweep": sweep, "value": value, "sampler": sampler.describe(), "n": got["n"],
                      "counterfactual_mean": cm, "counterfactual_low": cl, "counterfactual_high": ch,
                      "interventional_mean": im, "interventional_low": il, "interventional_high": ih,
                      "gap": gm, "gap_low": gl, "gap_high": gh, "gap_excludes_0": real,
                      "seconds": round(got["seconds"], 1)})

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "stability.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    lines = [f"{args.n} stories per setting (prompt i mod {len(STORIES)}, seed {args.seed} + i), {args.new_tokens} "
             f"new tokens, do(y_{t} = alternative); 95 % bootstrap (BCa) intervals; "
             f"{(time.time() - start) / 60:.1f} min in all.", "",
             "| sweep | value | n | counterfactual | interventional | gap (interventional - counterfactual, paired) "
             "| gap real? |", "|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['sweep']} | {row['value']} | {row['n']} | {row['counterfactual_mean']:.3f} "
                     f"[{row['counterfactual_low']:.3f}, {row['counterfactual_high']:.3f}] | "
                     f"{row['interventional_mean']:.3f} [{row['interventional_low']:.3f}, "
                     f"{row['interventional_high']:.3f}] | {row['gap']:.3f} [{row['gap_low']:.3f}, "
                     f"{row['gap_high']:.3f}] | {row['gap_excludes_0']} |")
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
            mean = [r[f"{key}_mean"] for r in rows]
            err = [[r[f"{key}_mean"] - r[f"{key}_low"] for r in rows], [r[f"{key}_high"] - r[f"{key}_mean"]
                                                                         for r in rows]]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=name, color=colour)
        ax.set_xticks(x, [r["value"] for r in rows])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised edit distance to factual\n(after the intervened token)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"do(y_{t} = alternative) on SmolLM2-135M-Instruct, {args.n} stories per setting, "
                 f"{args.new_tokens} new tokens (95 % bootstrap intervals)")
    fig.tight_layout()
    fig.savefig(args.out / "stability.png", dpi=110)
    plt.close(fig)
    ex = cache[grid[0][2]]["example"]
    print(f"\nexample ({grid[0][2].describe()}, first usable story):")
    print("  factual:       ", repr(ex.factual_texts[0]))
    print("  counterfactual:", repr(ex.counterfactual_texts[0]))
    print("  interventional:", repr(ex.interventional_texts[0]))
    print(f"total {time.time() - start:.0f} s; wrote {args.out}/stability.{{csv,md,png}}")


if __name__ == "__main__":
    main()
