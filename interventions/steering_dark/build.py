"""Rebuild the "dark" steering vector for the embedded SmolLM2-135M-Instruct.

The vector is the difference of mean block outputs between two contrasting
prompt sets (dark / frightening vs bright / cheerful sentences), averaged over
token positions 1.. (position 0 is the attention sink, whose huge activation
norm would swamp the contrast), scaled by ``COEFFICIENT``, and added at every
position of one layer's block output (``pv.AdditionIntervention``).

Layer choice: the script sweeps layers and measures, on held-out story prompts
that are not in either set, how much the steered model raises the log-probability
of dark words at the next token and how far (KL) it moves the next-token
distribution. It keeps the layer with the largest dark-word shift among
those whose KL stays below ``MAX_KL`` (larger moves break fluency). The sweep's
table is printed and written to ``sweep.md``; the intervention is saved as the
catalogue entry ``steering_dark`` (``cfgen/catalogue_data/steering_dark``).

Run: ``python interventions/steering_dark/build.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pyvene as pv
import torch

import cfgen
from cfgen import persist

HERE = Path(__file__).resolve().parent
# the saved folder ships inside the package (cfgen.catalogue); this writes the source tree's copy
OUT = HERE.parents[1] / "cfgen" / "catalogue_data" / "steering_dark"
LAYERS = [3, 6, 9, 12, 15, 18, 21, 24]
COEFFICIENT = 4.0
MAX_KL = 2.0

DARK = [
    "The night was cold and full of dread.", "A scream echoed through the dark, abandoned house.",
    "Blood dripped slowly from the rusty blade.", "The monster crept closer in the shadows.",
    "Fear gripped her as the candle went out.", "Something terrible was waiting in the cellar.",
    "The graveyard was silent except for the whispers of the dead.", "He felt a cold hand on his neck in the dark.",
]
BRIGHT = [
    "The morning was warm and full of joy.", "Laughter echoed through the bright, cheerful house.",
    "Sunlight sparkled softly on the calm lake.", "The puppy bounded happily across the meadow.",
    "Hope filled her as the sun came out.", "Something wonderful was waiting in the garden.",
    "The park was lively with the songs of the birds.", "He felt a warm hug from his friend in the sun.",
]
HELD_OUT = [
    "Once upon a time, in a small village, there lived", "The travellers reached the old castle and",
    "When Mia opened the door, she saw", "The story begins on a quiet evening, when",
]
DARK_WORDS = [" dark", " fear", " blood", " scream", " night", " shadows", " dead", " horror", " terror", " cold",
              " death", " ghost", " evil", " darkness", " monster"]


def mean_block_outputs(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """[layers + 1, d]: mean over texts of the mean over positions 1.. of each hidden state."""
    per_text = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states
        per_text.append(torch.stack([h[0, 1:].mean(0) for h in hidden]))
    return torch.stack(per_text).mean(0)


def steering_model(model, layer: int, vector: torch.Tensor):
    return pv.IntervenableModel(
        {"layer": layer, "component": "block_output",
         "intervention": pv.AdditionIntervention(embed_dim=vector.numel(), source_representation=vector)},
        model,
    )


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = cfgen.load_default_model()
    # hidden_states first: a pyvene forward removes transformers' output-capturing hooks.
    diff = mean_block_outputs(model, tokenizer, DARK) - mean_block_outputs(model, tokenizer, BRIGHT)
    word_ids = sorted({tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in DARK_WORDS})
    base = []
    for prompt in HELD_OUT:
        with torch.no_grad():
            base.append(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].log_softmax(-1))
    rows = []
    for layer in LAYERS:
        vector = COEFFICIENT * diff[layer + 1]  # hidden_states[i + 1] is block i's output
        steer = steering_model(model, layer, vector)
        shift = kl = 0.0
        for prompt, lp0 in zip(HELD_OUT, base):
            with torch.no_grad():
                _, out = steer({"input_ids": tokenizer(prompt, return_tensors="pt")["input_ids"]})
            lp = out.logits[0, -1].log_softmax(-1)
            shift += (lp[word_ids].logsumexp(-1) - lp0[word_ids].logsumexp(-1)).item() / len(HELD_OUT)
            kl += torch.sum(lp0.exp() * (lp0 - lp)).item() / len(HELD_OUT)
        rows.append((layer, float(vector.norm()), shift, kl))
    ok = [r for r in rows if r[3] <= MAX_KL] or rows
    layer, norm, shift, kl = max(ok, key=lambda r: r[2])
    table = ["| layer | vector norm | dark-word log-prob shift | KL(base ‖ steered) |", "|---|---|---|---|"]
    table += [f"| {r[0]} | {r[1]:.1f} | {r[2]:+.2f} | {r[3]:.2f} |" for r in rows]
    text = "\n".join(table) + f"\n\nChosen: layer {layer} (largest shift with KL <= {MAX_KL}).\n"
    print(text)
    (HERE / "sweep.md").write_text(text)

    vector = COEFFICIENT * diff[layer + 1]
    persist.save(steering_model(model, layer, vector), OUT)
    print(f"saved the layer-{layer} steering vector (norm {norm:.1f}) to {OUT}")


if __name__ == "__main__":
    main()
