"""Token-level do(y_t = w) and prompt counterfactuals (cfgen.tokens) on tiny random models."""

import pytest
import pyvene as pv
import torch

import cfgen
import cfgen.tokens as ct
from cfgen.api import INTERVENTIONAL

from .conftest import CharTokenizer, tiny_gpt2, tiny_llama

TOK = CharTokenizer()
PROMPTS = ["hello there", "hi", "a much longer prompt"]
SAMPLERS = [cfgen.Sampler(), cfgen.Sampler(temperature=0.7, top_k=5), cfgen.Sampler(top_p=0.8)]
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
N = 12


def make(kind="gpt2", **kw):
    return MAKERS[kind](init=0.3, **kw)


def reference(model, context, seed, sampler, start, stop, *, stream=cfgen.noise.PRIOR, forced=None, noise=None):
    """No cache: steps start..stop-1 on top of `context`, step s drawn with gumbel_noise(seed, s) (or `noise`)."""
    seq, out = list(context), []
    for s in range(start, stop):
        if forced and s in forced:
            tok = forced[s]
        else:
            logits = model(torch.tensor([seq])).logits[0, -1]
            u = noise[s] if noise is not None and s < len(noise) else \
                cfgen.gumbel_noise(seed, s, logits.shape[-1], stream=stream)[0]
            tok = int(sampler.sample(logits, u))
        seq.append(tok)
        out.append(tok)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_do_factual_token_reproduces_factual_text(kind, sampler):
    model = make(kind)
    r = ct.sample(model, TOK, PROMPTS, max_new_tokens=N, sampler=sampler, seed=[4, 5, 6], eos_token_id=[])
    for t in (0, 5, N - 1):
        same = ct.do(model, TOK, r, [{t: r.factual_ids[i][t]} for i in range(3)], eos_token_id=[],
                     interventional=True)
        assert same.counterfactual_ids == r.factual_ids
        assert same.factual_ids == r.factual_ids
        assert same.settings["intervention_step"] == [t] * 3
        assert all(iv[:t + 1] == f[:t + 1] for iv, f in zip(same.interventional_ids, r.factual_ids))


def test_sample_equals_generate_factual_text():
    model = make("llama")
    zero = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=16, source_representation=torch.zeros(16))}, model)
    g = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=N, seed=3, temperature=0.8, eos_token_id=[])
    s = ct.sample(model, TOK, PROMPTS, max_new_tokens=N, seed=3, sampler=g.sampler, eos_token_id=[])
    assert s.factual_ids == g.factual_ids and all(s.identical)
    # do() accepts generate's result and the IntervenableModel; a zero vector equals the plain model
    a = ct.do(model, TOK, g, {4: 7}, eos_token_id=[])
    b = ct.do(zero, TOK, g, {4: 7}, eos_token_id=[])
    assert a.counterfactual_ids == b.counterfactual_ids


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_regenerated_tokens_use_the_factual_runs_noise_at_the_same_steps(kind):
    model = make(kind)
    sampler = cfgen.Sampler(temperature=0.9)
    r = ct.sample(model, TOK, PROMPTS, max_new_tokens=N, sampler=sampler, seed=[10, 11, 12], eos_token_id=[])
    t = 3
    cf = ct.do(model, TOK, r, {t: 20}, eos_token_id=[], interventional=True)
    changed = 0
    for i, prompt in enumerate(PROMPTS):
        fact = r.factual_ids[i]
        assert cf.counterfactual_ids[i][:t] == fact[:t]  # tokens before t never change
        assert cf.counterfactual_ids[i][t] == 20
        ctx = TOK(prompt)["input_ids"] + fact[:t] + [20]
        with torch.no_grad():
            assert cf.counterfactual_ids[i][t + 1:] == reference(model, ctx, r.seeds[i], sampler, t + 1, N)
            assert cf.interventional_ids[i][t + 1:] == reference(model, ctx, r.seeds[i], sampler, t + 1, N,
                                                                 stream=INTERVENTIONAL)
        changed += cf.counterfactual_ids[i] != fact
        # The same regeneration with HF generate and the sampler hook, whose noise is the
        # factual run's at steps t+1, t+2, ...: the hook sees every step once, in order.
        hook = cfgen.SamplerHook(sampler, noise=lambda step, s=r.seeds[i]: cfgen.gumbel_noise(s, t + 1 + step, 32))
        ids = torch.tensor([ctx])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N - t - 1,
                             logits_processor=[hook], pad_token_id=0, eos_token_id=None)
        assert out[0, len(ctx):].tolist() == cf.counterfactual_ids[i][t + 1:]
        assert hook.steps_seen == list(range(N - t - 1))
    assert changed >= 1


