"""How strong can the "dark" steering vector be before its counterfactuals stop being fluent?

The demo's steering section (``cfgen demo``) uses the catalogue entry
``steering_dark`` times a scale. This script measures, for several multiples of
the saved vector, on the demo's own request and sampler (``cfgen.demo``: the
lighthouse-keeper story in the chat template, temperature 0.7, 40 new tokens)
over 16 seeds (0-15):

* fluency: the mean log-probability per token of the counterfactual texts under
  the *factual* (unsteered) model at temperature 1, against the same number for
  the factual texts (scale 0);
* identical: the share of seeds whose counterfactual equals the factual text;
* first divergence: the median step where they part;
* dark words: mean count per text of dark words (the build's list, any form).

Rule, fixed before the run: the demo takes the largest scale whose
counterfactuals lose at most ``MAX_DROP`` nats per token of fluency against the
factual texts and change at least half of the texts. Table and choice go to
``scale_sweep.md`` next to this script; ``cfgen.demo.STEERING_SCALE`` must match
(a test checks it).

Run: ``python interventions/steering_dark/scale_sweep.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

import cfgen
from cfgen import demo

HERE = Path(__file__).resolve().parent
SCALES = [0.125, 0.25, 0.5, 1.0]
SEEDS = 16
MAX_NEW_TOKENS = 40
MAX_DROP = 0.5  # nats per token
DARK = re.compile(r"\b(dark|fear|blood|scream|night|shadow|dead|horror|terror|cold|death|ghost|evil|monster)",
                  re.IGNORECASE)


def mean_logprob(model, prompt: list[int], ids: list[int]) -> float:
    """Mean log p(token | prefix) of ``ids`` after ``prompt`` under ``model`` at temperature 1."""
    if not ids:
        return float("nan")
    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        logp = model(seq).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids)[:, None]).mean().item()


def main() -> None:
    t0 = time.time()
    model, tok = cfgen.load_default_model()
    prompt = demo.chat_prompt(tok, demo.STORY)
    sampler = cfgen.Sampler(temperature=demo.TEMPERATURE)
    rows, factual = [], None
    for scale in SCALES:
        steer = demo.scale_steering(cfgen.catalogue.load("steering_dark", model), scale)
        res = cfgen.generate(steer, tok, [prompt], max_new_tokens=MAX_NEW_TOKENS, sampler=sampler, seed=0,
                             num_samples=SEEDS)
        if factual is None:
            factual = res.factual_ids
            lp = [mean_logprob(model, prompt, ids) for ids in factual]
            dark = [len(DARK.findall(t)) for t in res.factual_texts]
            rows.append((0.0, statistics.mean(lp), 1.0, None, statistics.mean(dark)))
        assert res.factual_ids == factual, "the factual texts must not depend on the intervention"
        lp = [mean_logprob(model, prompt, ids) for ids in res.counterfactual_ids]
        dark = [len(DARK.findall(t)) for t in res.counterfactual_texts]
        div = [d if d is not None else MAX_NEW_TOKENS for d in res.first_divergence]
        rows.append((scale, statistics.mean(lp), sum(res.identical) / SEEDS, statistics.median(div),
                     statistics.mean(dark)))
        print(f"scale {scale}: done [{time.time() - t0:.0f}s]", flush=True)
        if scale == demo.STEERING_SCALE or scale == SCALES[-1]:
            print(f"  seed 0 factual:        {res.factual_texts[0]!r}\n  seed 0 counterfactual: "
                  f"{res.counterfactual_texts[0]!r}", flush=True)

    ref = rows[0][1]
    ok = [r for r in rows[1:] if ref - r[1] <= MAX_DROP and r[2] <= 0.5]
    chosen = max(ok, key=lambda r: r[0])[0] if ok else min(SCALES)
    table = ["| scale (x saved vector) | mean log-prob / token (factual model) | drop vs factual | identical texts "
             "| median first divergence (step) | dark words / text |", "|---|---|---|---|---|---|"]
    for scale, lp, same, div, dark in rows:
        name = "0 (factual texts)" if scale == 0 else f"{scale:g}"
        table.append(f"| {name} | {lp:.2f} | {ref - lp:+.2f} | {same:.0%} | {'-' if div is None else f'{div:g}'} "
                     f"| {dark:.2f} |")
    text = (f"Sweep over strengths of `steering_dark` (`scale_sweep.py`): the demo's request and sampler "
            f"({sampler.describe()}), {MAX_NEW_TOKENS} new tokens, seeds 0-{SEEDS - 1}, embedded "
            "SmolLM2-135M-Instruct.\n\n" + "\n".join(table)
            + f"\n\nRule (fixed before the run): the largest scale whose counterfactuals lose at most {MAX_DROP} "
            f"nats/token against the factual texts and change at least half of them.\n\nChosen: {chosen:g}\n")
    print(text)
    (HERE / "scale_sweep.md").write_text(text, encoding="utf-8")
    print(f"[{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
