import pytest
import torch

import cfgen
from cfgen.noise import POSTERIOR_TRUNCATED

SAMPLERS = [
    cfgen.Sampler(),
    cfgen.Sampler(temperature=0.7),
    cfgen.Sampler(top_k=3),
    cfgen.Sampler(top_p=0.8),
    cfgen.Sampler(temperature=0.6, top_k=50, top_p=0.95),
    cfgen.Sampler(temperature=0),
]


def observed_tokens(sampler, logits, seed):
    # a draw from the sampler itself, so every token is inside the support
    steps = torch.arange(logits.shape[-2]).expand(logits.shape[:-1]).reshape(-1)
    seeds = torch.full_like(steps, seed) + torch.arange(steps.numel()) // logits.shape[-2]
    u = cfgen.gumbel_noise(seeds, steps, logits.shape[-1]).reshape(logits.shape)
    return sampler.sample(logits, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_posterior_reproduces_tokens_at_scale(sampler, dtype):
    # B=2, T=64, V=49152, logits spanning +-1e4
    g = torch.Generator().manual_seed(0)
    logits = ((torch.rand(2, 64, 49152, generator=g) * 2 - 1) * 1e4).to(dtype)
    logits[0, :8] = torch.randn(8, 49152, generator=g).to(dtype)  # ordinary logits too
    tokens = observed_tokens(sampler, logits, seed=3)
    noise = cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=torch.tensor([[11], [12]]))
    assert noise.dtype == torch.float32 and noise.shape == logits.shape
    assert torch.equal(sampler.sample(logits, noise), tokens)
    assert torch.isfinite(noise).all()


def test_off_support_noise_is_the_prior_stream():
    sampler = cfgen.Sampler(top_k=2)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    noise = cfgen.posterior_noise(logits, torch.tensor([1]), sampler=sampler, seed=torch.tensor([4]))
    prior = cfgen.gumbel_noise(4, 0, 4, stream=POSTERIOR_TRUNCATED)[0]
    assert torch.equal(noise[0, 2:], prior[2:])


def test_posterior_is_deterministic_and_batch_invariant():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 40, generator=g)
    tokens = observed_tokens(cfgen.Sampler(), logits, 0)
    seeds = torch.tensor([[7], [8], [9]])
    full = cfgen.posterior_noise(logits, tokens, seed=seeds)
    assert torch.equal(full, cfgen.posterior_noise(logits, tokens, seed=seeds))
    assert torch.equal(full[1:2], cfgen.posterior_noise(logits[1:2], tokens[1:2], seed=seeds[1:2]))
    # an int seed still gives each row its own draw
    shared = cfgen.posterior_noise(logits[[0, 0]], tokens[[0, 0]], seed=5)
    assert not torch.equal(shared[0], shared[1])


@pytest.mark.parametrize(
    "sampler",
    [cfgen.Sampler(), cfgen.Sampler(temperature=0.7), cfgen.Sampler(top_k=3), cfgen.Sampler(top_p=0.8)],
    ids=lambda s: s.describe(),
)
def test_hindsight_law_equals_joint_law(sampler):
    """P(y' | y) from (prior noise -> both) equals (y -> posterior noise -> y').

    Joint: 400,000 prior draws. Hindsight: 100,000 posterior draws per observed y.
    Tolerance: total variation < 0.02 for every y with at least 20,000 joint
    samples (sampling error of each estimate is about 0.005 TV).
    """
    fact = torch.tensor([1.2, 0.4, 0.0, -0.5, 0.9, -1.5])
    cf = torch.tensor([0.1, 1.0, 0.3, -0.2, -0.4, 0.8])
    V, n = 6, 400_000
    u = cfgen.gumbel_noise(torch.arange(n), 0, V)
    y = sampler.sample(fact.expand(n, V), u)
    y_cf = sampler.sample(cf.expand(n, V), u)
    joint = torch.zeros(V, V)
    joint.index_put_((y, y_cf), torch.ones(n), accumulate=True)
    m = 100_000
    checked = 0
    for obs in range(V):
        if joint[obs].sum() < 20_000:
            continue
        tokens = torch.full((m,), obs)
        post = cfgen.posterior_noise(fact.expand(m, V), tokens, sampler=sampler, seed=torch.arange(m) + 10**6)
        assert torch.equal(sampler.sample(fact.expand(m, V), post), tokens)
        hind = torch.bincount(sampler.sample(cf.expand(m, V), post), minlength=V).float() / m
        tv = 0.5 * (hind - joint[obs] / joint[obs].sum()).abs().sum()
        assert tv < 0.02, (obs, tv)
        checked += 1
    assert checked >= 2


def test_impossible_observation_names_position_token_and_sampler():
    logits = torch.zeros(2, 3, 10)
    logits[..., 0] = 5.0
    tokens = torch.zeros(2, 3, dtype=torch.long)
    tokens[1, 2] = 7
    sampler = cfgen.Sampler(top_k=1)
    with pytest.raises(cfgen.ImpossibleObservation, match=r"token 7 at step 2 of batch row 1.*top_k=1") as err:
        cfgen.posterior_noise(logits, tokens, sampler=sampler)
    assert isinstance(err.value, ValueError)
    assert err.value.index == (1, 2) and err.value.token == 7 and err.value.sampler == sampler


