import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import cfgen

SAMPLERS = [
    cfgen.Sampler(),
    cfgen.Sampler(temperature=0.7),
    cfgen.Sampler(top_k=3),
    cfgen.Sampler(top_p=0.8),
    cfgen.Sampler(temperature=0.6, top_k=5, top_p=0.9),
    cfgen.Sampler(temperature=1.3, top_p=0.5),
]


def hf_support(sampler, logits):
    scores = logits.clone().float()
    if sampler.temperature != 1.0:
        scores = TemperatureLogitsWarper(sampler.temperature)(None, scores)
    if sampler.top_k:
        scores = TopKLogitsWarper(sampler.top_k)(None, scores)
    if sampler.top_p:
        scores = TopPLogitsWarper(sampler.top_p)(None, scores)
    return torch.isfinite(scores)


def random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    plain = torch.randn(64, 50, generator=g) * 3
    ties = torch.randint(-3, 3, (64, 50), generator=g).float()  # many exact ties
    extreme = (torch.rand(64, 50, generator=g) * 2 - 1) * 1e4
    extreme[:, :5] = 1e4  # tied at the top, extreme values
    return torch.cat([plain, ties, extreme])


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_support_equals_transformers_warpers(sampler):
    for seed in range(3):
        logits = random_logits(seed)
        assert torch.equal(torch.isfinite(sampler.log_probs(logits)), hf_support(sampler, logits))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_log_probs_are_normalised_float32(sampler):
    lp = sampler.log_probs(random_logits(0).to(torch.bfloat16))
    assert lp.dtype == torch.float32
    assert torch.allclose(torch.logsumexp(lp, -1), torch.zeros(lp.shape[0]), atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS[:4], ids=lambda s: s.describe())
def test_sampling_frequencies_chi_square(sampler):
    # 40,000 Gumbel-max draws from 6 categories; chi-square p > 1e-3.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 2.0])
    n = 40000
    noise = cfgen.gumbel_noise(torch.arange(n), 0, 6)
    draws = sampler.sample(logits.expand(n, 6), noise)
    counts = torch.bincount(draws, minlength=6).double()
    p = sampler.log_probs(logits).double().exp()
    support = p > 0
    assert counts[~support].sum() == 0
    expected = p[support] / p[support].sum() * n
    assert stats.chisquare(counts[support], expected).pvalue > 1e-3


def test_greedy_is_argmax_whatever_the_noise():
    logits = torch.randn(10, 20, generator=torch.Generator().manual_seed(1))
    noise = cfgen.gumbel_noise(torch.arange(10), 0, 20) * 100
    assert torch.equal(cfgen.Sampler(temperature=0).sample(logits, noise), logits.argmax(-1))


def test_settings_round_trip_and_generate_kwargs():
    s = cfgen.Sampler(temperature=0.6, top_k=10, top_p=0.9)
    assert cfgen.Sampler(**s.to_dict()) == s
    assert s.generate_kwargs() == {"do_sample": True, "temperature": 0.6, "top_k": 10, "top_p": 0.9}
    assert cfgen.Sampler(top_k=0, top_p=1.0) == cfgen.Sampler()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfgen.Sampler(**kwargs)


def test_nan_and_inf_logits_rejected():
    with pytest.raises(ValueError, match="NaN"):
        cfgen.Sampler().log_probs(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="inf"):
        cfgen.Sampler().log_probs(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="shape"):
        cfgen.Sampler().sample(torch.zeros(2, 3), torch.zeros(2, 4))


def test_a_row_of_only_minus_inf_is_rejected_with_its_index():
    logits = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])
    with pytest.raises(ValueError, match=r"row \(1,\) are all -inf"):
        cfgen.Sampler().log_probs(logits)
    with pytest.raises(ValueError, match="all -inf"):
        cfgen.posterior_noise(logits, torch.tensor([1, 0]))


def test_tiny_temperatures_are_refused_not_turned_into_nan():
    with pytest.raises(ValueError, match="temperature=0 for greedy"):
        cfgen.Sampler(temperature=1e-38)
    s = cfgen.Sampler(temperature=1e-6)
    assert torch.isfinite(s.log_probs(torch.tensor([[1e4, -1e4, 0.0]])).amax())
