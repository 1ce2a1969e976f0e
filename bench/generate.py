"""cfgen's factual + counterfactual pair vs two HF generate calls, and hindsight vs a reference.

On the embedded model with the shipped steering vector (layer 9), 64 new tokens:

* pair: ``cfgen.generate`` (factual + counterfactual in one batch) against two
  ``model.generate(do_sample=True)`` calls, base and intervened (the intervened
  one adds the same vector with a plain forward hook: the cheapest intervened HF
  path), at B = 1 and B = 8;
* hindsight, 32 observed strings: ``cfgen.counterfactual`` (batched) against a
  reference pipeline at batch 1 (teacher-forced logits, a per-step posterior
  loop that exponentiates the logits and truncates torch Gumbels one step at a
  time, then HF generate with a logits processor that injects that noise);
* peak memory: each measurement runs in a fresh process and reports that
  process's peak resident memory (the model's weights included).

Ratios are measured side by side in one run. ``python bench/generate.py``
(add ``--quick`` for fewer tokens and strings). ``--device cuda`` runs on a GPU
(time after ``torch.cuda.synchronize``; peak memory is then the GPU's
``max_memory_allocated``), ``--model llama3-8b-shapes`` on a randomly
initialised bf16 model with Llama-3-8B's shapes (speed needs no trained
weights; prompts from the embedded tokenizer), ``--batches 1,8,64`` picks the
batch sizes. Tokens per second count the new tokens of every row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

STORIES = ["Once upon a time, in a quiet harbour town,", "The robot looked at the stars and",
           "On the first day of winter, the old baker", "Deep in the forest, a small fox",
           "The captain of the ship called her crew and", "When the library closed, the cat",
           "Every morning, the gardener", "High above the city, a lonely cloud"]


LAYER = 9  # the shipped steering vector's layer; the 8B-shaped model is steered there too
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def tokenizer_only(path=None):
    """The embedded model's tokenizer, from ``path`` (a folder with its tokenizer files) or the installed model."""
    import transformers

    if path is None:
        from cfgen.models import default_model_dir

        path = default_model_dir()
    return transformers.AutoTokenizer.from_pretrained(path)


def _setup(model_kind: str = "embedded", device: str = "cpu", tokenizer=None, layers=None):
    import cfgen

    if model_kind == "embedded":
        model, tok = cfgen.load_default_model()
        model = model.to(device)
        steer = cfgen.catalogue.load("steering_dark", model)
        vector = next(iter(steer.interventions.values())).source_representation
        return cfgen, model, tok, steer, vector
    import pyvene as pv
    import transformers

    tok = tokenizer_only(tokenizer)
    shapes = {**LLAMA3_8B, **({"num_hidden_layers": max(layers, LAYER + 1)} if layers else {})}
    cfg = transformers.LlamaConfig(**shapes, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    vector = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    steer = pv.IntervenableModel({"layer": LAYER, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=cfg.hidden_size, source_representation=vector)}, model)
    return cfgen, model, tok, steer, vector


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _hf_generate(model, tok, prompts, n, hook_vector=None, logits_processor=None, do_sample=True):
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    handle = None
    if hook_vector is not None:
        handle = model.model.layers[LAYER].register_forward_hook(
            lambda mod, args, out: (out[0] + hook_vector,) + tuple(out[1:]) if isinstance(out, tuple) else out + hook_vector)
    try:
        kw = dict(do_sample=True, temperature=1.0, top_k=0) if do_sample else dict(do_sample=False)
        return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id,
                              logits_processor=logits_processor, **kw)
    finally:
        if handle:
            handle.remove()


def measure(name: str, batch: int, tokens: int, strings: int, model_kind: str = "embedded",
            device: str = "cpu", tokenizer=None, layers=None) -> dict:
    cfgen, model, tok, steer, vector = _setup(model_kind, device, tokenizer, layers)
    if device == "cpu":
        torch.set_num_threads(1)
    prompts = (STORIES * 8)[:batch]
    # Warm-up outside the timing, of the measured side only (so its peak memory is its own): pages the
    # weights in and compiles cfgen's noise kernels.
    if name.startswith("cfgen"):
        cfgen.generate(steer, tok, prompts[:1], max_new_tokens=2, seed=0, eos_token_id=[])
        cfgen.counterfactual(steer, tok, prompts[:1], [[11, 12]], seed=0, eos_token_id=[])
    else:
        _hf_generate(model, tok, prompts[:1], 2)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if name == "cfgen_pair":
        cfgen.generate(steer, tok, prompts, max_new_tokens=tokens, seed=0, eos_token_id=[])
    elif name == "hf_two_calls":
        torch.manual_seed(0)
        _hf_generate(model, tok, prompts, tokens)
        _hf_generate(model, tok, prompts, tokens, hook_vector=vector)
    elif name == "hf_one_call":
        torch.manual_seed(0)
        _hf_generate(model, tok, prompts, tokens)
    elif name in ("cfgen_hindsight", "reference_hindsight"):
        observed = _observed(cfgen, model, tok, strings, tokens)
        t0 = time.perf_counter()
        if name == "cfgen_hindsight":
            cfgen.counterfactual(steer, tok, [p for p, _ in observed], [o for _, o in observed], seed=0,
                                 eos_token_id=[])
        else:
            for prompt, obs in observed:
                _reference_hindsight(cfgen, model, tok, prompt, obs, vector)
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the whole peak
    return {"name": name, "batch": batch, "seconds": seconds, "peak_mib": peak_mib}


