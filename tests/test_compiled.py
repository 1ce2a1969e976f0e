"""CFGEN_BACKEND=compiled: torch.compile kernels give the eager bits, and fall back to eager (one warning) otherwise.

Compiling takes tens of seconds on this CPU, so these tests are marked slow.
Where a GPU is present the same comparison runs there (the point of the
backend: Triton kernels with eager IEEE numerics).
"""

import pytest
import torch

import cfgen
from cfgen import _compiled

from .conftest import CharTokenizer, tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("CFGEN_BACKEND", "compiled")
    return monkeypatch


def _calls(device):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(37, 3001, generator=g) * 6
    z[3, ::7] = float("-inf")
    y = z.argmax(-1)
    wide = torch.randn(20, 40000, generator=g)
    seeds, steps = torch.arange(37) * 11 + 2**33, torch.arange(37) % 5
    sampler = cfgen.Sampler(temperature=0.8, top_k=200)
    on = lambda t: t.to(device)  # noqa: E731
    return [
        lambda: cfgen.gumbel_noise(on(seeds), on(steps), 3001, stream=2, device=device),
        lambda: sampler.log_probs(on(z)),
        lambda: cfgen.Sampler().log_probs(on(z[:5]).reshape(5, 1, 3001)),
        lambda: cfgen.posterior_noise(on(z), on(y), sampler=sampler, seed=on(seeds), step=on(steps)),
        lambda: cfgen.posterior_noise(on(z[:4, None]), on(y[:4, None]), seed=3),  # int seed, [B, 1, V]
        # more rows than one block holds on the CPU (2**18 elements): the block loop
        lambda: cfgen.posterior_noise(on(wide), on(wide.argmax(-1)), seed=on(torch.arange(20))),
        lambda: cfgen.gumbel_noise(on(torch.arange(20)), 0, 40000, device=device),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_compiled_kernels_give_the_eager_bits(compiled, device):
    got = [fn().cpu() for fn in _calls(device)]
    assert _compiled.kernels(device) is not None, "the compiled kernels did not build or failed their self-check"
    compiled.setenv("CFGEN_BACKEND", "eager")
    want = [fn().cpu() for fn in _calls("cpu")]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_generation_is_unchanged_under_the_compiled_backend(compiled):
    model, tok = (tiny_llama(vocab_size=40, init=0.4), tiny_llama(vocab_size=40, init=0.4, seed=1)), CharTokenizer()
    kw = dict(max_new_tokens=6, seed=2, temperature=0.9)
    got = cfgen.counterfactual(model, tok, ["abc", "de"], [[5, 6, 7], [8, 9]], num_samples=3, **kw)
    assert _compiled.kernels("cpu") is not None
    compiled.setenv("CFGEN_BACKEND", "auto")
    want = cfgen.counterfactual(model, tok, ["abc", "de"], [[5, 6, 7], [8, 9]], num_samples=3, **kw)
    assert got.factual_ids == want.factual_ids and got.counterfactual_ids == want.counterfactual_ids
    assert got.factual_ids != got.counterfactual_ids


def test_a_failed_self_check_falls_back_to_eager_with_one_warning(compiled):
    real = _compiled.Kernels

    def wrong_build():  # kernels that are off by one ulp in the posterior
        bad = real()
        right = bad.posterior
        bad.posterior = lambda *a: (torch.nextafter(right(*a)[0], torch.tensor(1e9)), right(*a)[1])
        return bad

    compiled.setattr(_compiled, "Kernels", wrong_build)
    compiled.setattr(_compiled, "_checked", {})
    with pytest.warns(RuntimeWarning, match="compiled kernels are unavailable on cpu.*bit for bit"):
        u = cfgen.gumbel_noise(torch.tensor([1]), 0, 50)
    assert _compiled.kernels("cpu") is None  # decided once; no second warning, the eager kernels run
    compiled.setenv("CFGEN_BACKEND", "eager")
    assert torch.equal(u, cfgen.gumbel_noise(torch.tensor([1]), 0, 50))

