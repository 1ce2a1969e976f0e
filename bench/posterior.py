"""Benchmark: hindsight posterior noise versus the model's forward pass and a reference loop.

On the embedded model (SmolLM2-135M-Instruct), for B sequences of T sampled
tokens after a short prompt, times

1. the teacher-forced forward pass that produces the logits the posterior needs;
2. ``cfgen.posterior_noise`` on the T continuation positions (one seed per row),
   with the fused C kernel (``CFGEN_BACKEND=native``, the CPU default; the
   first call in the process, which loads or builds the kernel, is reported
   separately), with the eager torch kernels (``CFGEN_BACKEND=eager``, the
   fallback, also what runs on GPU by default) and with the ``torch.compile``
   kernels (``CFGEN_BACKEND=compiled``, any device; ``--no-compiled`` skips them);
3. the reference: the published method (Ravfogel et al., "Gumbel Counterfactual
   Generation From Language Models", arXiv 2411.07180) as its authors' code
   runs it: a Python loop over rows and steps, in numpy float64, that
   exponentiates the logits, draws V Gumbels per step from numpy's generator
   and truncates them below the top Gumbel as ``-log(exp(-g) + exp(-top))``;
4. the same loop ported to torch float32 with a ``torch.Generator`` (each step
   one vectorised pass per operation): a faster baseline than the published
   code, shown so the ratio against the reference is not read as the whole story.

Every posterior is checked to reproduce the sampled tokens, and the native and
eager noise to be bit-identical. ``--device cuda`` runs the model and cfgen on
a GPU (the eager kernels; the C kernel is CPU-only), checks the GPU noise
against the CPU's bit for bit, and times the reference loops on the CPU.
``--model llama3-8b-shapes`` replaces the embedded model by a randomly
initialised bf16 model with Llama-3-8B's shapes (V = 128256; only the
embedded tokenizer's files are needed, ``--tokenizer DIR``). One
table gives every row's ratio to the forward pass, to the native kernel and to
the reference loops. Uses only cfgen's public API, numpy, torch and
transformers. Run ``python bench/posterior.py --help``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch

import cfgen

PROMPT = "Once upon a time, in a small village,"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device = torch.device("cpu")) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (device work included), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def with_backend(name: str, fn):
    """Call ``fn`` with ``CFGEN_BACKEND=name`` (cfgen reads it at call time)."""

    def call():
        old = os.environ.get("CFGEN_BACKEND")
        os.environ["CFGEN_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["CFGEN_BACKEND"]
            else:
                os.environ["CFGEN_BACKEND"] = old

    return call


def sample_continuations(model, tok, batch: int, new_tokens: int, seeds: torch.Tensor, sampler: cfgen.Sampler):
    """B sampled continuations of exactly T tokens (EOS suppressed), with cfgen's explicit noise."""
    enc = tok([PROMPT] * batch, return_tensors="pt").to(model.device)
    hook = cfgen.SamplerHook(sampler, seeds=seeds.to(model.device))
    with torch.no_grad():
        out = model.generate(
            enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            logits_processor=[hook],
            pad_token_id=tok.pad_token_id,
        )
    return out, enc["input_ids"].shape[1]


def reference_posterior(logits: torch.Tensor, tokens: torch.Tensor, seeds: torch.Tensor) -> np.ndarray:
    """The published method's hindsight Gumbels, per row and step, in numpy float64.

    For each step: ``alphas = exp(logits)``; a top Gumbel with location
    ``log(sum(alphas))``; Gumbels with locations ``log(alphas)`` truncated below
    it as ``-log(exp(-g) + exp(-top))``; the observed token gets the top Gumbel;
    the noise is the result minus ``log(alphas)``.
    """
    batch, steps, vocab = logits.shape
    all_logits = logits.double().numpy()
    noise = np.empty((batch, steps, vocab))
    for b in range(batch):
        rng = np.random.default_rng(int(seeds[b]))
        for t in range(steps):
            log_alphas = all_logits[b, t]
            alphas = np.exp(log_alphas)
            top = rng.gumbel() + np.log(np.sum(alphas))
            g = rng.gumbel(size=vocab) + log_alphas
            truncated = -np.log(np.exp(-g) + np.exp(-top))
            truncated[int(tokens[b, t])] = top
            noise[b, t] = truncated - log_alphas
    return noise