def _observed(cfgen, model, tok, strings, tokens):
    """Observed continuations: plain samples of the base model (not timed)."""
    prompts = (STORIES * 8)[:strings]
    r = cfgen.generate((model, model), tok, prompts, max_new_tokens=tokens, seed=123, eos_token_id=[])
    return list(zip(prompts, r.factual_ids))


def _reference_hindsight(cfgen, model, tok, prompt, observed, vector):
    """Batch 1: teacher-forced logits, a per-step posterior loop, HF generate replaying that noise."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    full = torch.cat([ids, torch.tensor([observed])], 1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1:-1]
    gen = torch.Generator().manual_seed(0)
    noise = []
    for t, y in enumerate(observed):  # one step at a time, as the published method does
        p = torch.softmax(logits[t].double(), -1)
        g = -torch.log(-torch.log(torch.rand(p.shape, generator=gen, dtype=torch.float64)))
        m = torch.logsumexp(torch.log(p) + g, 0)  # the max, Gumbel with location 0
        gumbels = torch.log(p) + -torch.log(-torch.log(torch.rand(p.shape, generator=gen, dtype=torch.float64)))
        trunc = -torch.logaddexp(-gumbels, -m)
        u = trunc - torch.log(p)
        u[y] = m - torch.log(p[y])
        noise.append(u.float())
    hook = cfgen.SamplerHook(cfgen.Sampler(), noise=lambda step: noise[step][None] if step < len(noise) else
                             cfgen.gumbel_noise(0, step, logits.shape[-1]))
    return _hf_generate(model, tok, [prompt], len(observed), hook_vector=vector, logits_processor=[hook],
                        do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="16 new tokens and 8 hindsight strings")
    parser.add_argument("--only", choices=["pair", "hindsight"], help="run one half of the table")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model", default="embedded", choices=["embedded", "llama3-8b-shapes"],
                        help="the embedded model, or a random bf16 model with Llama-3-8B's shapes")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the pair table, e.g. 1,8,64")
    parser.add_argument("--tokenizer", help="with --model llama3-8b-shapes: a folder holding the embedded model's "
                        "tokenizer files (default: the installed embedded model's); lets a GPU machine without the "
                        "embedded model's weights run the 8B-shaped benchmark")
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)  # fewer 8B-shaped layers: a smoke run
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens, strings = (16, 8) if args.quick else (64, 32)
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch, tokens, strings, args.model, args.device, args.tokenizer,
                                 args.layers)))
        return

    def run(name, batch=1):
        cmd = [sys.executable, __file__, "--measure", name, "--batch", str(batch), "--device", args.device,
               "--model", args.model] + (["--quick"] if args.quick else []) + \
            (["--tokenizer", args.tokenizer] if args.tokenizer else []) + (["--layers", str(args.layers)] if args.layers else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def row(label, m, note=""):
        print(f"{label:46s} {m['seconds']:9.2f} {m['peak_mib']:9.0f}  {note}")

    what = "embedded SmolLM2-135M-Instruct" if args.model == "embedded" else \
        f"random bf16 Llama-3-8B shapes{f' ({max(args.layers, LAYER + 1)} layers)' if args.layers else ''}"
    threads = "1 thread, " if args.device == "cpu" else ""
    print(f"{what} on {args.device}, steering at layer 9, {tokens} new tokens, {threads}fresh process each")
    print(f"{'measurement':46s} {'seconds':>9s} {'peak MiB':>9s}  ratio")
    for batch in [int(b) for b in args.batches.split(",")] if args.only != "hindsight" else ():
        pair, two, one = run("cfgen_pair", batch), run("hf_two_calls", batch), run("hf_one_call", batch)
        row(f"B={batch} cfgen factual+counterfactual pair", pair,
            f"{pair['seconds'] / two['seconds']:.2f}x the time of two HF calls; "
            f"{pair['peak_mib'] / max(one['peak_mib'], 1):.2f}x the peak memory of one; "
            f"{2 * batch * tokens / pair['seconds']:.0f} tokens/s")
        row(f"B={batch} two HF generate calls", two)
        row(f"B={batch} one HF generate call", one)
    if args.only == "pair":
        return
    cf, ref = run("cfgen_hindsight"), run("reference_hindsight")
    row(f"hindsight, {strings} strings: cfgen.counterfactual", cf,
        f"{ref['seconds'] / cf['seconds']:.2f}x the reference's throughput")
    row(f"hindsight, {strings} strings: reference pipeline", ref)

if __name__ == "__main__":
    main()
