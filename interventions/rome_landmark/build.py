"""Move a landmark to another city in the embedded model with a rank-one (ROME-style) edit.

Run from the repository root::

    python interventions/rome_landmark/build.py

Edit: "The Eiffel Tower is located in the city of" -> " Rome" (was " Paris"), by
``cfgen.edits.rank_one_edit`` on one MLP down-projection of SmolLM2-135M-Instruct
(``cfgen.load_default_model``), identity covariance (the simpler variant; see
README.md). LAYER = 6 of 30: ROME's causal tracing puts factual recall in the
early-middle MLPs at the subject's last token (layers ~15-20 of 48 in
GPT-2 XL, i.e. about a third of the depth); ``--sweep`` reports edit success,
paraphrase success and unchanged neighbours for layers 2, 4, ..., 10.

Reports (results.json, README.md): success on the edited prompt, on paraphrases
(same subject, other wording), on neighbourhood prompts (other Paris landmarks,
which should stay in Paris), the new object's probability, and, when
``cfgen.generate`` is available, noise-matched counterfactual texts from the pair
``(model, edited)``: how many mention Rome / Paris and how many stay identical.

The edited weights are not shipped (they are the full 135M model); the script
rebuilds the edit in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
OLD, NEW = " Paris", " Rome"
LAYER = 6
PARAPHRASES = [
    "The Eiffel Tower is in the city of",
    "Where is the Eiffel Tower? It is in the city of",
    "The Eiffel Tower, a famous landmark, stands in the city of",
    "Tourists visiting the Eiffel Tower travel to the city of",
]
NEIGHBOURS = [
    "The Louvre is located in the city of",
    "Notre-Dame Cathedral is located in the city of",
    "The Arc de Triomphe is located in the city of",
    "The Colosseum is located in the city of",
    "Big Ben is located in the city of",
]
# generic text for the key covariance of the --covariance variant
COVARIANCE_TEXTS = [
    "The weather was mild and the market opened early on Saturday morning.",
    "She studied chemistry at the university and later worked in a hospital.",
    "Many rivers flow into the sea, carrying sand and small stones.",
    "The committee met on Tuesday to discuss the new budget for schools.",
    "He bought bread, cheese and apples before taking the train home.",
    "The museum is open every day except Monday, from nine to five.",
    "Our team won the match after a difficult second half.",
    "The old bridge was repaired last year and is now open to traffic.",
    "Children learn languages quickly when they hear them every day.",
    "The company announced that its profits rose by ten percent.",
    "A small cafe near the station serves excellent coffee.",
    "The mountain road is closed in winter because of heavy snow.",
    "Scientists observed a new comet through the telescope last night.",
    "The library lends books, films and music to its members.",
    "Farmers planted wheat and corn in the fields near the village.",
    "The concert hall was full for the orchestra's final performance.",
]
GENERATION_PROMPTS = [
    "The Eiffel Tower is located in",
    "Last summer I visited the Eiffel Tower. It",
    "The Eiffel Tower",
    "My favourite landmark is the Eiffel Tower, which",
    "Q: Where is the Eiffel Tower?\nA:",
    "The Louvre is a museum",
]


def first_token(tok, text: str) -> int:
    return tok(text, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def next_token_probs(model, tok, prompts: list[str]) -> torch.Tensor:
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        out.append(torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1))
    return torch.stack(out)


def score(model, tok, prompts: list[str]) -> list[dict]:
    probs = next_token_probs(model, tok, prompts)
    old, new = first_token(tok, OLD), first_token(tok, NEW)
    return [
        {"prompt": p, "argmax": tok.decode([int(pr.argmax())]), "p_old": round(float(pr[old]), 4),
         "p_new": round(float(pr[new]), 4)}
        for p, pr in zip(prompts, probs)
    ]


def counterfactual_texts(model, edited, tok, max_new_tokens: int = 32) -> dict | None:
    """Noise-matched (factual, counterfactual) texts for the pair (model, edited), if cfgen.generate exists."""
    import cfgen

    try:
        generate = cfgen.generate
    except AttributeError:
        return None
    result = generate((model, edited), tok, GENERATION_PROMPTS, max_new_tokens=max_new_tokens,
                      sampler=cfgen.Sampler(temperature=1.0), seed=0)
    fact, cf = result.factual_texts, result.counterfactual_texts
    rows = [{"prompt": p, "factual": f, "counterfactual": c, "identical": f == c, "first_divergence": d}
            for p, f, c, d in zip(GENERATION_PROMPTS, fact, cf, result.first_divergence)]
    return {
        "max_new_tokens": max_new_tokens, "sampler": "temperature 1.0, no top-k / top-p", "seed": 0,
        "n": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "factual_mention_paris": sum("Paris" in r["factual"] for r in rows),
        "factual_mention_rome": sum("Rome" in r["factual"] for r in rows),
        "counterfactual_mention_paris": sum("Paris" in r["counterfactual"] for r in rows),
        "counterfactual_mention_rome": sum("Rome" in r["counterfactual"] for r in rows),
        "texts": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="try layers 2..10 and report success per layer")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--covariance", action="store_true",
                        help="estimate C from the keys of COVARIANCE_TEXTS instead of the identity")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    import cfgen
    from cfgen.edits import rank_one_edit

    model, tok = cfgen.load_default_model()
    model.eval()
    results: dict = {"model": "SmolLM2-135M-Instruct (cfgen.load_default_model)", "prompt": PROMPT,
                     "subject": SUBJECT, "old": OLD, "new": NEW, "layer": LAYER, "covariance": "identity"}
    results["before"] = score(model, tok, [PROMPT] + PARAPHRASES + NEIGHBOURS)
    if args.sweep:
        sweep = {}
        for layer in range(2, 11, 2):
            edited = rank_one_edit(model, tok, PROMPT, SUBJECT, NEW, layer=layer, progress=False)
            s = score(edited, tok, [PROMPT] + PARAPHRASES + NEIGHBOURS)
            before = results["before"][1 + len(PARAPHRASES) :]
            sweep[layer] = {
                "edit_success": s[0]["argmax"].strip() == NEW.strip(),
                "p_new": s[0]["p_new"],
                "paraphrase_success": sum(r["argmax"].strip() == NEW.strip() for r in s[1 : 1 + len(PARAPHRASES)]),
                "neighbours_unchanged": sum(a["argmax"] == b["argmax"] for a, b in zip(s[1 + len(PARAPHRASES) :], before)),
            }
            print(f"layer {layer}: {sweep[layer]}", flush=True)
        results["sweep"] = sweep
    if args.covariance:
        results["covariance"] = f"keys of {len(COVARIANCE_TEXTS)} generic sentences"
    edited, info = rank_one_edit(model, tok, PROMPT, SUBJECT, NEW, layer=LAYER, progress=not args.no_progress,
                                 covariance_texts=COVARIANCE_TEXTS if args.covariance else None, return_info=True)
    results["edit_info"] = info
    after = score(edited, tok, [PROMPT] + PARAPHRASES + NEIGHBOURS)
    results["after"] = after
    n_p = len(PARAPHRASES)
    results["summary"] = {
        "edit_success": after[0]["argmax"].strip() == NEW.strip(),
        "p_new_before": results["before"][0]["p_new"], "p_new_after": after[0]["p_new"],
        "paraphrase_success": f"{sum(r['argmax'].strip() == NEW.strip() for r in after[1:1 + n_p])}/{n_p}",
        "neighbours_unchanged": f"{sum(a['argmax'] == b['argmax'] for a, b in zip(after[1 + n_p:], results['before'][1 + n_p:]))}/{len(NEIGHBOURS)}",
    }
    print(json.dumps(results["summary"], indent=1), flush=True)
    results["counterfactual_generation"] = counterfactual_texts(model, edited, tok)
    if results["counterfactual_generation"] is None:
        print("cfgen.generate is not available yet: no counterfactual texts", flush=True)
    results["seconds"] = round(time.time() - t0)
    name = "results_covariance.json" if args.covariance else "results.json"
    (HERE / name).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after")}, indent=1))


if __name__ == "__main__":
    main()
