"""Rebuild the RAVEL-style Country interventions (DAS and MDAS) for the embedded model.

Run from the repository root::

    python interventions/ravel_country/build.py            # uses the shipped subset (cfgen.catalogue.data_path)
    python interventions/ravel_country/build.py --ravel /path/to/ravel   # re-derive the subset first

What it does (everything seeded and deterministic; about 4-6 minutes on 2
shared CPU cores with one thread, see README.md):

1. Data: a subset of RAVEL's city part (MIT licence, its LICENSE file beside it;
   ``cfgen/catalogue_data/data/ravel_city``, shipped in the package): 150
   cities of the N_COUNTRIES most frequent countries that the model can place
   (``make_subset``, only with ``--ravel``), and four short prompt templates
   from RAVEL's lists: two for the target attribute Country, one each for
   Continent and Language (used for Isolate). RAVEL's entity split decides
   train (its train split) vs held-out (its test + val splits) cities.
2. Labels are the model's own greedy next token for every (template, city)
   prompt (its belief, as in RAVEL). A city is kept when its Country answers are
   consistent: both Country templates give the same country word.
3. Pairs: Cause = (base city, source city) on a Country prompt, label = the
   model's answer for the *source* city on the base's template, kept when it
   differs from the base's answer. Isolate = Continent / Language prompt of the
   base city with a source city's Country prompt, label = the *base* city's
   answer, kept when the source city's answer on that template differs.
   The intervention sits at the last token of the city name, in base and source.
4. Layer: LAYER = 8 of 30 (``block_output``, residual stream after block 8).
   Why: a scan (``--scan`` / ``--scan-only``; numbers in README.md) of a
   full-vector interchange at the city's last token on the held-out Cause pairs
   shows the Country answer follows the source city at layers 4-20 (peak 0.81
   at layer 8) and not at all from layer 24 on (by then attention has copied the
   attribute to the final token). Layer 8 is the peak: the attribute is already
   enriched onto the entity token and not yet copied out; an earlier layer would
   also make backpropagation through the frozen model cost more.
5. DAS (Cause loss only) and MDAS (Cause + Isolate loss) with a rank-RANK
   ``pv.LowRankRotatedSpaceIntervention`` (``cfgen.abstraction``); Cause /
   Isolate / Disentangle on pairs of held-out cities only; both saved with
   ``cfgen.persist.save`` as the catalogue entries ``ravel_country_das`` and
   ``ravel_country_mdas`` (``cfgen/catalogue_data/``), numbers into results.json.
6. If ``cfgen.generate`` exists: noise-matched counterfactual text about a
   held-out city whose Country subspace comes from another city
   (``counterfactual_example``; ``--example-only`` reruns just this).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# the saved folders ship inside the package (cfgen.catalogue: ravel_country_das, ravel_country_mdas)
CATALOGUE = HERE.parents[1] / "cfgen" / "catalogue_data"
DATA = CATALOGUE / "data" / "ravel_city"  # with its LICENSE; shipped so tutorials run from an install
LAYER = 8
RANK = 16
STEPS = 60
BATCH = 8
LR = 2e-2
SEED = 0
N_TRAIN_CITIES = 100
N_TEST_CITIES = 50
N_COUNTRIES = 20
# short templates (all from RAVEL's lists): on 2 CPU cores the cost is proportional to prompt length
TEMPLATES = {
    "Country": ["%s is a city in the country of", '[{"city": "%s", "country": "'],
    "Continent": ["%s is in the continent of"],
    "Language": ["People in %s usually speak"],
}
TARGET = "Country"


# --------------------------------------------------------------------------- data subset


def make_subset(ravel_dir: Path, model, tok, out: Path = DATA) -> None:
    """Write the shipped subset (and the licence) from a full RAVEL city folder.

    A 135M model knows the country of few of RAVEL's 3552 cities, so the subset
    is pre-filtered with the model itself: every city of the N_COUNTRIES most
    frequent countries is asked the first Country template once, and cities whose
    greedy answer starts the gold country are candidates; up to N_TRAIN_CITIES
    (RAVEL train split) and N_TEST_CITIES (RAVEL test + val splits, held out)
    are kept, round-robin over countries (seeded). This step takes a few minutes
    and runs only with ``--ravel``.
    """
    attrs = json.loads((ravel_dir / "ravel_city_entity_attributes.json").read_text())
    split = json.loads((ravel_dir / "ravel_city_entity_to_split.json").read_text())
    prompts = json.loads((ravel_dir / "ravel_city_attribute_to_prompts.json").read_text())
    for attr, tpls in TEMPLATES.items():
        missing = [t for t in tpls if t not in prompts[attr]]
        if missing:
            raise ValueError(f"templates not in RAVEL's {attr} prompts: {missing}")
    countries = [c for c, _ in Counter(v["Country"] for v in attrs.values()).most_common(N_COUNTRIES)]
    pool = sorted(c for c, v in attrs.items() if v["Country"] in countries and c.isascii() and "%" not in c)
    template = TEMPLATES[TARGET][0]
    answers = greedy_next(model, [city_last_token(tok, template, c)[0] for c in pool])
    known = [c for c, a in zip(pool, answers) if _names(tok, a, attrs[c][TARGET])]
    print(f"subset: the model names the RAVEL country of {len(known)}/{len(pool)} cities", flush=True)
    rng = random.Random(SEED)
    chosen = {}
    for part, n in (("train", N_TRAIN_CITIES), ("test", N_TEST_CITIES)):
        parts = {"train"} if part == "train" else {"test", "val"}
        by_country = {k: [c for c in known if split.get(c) in parts and attrs[c][TARGET] == k] for k in countries}
        for lst in by_country.values():
            rng.shuffle(lst)
        picked: list[str] = []
        while len(picked) < n and any(by_country.values()):
            for k in countries:
                if by_country[k] and len(picked) < n:
                    picked.append(by_country[k].pop())
        for c in picked:
            chosen[c] = part
    out.mkdir(parents=True, exist_ok=True)
    subset = {c: {a: attrs[c][a] for a in TEMPLATES} for c in sorted(chosen)}
    (out / "ravel_city_entity_attributes.json").write_text(json.dumps(subset, indent=1) + "\n")
    (out / "ravel_city_entity_to_split.json").write_text(json.dumps(dict(sorted(chosen.items())), indent=1) + "\n")
    (out / "ravel_city_attribute_to_prompts.json").write_text(json.dumps(TEMPLATES, indent=1) + "\n")
    (out / "LICENSE").unlink(missing_ok=True)
    (out / "LICENSE").write_bytes((ravel_dir / "LICENSE").read_bytes())


def _names(tok, token: int, country: str) -> bool:
    word = answer_word(tok, token)
    return len(word) > 1 and country.lower().startswith(word)


# --------------------------------------------------------------------------- labelling


def city_last_token(tok, template: str, city: str) -> tuple[list[int], int]:
    """Token ids of template % city and the index of the city's last token."""
    prompt = template % city
    enc = tok(prompt, return_offsets_mapping=True)
    end = template.index("%s") + len(city)  # char index just past the city
    pos = max(i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > s)
    return enc["input_ids"], pos