def reference_posterior_torch(logits: torch.Tensor, tokens: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The same per-step loop in torch float32 (softmax first, so nothing overflows)."""
    batch, steps, vocab = logits.shape
    noise = torch.empty(batch, steps, vocab, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for b in range(batch):
        gen = torch.Generator().manual_seed(int(seeds[b]))
        for t in range(steps):
            alphas = torch.softmax(logits[b, t].float(), dim=-1)
            log_alphas = torch.log(alphas)
            u_top = torch.rand(1, generator=gen).clamp_(min=tiny)
            top = -torch.log(-torch.log(u_top)) + torch.log(alphas.sum())
            u = torch.rand(vocab, generator=gen).clamp_(min=tiny)
            g = -torch.log(-torch.log(u)) + log_alphas
            truncated = -torch.log(torch.exp(-g) + torch.exp(-top))
            truncated[tokens[b, t]] = top
            noise[b, t] = truncated - log_alphas
    return noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences B (default 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="sampled tokens T per sequence (default 64)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per row, median reported (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--device", default="cpu",
        help="where the model and cfgen run, e.g. cpu or cuda (default cpu); off the CPU the native row is "
        "left out (the C kernel is CPU-only) and the reference loops run on a CPU copy of the logits",
    )  # fmt: skip
    parser.add_argument("--model", default="embedded", choices=["embedded", "embedded-shapes", "llama3-8b-shapes"],
                        help="the embedded model (float32, V=49152), a randomly initialised float32 model with its "
                        "shapes (from the config beside --tokenizer's files), or a randomly initialised bf16 model "
                        "with Llama-3-8B's shapes (V=128256); speed needs no trained weights")
    parser.add_argument("--tokenizer", help="with --model llama3-8b-shapes: a folder holding the embedded model's "
                        "tokenizer files (default: the installed embedded model's)")
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # fewer layers: a smoke run
    parser.add_argument("--no-compiled", action="store_true",
                        help="leave out the CFGEN_BACKEND=compiled row (torch.compile: tens of seconds to build)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, R = args.batch, args.new_tokens, args.repeats

    name = "embedded SmolLM2-135M-Instruct (float32"
    if args.model == "embedded":
        model, tok = cfgen.load_default_model()
        model = model.to(device)
    elif args.model == "embedded-shapes":
        import transformers
        from generate import tokenizer_only  # bench/ is on sys.path when this script runs

        tok = tokenizer_only(args.tokenizer)
        cfg = transformers.AutoConfig.from_pretrained(tok.name_or_path)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        name = "random weights, SmolLM2-135M-Instruct shapes (float32"
    else:
        import transformers
        from generate import LLAMA3_8B, tokenizer_only  # bench/ is on sys.path when this script runs

        tok = tokenizer_only(args.tokenizer)
        shapes = {**LLAMA3_8B, **({"num_hidden_layers": args.layers} if args.layers else {})}
        cfg = transformers.LlamaConfig(**shapes, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        name = f"random Llama-3-8B shapes, {cfg.num_hidden_layers} layers (bfloat16"
    V = model.config.vocab_size
    sampler = cfgen.Sampler()  # temperature 1, full vocabulary: the published method's setting
    seeds = torch.arange(B, dtype=torch.int64) + 1000

    # The data: B sampled continuations (eager kernels, so the native kernel is first loaded in the cold timing).
    t0 = time.perf_counter()
    ids, P = with_backend("eager", lambda: sample_continuations(model, tok, B, T, seeds, sampler))()
    t_sample = time.perf_counter() - t0
    tokens = ids[:, P:]
    assert tokens.shape == (B, T), tokens.shape

    # 1. Teacher-forced forward pass over prompt + continuation.
    def forward():
        with torch.no_grad():
            return model(ids, attention_mask=torch.ones_like(ids)).logits

    t_forward, full = timed(forward, R, device)
    logits = full[:, P - 1 : -1].contiguous()  # [B, T, V]: logits[:, t] predicted tokens[:, t]
    del full

    # 2. cfgen's posterior, one seed per row (seed [B, 1] broadcasts over the T steps).
    def posterior():
        return cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds[:, None])

    on_cpu = device.type == "cpu"
    if on_cpu:
        t0 = time.perf_counter()
        u_cold = with_backend("native", posterior)()
        t_cold = time.perf_counter() - t0
        t_native, u_native = timed(with_backend("native", posterior), R)
        assert torch.equal(sampler.sample(logits, u_native), tokens), "cfgen posterior (native) does not reproduce the tokens"
    t_eager, u_eager = timed(with_backend("eager", posterior), R, device)
    assert torch.equal(sampler.sample(logits, u_eager), tokens), "cfgen posterior (eager) does not reproduce the tokens"
    compiled_rows, compiled_bits = [], ""
    if not args.no_compiled:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # the kernels build and self-check, or warn
            warnings.simplefilter("always")
            with_backend("compiled", posterior)()
        t_build = time.perf_counter() - t0
        failed = [str(w.message) for w in caught if "compiled kernels are unavailable" in str(w.message)]
        if failed:
            print(failed[0])
            compiled_bits = "; compiled: unavailable here, row left out"
        else:
            t_compiled, u_compiled = timed(with_backend("compiled", posterior), R, device)
            assert torch.equal(sampler.sample(logits, u_compiled), tokens), "compiled posterior misses the tokens"
            compiled_bits = f"; compiled == eager bits: {torch.equal(u_compiled, u_eager)}"
            compiled_rows = [(f"cfgen posterior_noise, compiled ({device.type})", t_compiled, True),
                             ("cfgen posterior_noise, compiled (1st call)", t_build, False)]
            del u_compiled
    if on_cpu:
        same_bits = str(torch.equal(u_eager, u_native) and torch.equal(u_cold, u_native))
        del u_cold, u_native
    else:
        # the C kernel cannot run here: compare with the CPU (native where it builds, else eager)
        u_cpu = with_backend("auto", lambda: cfgen.posterior_noise(logits.cpu(), tokens.cpu(), sampler=sampler,
                                                                    seed=seeds[:, None]))()
        same_bits = f"n/a on {device.type}; {device.type} eager == CPU bits: {torch.equal(u_eager.cpu(), u_cpu)}"
        del u_cpu
    del u_eager
    logits, tokens = logits.cpu(), tokens.cpu()

    # 3. The reference loop (numpy float64, as published) and 4. its torch float32 port.
    t_ref, u_ref = timed(lambda: reference_posterior(logits, tokens, seeds), R)
    ref_tokens = (torch.log_softmax(logits.double(), dim=-1) + torch.from_numpy(u_ref)).argmax(-1)
    assert torch.equal(ref_tokens, tokens), "reference posterior does not reproduce the tokens"
    del u_ref
    t_port, u_port = timed(lambda: reference_posterior_torch(logits, tokens, seeds), R)
    port_tokens = (torch.log_softmax(logits.float(), dim=-1) + u_port).argmax(-1)
    assert torch.equal(port_tokens, tokens), "torch port of the reference does not reproduce the tokens"
    del u_port

    # The table.
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    where = "CPU" if on_cpu else f"{device}: {torch.cuda.get_device_name(device)}"
    print(f"cfgen {cfgen.__version__} bench/posterior.py: {name}, {where})")
    print(
        f"B={B} sequences x T={T} sampled tokens after a {P}-token prompt ({P + T} positions), V={V}; "
        f"sampler: {sampler.describe()}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {load[0]:.1f}; median of {R} runs; sampling the data took {t_sample:.1f} s (not timed below)"
    )
    rows = [("teacher-forced forward (logits)", t_forward, False)]
    if on_cpu:
        rows += [("cfgen posterior_noise, native", t_native, True),
                 ("cfgen posterior_noise, native (1st call)", t_cold, False)]  # fmt: skip
    rows += [
        (f"cfgen posterior_noise, eager torch ({device.type})", t_eager, True),
        *compiled_rows,
        ("reference loop, numpy float64 (published)", t_ref, True),
        ("reference loop, torch float32 port (CPU)", t_port, True),
    ]
    print()
    native_col = "/ native" if on_cpu else ""
    print(f"{'':46s}{'seconds':>9s}{'/ forward':>11s}{native_col:>10s}{'reference / row':>17s}{'port / row':>12s}")
    for name, t, vs_ref in rows:
        vs_native = f"{t / t_native:9.2f}x" if on_cpu and name.startswith("cfgen") else " " * 10
        ratios = f"{vs_native}{t_ref / t:16.2f}x{t_port / t:11.2f}x" if vs_ref else ""
        print(f"{name:46s}{t:9.3f}{t / t_forward:11.3f}{ratios}")
    print("(1st call: the first call in this process: loading, or on a fresh machine compiling, the kernels,")
    print(" and their bit-for-bit self-check against the eager code)")
    print()
    print(f"tokens reproduced: cfgen (every backend run) yes, reference yes, port yes; native == eager bits: {same_bits}{compiled_bits}")


if __name__ == "__main__":
    main()
