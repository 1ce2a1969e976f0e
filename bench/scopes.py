"""Benchmark: cost of each Jacobian scope per prediction, relative to one forward pass.

Runs on the embedded model (SmolLM2-135M-Instruct, d = 576, V = 49152) with a
64-token input, through the public API of ``cfgen.scopes`` only. Times are the
median of ``--repeats`` runs (wall clock, CPU unless a GPU is visible).
Exact Fisher needs d = 576 backward passes; unless ``--exact`` is given its time
is projected linearly from the rank-8 and rank-32 timings.

    python bench/scopes.py [--tokens 64] [--repeats 3] [--threads 1] [--exact]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cfgen
from cfgen.scopes import fisher_scope, semantic_scope, temperature_scope

TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion about "
    "the costs of books, staff and heating, the members agreed to postpone the decision until the mayor "
    "had spoken with the architects, who promised a cheaper design by the end of the month."
)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact", action="store_true", help="also run the exact Fisher scope (d backward passes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = cfgen.load_default_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    ids = tokenizer(TEXT * 4)["input_ids"][: args.tokens]
    d = model.config.hidden_size
    batch = torch.tensor([ids], device=device)

    def forward():
        with torch.no_grad():
            model(batch)
        if device == "cuda":
            torch.cuda.synchronize()

    forward()  # warm-up
    semantic_scope(model, ids)
    t_fwd, _ = timed(forward, args.repeats)
    rows = []
    t, r = timed(lambda: semantic_scope(model, ids), args.repeats)
    rows.append(("Semantic ||J^T w_y||", "1", t))
    t, _ = timed(lambda: temperature_scope(model, ids), args.repeats)
    rows.append(("Temperature ||J^T h/|h|||", "1", t))
    t8, r8 = timed(lambda: fisher_scope(model, ids, rank=8), args.repeats)
    rows.append(("Fisher, rank 8", "8", t8))
    t32, r32 = timed(lambda: fisher_scope(model, ids, rank=32), 1)
    rows.append(("Fisher, rank 32", "32", t32))
    if args.exact:
        t_exact, r_exact = timed(lambda: fisher_scope(model, ids), 1)
        rows.append((f"Fisher, exact (rank {d})", str(d), t_exact))
    else:
        per_direction = (t32 - t8) / 24
        rows.append((f"Fisher, exact (rank {d}) PROJECTED", str(d), t8 + (d - 8) * per_direction))

    print(f"cfgen.scopes benchmark: SmolLM2-135M-Instruct (d={d}, V={model.config.vocab_size}), "
          f"{len(ids)} input tokens, {device}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"top prediction {tokenizer.decode([r.target])!r}; Fisher top-8 / top-32 eigen-directions carry "
          f"{r8.info['fisher_captured']:.1%} / {r32.info['fisher_captured']:.1%} of tr F")
    print()
    print(f"{'scope':<36}{'backward passes':>16}{'seconds':>10}{'x forward':>11}")
    print(f"{'forward pass (no grad)':<36}{'-':>16}{t_fwd:>10.3f}{1.0:>11.1f}")
    for name, passes, seconds in rows:
        print(f"{name:<36}{passes:>16}{seconds:>10.3f}{seconds / t_fwd:>11.1f}")


if __name__ == "__main__":
    main()