def test_several_interventions_and_token_lists():
    model = make("llama")
    sampler = cfgen.Sampler(temperature=0.8)
    r = ct.sample(model, TOK, PROMPTS, max_new_tokens=N, sampler=sampler, seed=1, eos_token_id=[])
    cf = ct.do(model, TOK, r, {7: 9, 2: 30}, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        fact = r.factual_ids[i]
        ctx = TOK(prompt)["input_ids"] + fact[:2] + [30]
        with torch.no_grad():
            tail = reference(model, ctx, r.seeds[i], sampler, 3, N, forced={7: 9})
        assert cf.counterfactual_ids[i] == fact[:2] + [30] + tail
        assert cf.counterfactual_ids[i][7] == 9
    assert cf.settings["intervention_step"] == [2, 2, 2]
    assert cf.settings["token_interventions"][0] == [[2, 30], [7, 9]]
    # a list forces consecutive steps: {2: [a, b]} == {2: a, 3: b}; strings are one-token strings
    a = ct.do(model, TOK, r, {2: [30, 9]}, eos_token_id=[])
    b = ct.do(model, TOK, r, {2: 30, 3: 9}, eos_token_id=[])
    assert a.counterfactual_ids == b.counterfactual_ids
    s = ct.do(model, TOK, r, {4: "q"}, eos_token_id=[])
    assert all(c[4] == TOK("q")["input_ids"][0] for c in s.counterfactual_ids)
    # one dict per selected row
    rows = ct.do(model, TOK, r, [{1: 5}, {6: 8}], row=[2, 0], eos_token_id=[])
    assert rows.factual_ids == [r.factual_ids[2], r.factual_ids[0]]
    assert rows.counterfactual_ids[0][1] == 5 and rows.counterfactual_ids[1][6] == 8
    assert rows.settings["intervention_step"] == [1, 6]


def test_alternative_token_is_a_seeded_nucleus_alternative():
    model = make("gpt2")
    r = ct.sample(model, TOK, PROMPTS, max_new_tokens=N, seed=[2, 3, 4], eos_token_id=[])
    state = torch.get_rng_state()
    a = ct.do(model, TOK, r, {5: ct.Alternative()}, eos_token_id=[])
    assert torch.equal(state, torch.get_rng_state())
    b = ct.do(model, TOK, r, {5: ct.Alternative()}, eos_token_id=[])
    assert a.counterfactual_ids == b.counterfactual_ids  # seeded
    for i, prompt in enumerate(PROMPTS):
        w = a.counterfactual_ids[i][5]
        assert w != r.factual_ids[i][5]
        with torch.no_grad():
            logits = model(torch.tensor([TOK(prompt)["input_ids"] + r.factual_ids[i][:5]])).logits[0, -1]
        nucleus = torch.isfinite(cfgen.Sampler(top_p=0.9).log_probs(logits))
        assert nucleus[w]
    # different seeds may pick different alternatives, all inside the nucleus; with top_p tiny the
    # factual token fills the set and the best other token is chosen from the renormalised rest
    c = ct.do(model, TOK, r, {5: ct.Alternative(top_p=1e-6)}, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([TOK(prompt)["input_ids"] + r.factual_ids[i][:5]])).logits[0, -1]
        order = logits.argsort(descending=True).tolist()
        best_other = next(v for v in order if v != r.factual_ids[i][5])
        assert c.counterfactual_ids[i][5] == best_other


def test_hindsight_result_regenerates_with_posterior_noise():
    model = make("gpt2")
    sampler = cfgen.Sampler(temperature=0.9)
    zero = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=16, source_representation=torch.zeros(16))}, model)
    observed = [TOK("some observed text")["input_ids"], TOK("more")["input_ids"]]
    h = cfgen.counterfactual(zero, TOK, PROMPTS[:2], observed, sampler=sampler, seed=[8, 9], max_new_tokens=N,
                             eos_token_id=[])
    same = ct.do(model, TOK, h, {1: h.factual_ids[0][1]}, row=0, eos_token_id=[])
    assert same.counterfactual_ids[0][:len(h.factual_ids[0])] == h.factual_ids[0]
    assert same.mode == "hindsight"
    t = 2
    cf = ct.do(model, TOK, h, {t: 25}, row=0, eos_token_id=[])
    obs = h.factual_ids[0]
    ctx = TOK(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + obs])).logits[0, len(ctx) - 1:-1]
        post = cfgen.posterior_noise(logits[None], torch.tensor([obs]), sampler=sampler, seed=torch.tensor([[8]]))[0]
        tail = reference(model, ctx + obs[:t] + [25], 8, sampler, t + 1, len(obs), noise=post)
    assert cf.counterfactual_ids[0] == obs[:t] + [25] + tail
    with pytest.raises(ValueError, match="outside the generated range"):
        ct.do(model, TOK, h, {len(obs): 3}, row=0, eos_token_id=[])