def test_bad_inputs():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="vocabulary axis"):
        cfgen.posterior_noise(logits, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cfgen.posterior_noise(logits, torch.tensor([0, 10, 1]))
    with pytest.raises(TypeError, match="integer"):
        cfgen.posterior_noise(logits, torch.zeros(3))
    bad = logits.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cfgen.posterior_noise(bad, torch.zeros(3, dtype=torch.long))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    cfgen.posterior_noise(torch.randn(2, 4, 30, generator=torch.Generator()), torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(state, torch.get_rng_state())


def test_scalar_observation():
    logits = torch.tensor([2.0, 1.0, 0.0])
    noise = cfgen.posterior_noise(logits, torch.tensor(1), seed=3)
    assert noise.shape == (3,) and int(cfgen.Sampler().sample(logits, noise)) == 1
    with pytest.raises(cfgen.ImpossibleObservation, match="single observed position"):
        cfgen.posterior_noise(logits, torch.tensor(2), sampler=cfgen.Sampler(top_k=1))


def _with_backend(monkeypatch, backend, fn):
    monkeypatch.setenv("CFGEN_BACKEND", backend)
    try:
        return fn()
    finally:
        monkeypatch.delenv("CFGEN_BACKEND")


@pytest.mark.parametrize("backend", ["native", "eager"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_per_step_calls_stack_to_the_all_at_once_noise(monkeypatch, backend, sampler):
    # streaming hindsight: one [R, V] call per decode step gives the [R, T, V] call's bits
    from cfgen import _native

    if backend == "native" and _native.library() is None:
        pytest.skip("native kernels unavailable (no C compiler)")
    g = torch.Generator().manual_seed(21)
    R, T, V = 3, 7, 301
    logits = torch.randn(R, T, V, generator=g) * 4
    tokens = observed_tokens(sampler, logits, seed=2)
    seeds = torch.tensor([9, 2**40 + 1, -4])

    def run():
        full = cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds[:, None])
        per = torch.stack(
            [cfgen.posterior_noise(logits[:, t], tokens[:, t], sampler=sampler, seed=seeds, step=t) for t in range(T)],
            dim=1,
        )
        # rows at different steps (e.g. resumed decoding): step as an int64 tensor [R]
        offset = torch.tensor([0, 5, 11])
        full_off = cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds[:, None],
                                         step=offset[:, None] + torch.arange(T))
        per_off = torch.stack(
            [cfgen.posterior_noise(logits[:, t], tokens[:, t], sampler=sampler, seed=seeds, step=offset + t)
             for t in range(T)],
            dim=1,
        )
        return full, per, full_off, per_off

    full, per, full_off, per_off = _with_backend(monkeypatch, backend, run)
    assert torch.equal(per, full)
    assert torch.equal(per_off, full_off)
    assert torch.equal(full_off[0], full[0]) and not torch.equal(full_off[1], full[1])
    assert torch.equal(sampler.sample(logits, per), tokens)


def test_per_step_with_an_int_seed_is_refused_not_silently_correlated():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(22))
    tokens = logits.argmax(-1)
    with pytest.raises(ValueError, match="one seed per row"):
        cfgen.posterior_noise(logits, tokens, seed=4, step=2)
    # a single sequence with explicit distinct steps is fine, and equals the default numbering shifted
    one = cfgen.posterior_noise(logits, tokens, seed=4, step=torch.arange(3) + 10)
    assert torch.equal(one[1:], cfgen.posterior_noise(logits[1:], tokens[1:], seed=4, step=torch.arange(2) + 11))


@pytest.mark.parametrize(
    "step, err, match",
    [(1.5, TypeError, "step must be an int"), (True, TypeError, "step must be an int"),
     (torch.tensor([0.0, 1.0]), TypeError, "integers"), (torch.arange(3), ValueError, "broadcast")],
)
def test_bad_step(step, err, match):
    logits = torch.zeros(2, 5)
    with pytest.raises(err, match=match):
        cfgen.posterior_noise(logits, torch.zeros(2, dtype=torch.long), seed=torch.tensor([1, 2]), step=step)


def test_impossible_observation_in_a_per_step_call_names_the_given_step_and_row():
    logits = torch.zeros(3, 10)
    logits[:, 0] = 5.0
    tokens = torch.tensor([0, 0, 7])
    with pytest.raises(cfgen.ImpossibleObservation, match=r"token 7 at step 12 \(index \(2,\) of tokens\)") as err:
        cfgen.posterior_noise(logits, tokens, sampler=cfgen.Sampler(top_k=1), seed=torch.arange(3), step=12)
    assert err.value.index == (2,) and err.value.token == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("sampler", SAMPLERS[:3], ids=lambda s: s.describe())
def test_cpu_and_cuda_posterior_bit_identical(sampler):
    # the eager kernels on the GPU give the CPU's bits (native or eager), at the benchmark's vocabulary
    # (not top-p: its support follows HF's per-device cumulative sum, by design)
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(2, 6, 49152, generator=g) * 4
    tokens = observed_tokens(sampler, logits, seed=1)
    seeds = torch.tensor([[3], [4]])
    cpu = cfgen.posterior_noise(logits, tokens, sampler=sampler, seed=seeds)
    gpu = cfgen.posterior_noise(logits.cuda(), tokens.cuda(), sampler=sampler, seed=seeds.cuda())
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(sampler.log_probs(logits.cuda()).cpu(), sampler.log_probs(logits))
