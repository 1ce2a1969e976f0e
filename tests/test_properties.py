"""Hypothesis property tests of the core over shapes, dtypes and sampler settings."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cfgen

samplers = st.builds(
    cfgen.Sampler,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.0]),
    top_k=st.one_of(st.none(), st.integers(1, 60)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@settings(max_examples=60, deadline=None)
@given(
    sampler=samplers,
    dtype=dtypes,
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 50)),
    scale=st.sampled_from([0.1, 3.0, 100.0, 1e4]),
    seed=st.integers(0, 2**31),
)
def test_posterior_reproduces_and_is_finite(sampler, dtype, shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).round().to(dtype)  # rounding forces ties
    lp = sampler.log_probs(logits)
    assert lp.dtype == torch.float32
    support = torch.isfinite(lp)
    assert support.any(-1).all()
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(shape[:-1]), atol=1e-4)
    tokens = (torch.rand(lp.shape, generator=g).log() - torch.where(support, 0.0, 1e9)).argmax(-1)
    noise = cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seed)
    assert noise.shape == logits.shape and noise.dtype == torch.float32
    assert torch.equal(sampler.sample(logits, noise), tokens)
    assert torch.isfinite(noise[support]).all()


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=6),
    step=st.integers(0, 10_000),
    vocab=st.integers(1, 300),
)
def test_noise_rows_are_pure(seeds, step, vocab):
    batch = cfgen.gumbel_noise(torch.tensor(seeds), step, vocab)
    assert batch.shape == (len(seeds), vocab) and torch.isfinite(batch).all()
    for b, s in enumerate(seeds):
        assert torch.equal(batch[b], cfgen.gumbel_noise(s, step, vocab)[0])
