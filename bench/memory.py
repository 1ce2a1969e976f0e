"""Peak memory of hindsight (``cfgen.counterfactual``) against ``cfgen.generate``, per fresh process.

On the embedded model with a steering vector at layer 9: one prompt, an
observed continuation of ``--tokens`` tokens (the model's own sample), and
``num_samples`` posterior draws S = 1, 8, 32, 64. Each measurement runs in a
fresh process and reports that process's peak resident memory (weights
included), next to ``cfgen.generate`` with ``num_samples=S`` (S factual and S
counterfactual rows) and to the model alone (loaded, one forward).

``python bench/memory.py`` (``--quick``: S = 1, 8 and 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

PROMPT = "Once upon a time, in a quiet harbour town,"


def _steer(model):
    import pyvene as pv

    vec = torch.linspace(-1.0, 1.0, model.config.hidden_size)
    return pv.IntervenableModel({"layer": 9, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=vec.numel(),
                                                                         source_representation=vec)}, model)


def measure(name: str, samples: int, tokens: int) -> dict:
    import cfgen

    torch.set_num_threads(1)
    model, tok = cfgen.load_default_model()
    steer = _steer(model)
    with torch.no_grad():
        model(**tok(PROMPT, return_tensors="pt"))
    observed = cfgen.generate((model, model), tok, PROMPT, max_new_tokens=tokens, seed=99, eos_token_id=[]).factual_ids
    t0 = time.perf_counter()
    if name == "counterfactual":
        cfgen.counterfactual(steer, tok, PROMPT, observed, num_samples=samples, seed=0, eos_token_id=[])
    elif name == "generate":
        cfgen.generate(steer, tok, PROMPT, max_new_tokens=tokens, num_samples=samples, seed=0, eos_token_id=[])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)
    return {"name": name, "samples": samples, "seconds": seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S = 1, 8 and 16 tokens")
    parser.add_argument("--tokens", type=int, default=64, help="length of the observed text")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = 16 if args.quick else args.tokens
    if args.measure:
        print(json.dumps(measure(args.measure, args.samples, tokens)))
        return

    def run(name, samples):
        cmd = [sys.executable, __file__, "--measure", name, "--samples", str(samples), "--tokens", str(tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = run("model", 1)
    print(f"embedded SmolLM2-135M-Instruct, {tokens}-token observed text, 1 thread, fresh process each; "
          f"model alone: {base['peak_mib']:.0f} MiB peak")
    print(f"{'S':>3s} {'counterfactual MiB':>19s} {'generate MiB':>13s} {'ratio':>6s} "
          f"{'cf above model':>15s} {'gen above model':>16s}")
    for s in (1, 8) if args.quick else (1, 8, 32, 64):
        cf, gen = run("counterfactual", s), run("generate", s)
        print(f"{s:3d} {cf['peak_mib']:19.0f} {gen['peak_mib']:13.0f} {cf['peak_mib'] / gen['peak_mib']:6.2f} "
              f"{cf['peak_mib'] - base['peak_mib']:15.0f} {gen['peak_mib'] - base['peak_mib']:16.0f}")


if __name__ == "__main__":
    main()
