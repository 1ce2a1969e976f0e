import numpy as np
import pytest
import torch
from scipy import stats

import cfgen
from cfgen import noise as N


def test_gumbel_marginal_ks():
    # 16 rows x 4096 ids = 65,536 draws; a correct hash passes KS at p > 1e-3.
    u = cfgen.gumbel_noise(torch.arange(16), 3, 4096).flatten().double().numpy()
    assert stats.kstest(u, stats.gumbel_r.cdf).pvalue > 1e-3
    assert np.isfinite(u).all()


def test_no_correlation_across_ids_steps_and_seeds():
    n = 20000  # |r| of independent draws stays below 4/sqrt(n) ~ 0.028 with overwhelming probability
    seeds = torch.arange(n)
    a = cfgen.gumbel_noise(seeds, 0, 8)
    b = cfgen.gumbel_noise(seeds, 1, 8)
    c = cfgen.gumbel_noise(seeds + 1, 0, 8)
    bound = 4 / np.sqrt(n)
    for v in range(7):
        assert abs(np.corrcoef(a[:, v], a[:, v + 1])[0, 1]) < bound
    for v in range(8):
        assert abs(np.corrcoef(a[:, v], b[:, v])[0, 1]) < bound
    # neighbouring seeds are unrelated
    for v in range(8):
        assert abs(np.corrcoef(a[:, v], c[:, v])[0, 1]) < bound
    assert torch.equal(a[1:], c[:-1])  # seed s+1 is the same row wherever it appears


def test_low_bits_of_keys_do_not_alias_rows():
    # Rows whose keys differ in low bits must not share a permuted noise vector.
    u = N.uniform_bits(torch.zeros(512, dtype=torch.long), torch.arange(512), 4096)
    flat = u.flatten()
    assert torch.unique(flat).numel() > 0.999 * flat.numel()


def test_batch_invariance_and_purity():
    seeds = torch.tensor([5, 9, 5, -3, 2**40 + 7])
    steps = torch.tensor([0, 4, 0, 2, 1])
    batch = cfgen.gumbel_noise(seeds, steps, 100)
    for b in range(len(seeds)):
        assert torch.equal(batch[b], cfgen.gumbel_noise(int(seeds[b]), int(steps[b]), 100)[0])
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.equal(cfgen.gumbel_noise(seeds[perm], steps[perm], 100), batch[perm])
    assert torch.equal(batch[0], batch[2])
    # a prefix of the vocabulary is the same noise (models with padded vocabularies)
    assert torch.equal(cfgen.gumbel_noise(seeds, steps, 37), batch[:, :37])


def test_streams_and_seeds_differ():
    a = cfgen.gumbel_noise(1, 0, 64)
    assert not torch.equal(a, cfgen.gumbel_noise(1, 0, 64, stream=N.POSTERIOR_TRUNCATED))
    assert not torch.equal(a, cfgen.gumbel_noise(2, 0, 64))
    assert not torch.equal(a, cfgen.gumbel_noise(1, 1, 64))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    cfgen.gumbel_noise(torch.arange(4), 0, 1000)
    assert torch.equal(state, torch.get_rng_state())


def test_hash_is_stable_across_releases():
    # Regression pin: changing the hash silently changes every user's texts.
    assert N.uniform_bits(0, 0, 4).tolist() == [[3259782435, 4065178975, 2942958896, 1806742334]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_bit_identical():
    seeds, steps = torch.arange(6) * 977, torch.arange(6)
    assert torch.equal(cfgen.gumbel_noise(seeds, steps, 5000), cfgen.gumbel_noise(seeds, steps, 5000, device="cuda").cpu())


@pytest.mark.parametrize(
    "args, match",
    [
        ((1.5, 0, 4), "int64"),
        ((torch.tensor([1.0]), 0, 4), "integers"),
        ((torch.zeros(2, 2, dtype=torch.long), 0, 4), "1-D"),
        ((torch.arange(3), torch.arange(2), 4), "rows"),
        ((0, 0, 0), "vocab_size"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        cfgen.gumbel_noise(*args)


def _cfgen_imports(path) -> set:
    """The cfgen modules a source file imports, at top level or inside functions (lazy imports count)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "cfgen":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "cfgen" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_pure_modules_have_no_import_circle():
    # noise -> sampler -> posterior are pure tensor code with no import circle (DESIGN §2), lazy imports included
    from pathlib import Path

    root = Path(cfgen.__file__).parent
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {m: _cfgen_imports(root / f"{m}.py") & modules for m in modules}
    pure = ["noise", "sampler", "posterior", "_eager", "_ieee", "_native"]
    assert set(pure) <= modules
    reach, todo = set(), list(pure)
    while todo:
        m = todo.pop()
        if m not in reach:
            reach.add(m)
            todo.extend(graph[m])
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m] & reach):
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(reach):
        if m not in state:
            visit(m, [m])
    # nothing pure imports model or tokenizer glue
    assert not reach & {"api", "decode", "hook", "tokens", "structured"}, reach
    assert "_eager" in graph["_native"] and "_native" not in graph["_eager"] and graph["_eager"] <= {"_ieee"}


def test_import_graph_parser_sees_a_circle(tmp_path):
    # the parser behind the test above: lazy, relative and absolute forms all count
    src = tmp_path / "m.py"
    src.write_text("from . import a, b\nfrom .c import x\nimport cfgen.d\nfrom cfgen import e\ndef f():\n    from .g import h\n")
    assert _cfgen_imports(src) == {"a", "b", "c", "d", "e", "g"}


def test_streams_do_not_alias_neighbouring_seeds():
    """Stream k of seed s shares no noise with stream 0 (or another stream) of seed s + j.

    Before the stream was absorbed on its own, (s, stream k) hashed exactly like (s + k, stream 0): the
    interventional baseline of seed 0 replayed the prior noise of seed 4, and posterior draw j shared its
    auxiliary Gumbels with draw j + 1.
    """
    from cfgen.noise import ALTERNATIVE, POSTERIOR_MAX, POSTERIOR_TRUNCATED, PRIOR

    streams = (PRIOR, POSTERIOR_MAX, POSTERIOR_TRUNCATED, ALTERNATIVE, 4)
    table = {(k, s): cfgen.gumbel_noise(s, 5, 64, stream=k)[0] for k in streams for s in range(12)}
    items = list(table.items())
    for i, (a, x) in enumerate(items):
        for b, y in items[i + 1:]:
            assert not torch.equal(x, y), (a, b)
    assert torch.equal(cfgen.gumbel_noise(3, 5, 64)[0], table[(PRIOR, 3)])  # stream 0 is what it always was
