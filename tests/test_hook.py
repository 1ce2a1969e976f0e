import pytest
import torch
from scipy import stats

import cfgen
from cfgen.hook import SamplerHook

from .conftest import tiny_gpt2, tiny_llama

SAMPLERS = [cfgen.Sampler(), cfgen.Sampler(temperature=0.7, top_k=3), cfgen.Sampler(top_p=0.8)]


def prompt_batch(n):
    ids = torch.tensor([[5, 3, 7]]).expand(n, 3)
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_hook_draws_from_hf_sampling_distribution(make, sampler):
    """Two new tokens over a vocabulary of 8 (64 outcomes), 6,000 sequences each way.

    Pass: chi-square homogeneity p > 1e-3 and total variation < 0.06.
    """
    model = make(vocab_size=8, seed=1)
    n = 6000
    ids, mask = prompt_batch(n)
    hook = SamplerHook(sampler, seeds=torch.arange(n))
    ours = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2,
                          logits_processor=[hook], pad_token_id=0, eos_token_id=None)[:, 3:]
    assert hook.steps_seen == [0, 1]
    gen = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, eos_token_id=None,
                            **sampler.generate_kwargs())[:, 3:]
    torch.set_rng_state(state)
    del gen
    a = torch.bincount(ours[:, 0] * 8 + ours[:, 1], minlength=64)
    b = torch.bincount(theirs[:, 0] * 8 + theirs[:, 1], minlength=64)
    keep = (a + b) > 0
    table = torch.stack([a[keep], b[keep]]).numpy()
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert 0.5 * (a - b).abs().sum().item() / n < 0.06


def test_hook_equals_explicit_gumbel_max_loop_and_ignores_padding():
    model = tiny_llama(vocab_size=32, seed=2)
    sampler = cfgen.Sampler(temperature=0.9, top_k=10)
    ids = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seeds = torch.tensor([3, 4])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5, pad_token_id=0,
                         eos_token_id=None, logits_processor=[SamplerHook(sampler, seeds)])
    for row, (start, seed) in enumerate([(2, 3), (0, 4)]):
        seq = ids[row, start:].tolist()
        for step in range(5):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(sampler.sample(logits, cfgen.gumbel_noise(seed, step, 32)[0])))
        assert out[row, 4:].tolist() == seq[-5:]


def test_hook_rearms_for_a_new_generate_call():
    model = tiny_gpt2(vocab_size=16)
    hook = SamplerHook(cfgen.Sampler(), seeds=1)
    ids = torch.tensor([[1, 2, 3]])
    a = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                       logits_processor=[hook], pad_token_id=0, eos_token_id=None)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                       logits_processor=[hook], pad_token_id=0, eos_token_id=None)
    assert torch.equal(a, b) and hook.steps_seen == [0, 1, 2, 3]


def test_hook_rejects_wrong_number_of_seeds():
    hook = SamplerHook(cfgen.Sampler(), seeds=torch.arange(3))
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        hook(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 10))