@torch.no_grad()
def greedy_next(model, prompts_ids: list[list[int]], batch: int = 64) -> list[int]:
    out = []
    for i in range(0, len(prompts_ids), batch):
        chunk = prompts_ids[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = torch.tensor([len(s) - 1 for s in chunk])
        out += logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
    return out


def label(model, tok, cities: list[str], attributes) -> dict:
    """{(attribute, template, city): (prompt ids, city's last token index, greedy next token)}."""
    keys, ids, pos = [], [], []
    for attr in attributes:
        for t in TEMPLATES[attr]:
            for c in cities:
                i, p = city_last_token(tok, t, c)
                keys.append((attr, t, c))
                ids.append(i)
                pos.append(p)
    answers = greedy_next(model, ids)
    return {k: (i, p, a) for k, i, p, a in zip(keys, ids, pos, answers)}


def answer_word(tok, token: int) -> str:
    return tok.decode([token]).strip(' "').lower()


def consistent(tok, labels: dict, city: str) -> bool:
    """The model names the same country (a real word, not 'the') for every Country template."""
    words = {answer_word(tok, labels[(TARGET, t, city)][2]) for t in TEMPLATES[TARGET]}
    word = words.pop()
    return not words and len(word) > 2 and word.isalpha() and word not in {"the", "city", "country"}


# --------------------------------------------------------------------------- pairs


def make_pairs(labels: dict, cities: list[str], rng: random.Random, n_cause: int, n_isolate: int):
    from cfgen.abstraction import InterchangeExample

    cause, isolate = [], []
    country_t = TEMPLATES[TARGET]
    others = [(a, t) for a in TEMPLATES if a != TARGET for t in TEMPLATES[a]]
    tries = 0
    while (len(cause) < n_cause or len(isolate) < n_isolate) and tries < 100 * (n_cause + n_isolate):
        tries += 1
        b, s = rng.sample(cities, 2)
        src_t = rng.choice(country_t)
        s_ids, s_pos, _ = labels[(TARGET, src_t, s)]
        if len(cause) < n_cause:
            t = rng.choice(country_t)
            b_ids, b_pos, b_ans = labels[(TARGET, t, b)]
            s_ans = labels[(TARGET, t, s)][2]
            if s_ans != b_ans:
                cause.append(InterchangeExample(b_ids, s_ids, s_ans, b_pos, s_pos))
        if len(isolate) < n_isolate:
            a, t = rng.choice(others)
            b_ids, b_pos, b_ans = labels[(a, t, b)]
            if labels[(a, t, s)][2] != b_ans:
                isolate.append(InterchangeExample(b_ids, s_ids, b_ans, b_pos, s_pos))
    return cause, isolate


# --------------------------------------------------------------------------- main


def scan_layers(model, cause, layers):
    """Full-vector interchange (VanillaIntervention) at the city token: Cause per layer."""
    import pyvene as pv

    from cfgen.abstraction import cause_score

    out = {}
    for layer in layers:
        iv = pv.IntervenableModel(
            pv.IntervenableConfig(representations=[pv.RepresentationConfig(layer=layer, component="block_output")],
                                  intervention_types=pv.VanillaIntervention),
            model,
        )
        out[layer] = round(cause_score(iv, cause), 3)
        print(f"  layer {layer:2d}: full-vector interchange Cause {out[layer]:.3f}", flush=True)
    return out


EXAMPLE_TEMPLATES = [
    "%s is a city in the country of",
    "I just moved to %s. The best thing about living here is",
    "Welcome to %s! This city is famous for",
]


def counterfactual_example(intervenable, tok, attrs: dict, labels: dict, cities: list[str],
                           max_new_tokens: int = 32) -> dict | None:
    """Noise-matched text about a city whose Country subspace comes from another city (cfgen.generate)."""
    import cfgen

    try:
        generate = cfgen.generate
    except AttributeError:
        return None
    from cfgen.abstraction import InterchangeExample, interchange_logits

    t0 = TEMPLATES[TARGET][0]
    # the first pair of held-out cities (alphabetical) that the model places in different countries and
    # for which the greedy Cause interchange succeeds on the first Country template
    answer = {c: answer_word(tok, labels[(TARGET, t0, c)][2]) for c in cities}
    pair = None
    for base in cities:
        for source in cities:
            if answer[source] == answer[base]:
                continue
            b_ids, b_pos, _ = labels[(TARGET, t0, base)]
            s_ids, s_pos, s_ans = labels[(TARGET, t0, source)]
            ex = InterchangeExample(b_ids, s_ids, s_ans, b_pos, s_pos)
            if int(interchange_logits(intervenable, [ex]).argmax()) == s_ans:
                pair = (base, source)
                break
        if pair:
            break
    if pair is None:
        return {"note": "no held-out pair where the Cause interchange succeeds"}
    base, source = pair
    prompts, src_prompts, src_locs, base_locs = [], [], [], []
    for t in EXAMPLE_TEMPLATES:
        ids, pos = city_last_token(tok, t, base)
        s_ids, s_pos = city_last_token(tok, t0, source)
        prompts.append(t % base)
        src_prompts.append(t0 % source)
        base_locs.append([pos])
        src_locs.append([s_pos])
    result = generate(intervenable, tok, prompts, max_new_tokens=max_new_tokens, seed=0,
                      sampler=cfgen.Sampler(temperature=0.7),
                      sources=src_prompts, unit_locations={"sources->base": (src_locs, base_locs)})
    base_country, source_country = attrs[base][TARGET], attrs[source][TARGET]
    rows = [
        {"prompt": p, "source": sp, "factual": f, "counterfactual": c, "identical": f == c}
        for p, sp, f, c in zip(prompts, src_prompts, result.factual_texts, result.counterfactual_texts)
    ]
    return {
        "base_city": base, "base_country_model": answer[base], "source_city": source,
        "source_country_model": answer[source], "max_new_tokens": max_new_tokens,
        "sampler": "temperature 0.7", "seed": 0,
        "identical": sum(r["identical"] for r in rows),
        "factual_mentions_base_country": sum(base_country in r["factual"] for r in rows),
        "counterfactual_mentions_base_country": sum(base_country in r["counterfactual"] for r in rows),
        "factual_mentions_source_country": sum(source_country in r["factual"] for r in rows),
        "counterfactual_mentions_source_country": sum(source_country in r["counterfactual"] for r in rows),
        "texts": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ravel", type=Path, help="full RAVEL city folder to re-derive the shipped subset from")
    parser.add_argument("--scan", action="store_true", help="also scan layers with full-vector interchange")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--scan-only", action="store_true", help="only the layer scan (into results.json)")
    parser.add_argument("--example-only", action="store_true",
                        help="only regenerate the counterfactual-text example from the saved DAS and MDAS entries")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()

    import cfgen
    from cfgen import persist
    from cfgen.abstraction import evaluate, make_intervenable, rotation_config, train_das, train_mdas

    model, tok = cfgen.load_default_model()
    model.eval()
    if args.ravel is not None:
        make_subset(args.ravel, model, tok)
        print(f"subset written to {DATA}  [{time.time() - t0:.0f}s]", flush=True)
    attrs = json.loads((DATA / "ravel_city_entity_attributes.json").read_text())
    split = json.loads((DATA / "ravel_city_entity_to_split.json").read_text())
    cities = sorted(attrs)
    labels = label(model, tok, cities, [TARGET])
    kept = [c for c in cities if consistent(tok, labels, c)]
    labels.update(label(model, tok, kept, [a for a in TEMPLATES if a != TARGET]))
    correct = sum(attrs[c][TARGET].lower().startswith(answer_word(tok, labels[(TARGET, TEMPLATES[TARGET][0], c)][2]))
                  for c in kept)
    train = [c for c in kept if split[c] == "train"]
    test = [c for c in kept if split[c] == "test"]
    print(f"labelled {len(labels)} prompts; kept {len(kept)}/{len(cities)} consistent cities ({correct} match RAVEL) "
          f"({len(train)} train, {len(test)} held-out)  [{time.time() - t0:.0f}s]", flush=True)

    if args.example_only:
        results = json.loads((HERE / "results.json").read_text())
        for name in ("das", "mdas"):
            iv = persist.load(CATALOGUE / f"ravel_country_{name}", model)
            results[f"counterfactual_example_{name}"] = counterfactual_example(iv, tok, attrs, labels, test)
            print(json.dumps(results[f"counterfactual_example_{name}"], indent=1), flush=True)
        (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return

    rng = random.Random(SEED)
    cause_tr, iso_tr = make_pairs(labels, train, rng, 480, 480)
    cause_te, iso_te = make_pairs(labels, test, rng, 64, 64)
    print(f"pairs: train {len(cause_tr)} cause / {len(iso_tr)} isolate; "
          f"held-out {len(cause_te)} / {len(iso_te)}", flush=True)

    results: dict = {
        "model": "SmolLM2-135M-Instruct (cfgen.load_default_model)",
        "layer": LAYER, "component": "block_output", "rank": RANK, "steps": STEPS, "batch_size": BATCH,
        "lr": LR, "seed": SEED,
        "cities": {"consistent": len(kept), "of": len(cities), "consistent_and_match_ravel": correct, "train": len(train), "held_out": len(test)},
        "pairs": {"train_cause": len(cause_tr), "train_isolate": len(iso_tr),
                  "held_out_cause": len(cause_te), "held_out_isolate": len(iso_te)},
    }
    if args.scan or args.scan_only:
        scan = scan_layers(model, cause_te, range(0, 30, 4))
        if args.scan_only:
            results = json.loads((HERE / "results.json").read_text())
            results["layer_scan_full_interchange_cause"] = scan
            (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            return
        results["layer_scan_full_interchange_cause"] = scan

    config = rotation_config(LAYER, rank=RANK)
    untrained = make_intervenable(model, config, seed=SEED)
    results["untrained"] = evaluate(untrained, cause_te, iso_te)
    print(f"untrained rotation: {results['untrained']}  [{time.time() - t0:.0f}s]", flush=True)
    for name in ("das", "mdas"):
        config = rotation_config(LAYER, rank=RANK)
        if name == "das":
            iv = train_das(model, cause_tr, config=config, steps=STEPS, lr=LR, batch_size=BATCH, seed=SEED,
                           progress=not args.no_progress)
        else:
            iv = train_mdas(model, cause_tr, iso_tr, config=config, steps=STEPS, lr=LR, batch_size=BATCH,
                            seed=SEED, progress=not args.no_progress)
        results[name] = evaluate(iv, cause_te, iso_te)
        results[name + "_train"] = evaluate(iv, cause_tr[:32], iso_tr[:32])
        persist.save(iv, CATALOGUE / f"ravel_country_{name}")
        results[f"counterfactual_example_{name}"] = counterfactual_example(iv, tok, attrs, labels, test)
        print(f"{name}: held-out {results[name]}  train {results[name + '_train']}  [{time.time() - t0:.0f}s]",
              flush=True)
    results["seconds"] = round(time.time() - t0)
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
