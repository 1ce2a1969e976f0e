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


def _gen(model, hook, ids, n=4):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          logits_processor=[hook], pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("second", [[4, 5, 6, 7, 8, 9, 10, 11], [9], [3, 1, 4, 1, 5, 9, 2]],
                         ids=["longer", "shorter", "one-longer-than-last-input"])
def test_reused_hook_rearms_for_any_new_prompt(second):
    """A reused hook draws what a fresh hook draws, whatever the second prompt's length.

    The third case is the one a length rule misses: the first call's last input had 3 + 3 = 6 tokens,
    the second prompt has 7.
    """
    model = tiny_gpt2(vocab_size=16)
    hook = SamplerHook(cfgen.Sampler(), seeds=torch.tensor([5, 6]))
    _gen(model, hook, torch.tensor([[1, 2, 3], [3, 2, 1]]))
    ids = torch.tensor([second, second[::-1]])
    again = _gen(model, hook, ids)
    fresh_hook = SamplerHook(cfgen.Sampler(), seeds=torch.tensor([5, 6]))
    assert torch.equal(again, _gen(model, fresh_hook, ids))
    assert hook.steps_seen == fresh_hook.steps_seen == [0, 1, 2, 3]


def test_reused_hook_rearms_for_another_batch_size():
    model = tiny_gpt2(vocab_size=16)
    hook = SamplerHook(cfgen.Sampler(), seeds=3)
    _gen(model, hook, torch.tensor([[1, 2, 3]]))
    ids = torch.tensor([[1, 2, 3, 4]] * 2)  # one token longer than the last input, but two rows
    assert torch.equal(_gen(model, hook, ids), _gen(model, SamplerHook(cfgen.Sampler(), seeds=3), ids))


def test_continuing_from_the_output_equals_one_longer_call_and_reset_restarts():
    model = tiny_gpt2(vocab_size=16)
    ids = torch.tensor([[1, 2, 3]])
    hook = SamplerHook(cfgen.Sampler(), seeds=9)
    first = _gen(model, hook, ids, n=3)
    both = _gen(model, hook, first, n=3)
    assert hook.steps_seen == [0, 1, 2, 3, 4, 5]  # one run of steps, as in one longer call
    assert torch.equal(both, _gen(model, SamplerHook(cfgen.Sampler(), seeds=9), ids, n=6))
    hook.reset()
    assert torch.equal(_gen(model, hook, first, n=3), _gen(model, SamplerHook(cfgen.Sampler(), seeds=9), first, n=3))
    assert hook.steps_seen == [0, 1, 2]
