"""Rebuild the activation-patching example for the embedded SmolLM2-135M-Instruct.

An interchange (``pv.VanillaIntervention``) on one layer's block output at the
landmark's last token: the base prompt is about the Eiffel Tower, the source
prompt about the Colosseum. The script sweeps layers and two sites, the landmark's last token and the
prompt's last token, and keeps the pair where patching moves the most
probability from " Paris" to " Rome" at the next token. The sweep table
(``sweep.md``) shows what it found: the landmark's own position carries little
on its own in this model, while the last position at late layers (24 on), where
the answer is being assembled, moves it decisively.
The catalogue entry ``patch_landmark_city`` (``cfgen/catalogue_data/patch_landmark_city``)
holds the pyvene intervention (``cfgen.save``) and ``example.json`` with the prompts
and ``unit_locations`` that go with it (``cfgen.catalogue.example("patch_landmark_city")``).

Run: ``python interventions/patch_landmark_city/build.py`` (under a minute).
Then: ``cfgen run --intervention patch_landmark_city``
``--prompt "The Eiffel Tower is located in the city of" --source "The Colosseum is located in the city of"``
``--unit-locations '{"sources->base": [9, 9]}'`` (the positions example.json records).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyvene as pv
import torch

import cfgen
from cfgen import persist

HERE = Path(__file__).resolve().parent
# the saved folder ships inside the package (cfgen.catalogue); this writes the source tree's copy
OUT = HERE.parents[1] / "cfgen" / "catalogue_data" / "patch_landmark_city"
BASE = "The Eiffel Tower is located in the city of"
SOURCE = "The Colosseum is located in the city of"
LAYERS = list(range(0, 30, 3))


def last_subject_token(tokenizer, prompt: str, subject: str) -> int:
    prefix = prompt[: prompt.index(subject) + len(subject)]
    return len(tokenizer(prefix)["input_ids"]) - 1


def main() -> None:
    model, tok = cfgen.load_default_model()
    base = tok(BASE, return_tensors="pt")["input_ids"]
    source = tok(SOURCE, return_tensors="pt")["input_ids"]
    b_pos = last_subject_token(tok, BASE, "The Eiffel Tower")
    s_pos = last_subject_token(tok, SOURCE, "The Colosseum")
    paris, rome = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Paris", " Rome"))
    assert base.shape == source.shape, "the two prompts must tokenize to the same length"
    sites = {"landmark's last token": (s_pos, b_pos), "prompt's last token": (base.shape[1] - 1,) * 2}
    rows = []
    for site, (sp, bp) in sites.items():
        for layer in LAYERS:
            patch = pv.IntervenableModel({"layer": layer, "component": "block_output",
                                          "intervention_type": pv.VanillaIntervention}, model)
            with torch.no_grad():
                _, out = patch({"input_ids": base}, sources=[{"input_ids": source}],
                               unit_locations={"sources->base": ([[[sp]]], [[[bp]]])})
            p = out.logits[0, -1].softmax(-1)
            rows.append((site, layer, float(p[paris]), float(p[rome])))
    site, layer = max(rows, key=lambda r: r[3] - r[2])[:2]
    s_pos, b_pos = sites[site]
    with torch.no_grad():
        p0 = model(base).logits[0, -1].softmax(-1)
    table = ["| site | layer | p(Paris) | p(Rome) |", "|---|---|---|---|",
             f"| unpatched | - | {p0[paris]:.3f} | {p0[rome]:.3f} |"]
    table += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} |" for r in rows]
    text = "\n".join(table) + f"\n\nChosen: the {site} at layer {layer} (largest p(Rome) - p(Paris)).\n"
    print(text)
    (HERE / "sweep.md").write_text(text)
    patch = pv.IntervenableModel({"layer": layer, "component": "block_output",
                                  "intervention_type": pv.VanillaIntervention}, model)
    persist.save(patch, OUT)
    (OUT / "example.json").write_text(json.dumps(
        {"prompt": BASE, "source": SOURCE, "layer": layer,
         "unit_locations": {"sources->base": [s_pos, b_pos]}}, indent=2) + "\n")
    print(f"saved layer-{layer} patch; positions source {s_pos} -> base {b_pos}")


if __name__ == "__main__":
    main()