def test_eos_steps_and_bad_input_errors():
    model = make("gpt2")
    r = ct.sample(model, TOK, "hello", max_new_tokens=N, seed=0, eos_token_id=[])
    stop_tok = r.factual_ids[0][4]
    e = ct.sample(model, TOK, "hello", max_new_tokens=N, seed=0, eos_token_id=[stop_tok])
    L = len(e.factual_ids[0])
    assert e.finish_reasons["factual"] == ["eos"] and L <= 4
    with pytest.raises(ValueError, match="past EOS"):
        ct.do(model, TOK, e, {L + 1: 5}, eos_token_id=[stop_tok])
    # replacing the EOS token itself (step L) is allowed and continues the text
    go = ct.do(model, TOK, e, {L: 5}, eos_token_id=[stop_tok])
    assert go.counterfactual_ids[0][:L + 1] == e.factual_ids[0] + [5]
    with pytest.raises(ValueError, match="outside the generated range"):
        ct.do(model, TOK, r, {N: 5}, eos_token_id=[])
    with pytest.raises(ValueError, match="negative"):
        ct.do(model, TOK, r, {-1: 5}, eos_token_id=[])
    with pytest.raises(ValueError, match=r"tokenizes to 2 tokens"):
        ct.do(model, TOK, r, {3: "ab"}, eos_token_id=[])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ct.do(model, TOK, r, {3: 999}, eos_token_id=[])
    with pytest.raises(IndexError, match="out of range"):
        ct.do(model, TOK, r, {3: 5}, row=4, eos_token_id=[])
    with pytest.raises(TypeError, match="non-empty dict"):
        ct.do(model, TOK, r, {}, eos_token_id=[])
    with pytest.raises(ValueError, match="set once"):
        ct.do(model, TOK, r, {3: [5, 6], 4: 7}, eos_token_id=[])
    # a later intervention after the regenerated text ended is reported, not silently dropped
    with pytest.warns(UserWarning, match="not applied"):
        late = ct.do(model, TOK, r, {1: stop_tok, 8: 5}, eos_token_id=[stop_tok])
    assert late.settings["skipped_interventions"] == [{"row": 0, "steps": [8]}]
    assert late.counterfactual_ids[0] == r.factual_ids[0][:1]


def test_steering_combined_with_token_intervention_matches_reference():
    model = make("llama")
    vec = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 2
    steer = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=16, source_representation=vec)}, model)
    sampler = cfgen.Sampler(temperature=0.8)
    r = ct.sample(model, TOK, "hello", max_new_tokens=10, sampler=sampler, seed=3, eos_token_id=[])
    cf = ct.do(steer, TOK, r, {3: 11}, eos_token_id=[])
    ctx = TOK("hello")["input_ids"] + r.factual_ids[0][:3] + [11]
    seq = list(ctx)
    with torch.no_grad():
        for s in range(4, 10):
            _, out = steer({"input_ids": torch.tensor([seq])}, unit_locations={"base": list(range(len(seq)))})
            seq.append(int(sampler.sample(out.logits[0, -1], cfgen.gumbel_noise(3, s, 32)[0])))
    assert cf.counterfactual_ids[0] == r.factual_ids[0][:3] + [11] + seq[len(ctx):]


def test_edit_prompt_uses_the_same_noise_by_step():
    model = make("llama")
    sampler = cfgen.Sampler(temperature=0.9)
    e = ct.edit_prompt(model, TOK, ["hello there", "hi"], ["hello where", "a longer edited prompt"],
                       max_new_tokens=N, seed=[3, 4], sampler=sampler, interventional=True, eos_token_id=[])
    orig = ct.sample(model, TOK, ["hello there", "hi"], max_new_tokens=N, seed=[3, 4], sampler=sampler,
                     eos_token_id=[])
    edited = ct.sample(model, TOK, ["hello where", "a longer edited prompt"], max_new_tokens=N, seed=[3, 4],
                       sampler=sampler, eos_token_id=[])
    assert e.factual_ids == orig.factual_ids
    assert e.counterfactual_ids == edited.factual_ids
    with torch.no_grad():
        assert e.interventional_ids[1] == reference(model, TOK("a longer edited prompt")["input_ids"], 4, sampler,
                                                    0, N, stream=INTERVENTIONAL)
    same = ct.edit_prompt(model, TOK, "hello", "hello", max_new_tokens=N, seed=1, eos_token_id=[])
    assert same.identical == [True]
    with pytest.raises(ValueError, match="one edited prompt per prompt"):
        ct.edit_prompt(model, TOK, ["a", "b"], ["c"], max_new_tokens=3)
