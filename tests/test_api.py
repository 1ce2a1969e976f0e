"""cfgen.generate / cfgen.counterfactual over pyvene models (tiny random models, offline)."""

import copy

import pytest
import pyvene as pv
import torch
from scipy import stats

import cfgen
import cfgen.engine

from .conftest import CharTokenizer, tiny_gpt2, tiny_llama

TOK = CharTokenizer()
PROMPTS = ["hello there", "hi", "a much longer prompt here"]  # different lengths: a padded batch
SAMPLERS = [cfgen.Sampler(), cfgen.Sampler(temperature=0.7, top_k=5), cfgen.Sampler(top_p=0.8), cfgen.Sampler(0)]
MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make(kind, **kw):
    return MAKERS[kind](init=0.3, **kw)


def steering(model, vector, layer=1):
    return pv.IntervenableModel({"layer": layer, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=model.config.hidden_size,
                                                                         source_representation=vector)}, model)


def interchange(model, layer=1):
    return pv.IntervenableModel({"layer": layer, "component": "block_output",
                                 "intervention_type": pv.VanillaIntervention}, model)


def scheduled(schedule, length, prompt_len):
    if schedule == "all":
        return list(range(length))
    if schedule == "prompt":
        return [p for p in range(length) if p < prompt_len]
    if schedule == "generation":
        return [p for p in range(length) if p >= prompt_len - 1]
    return [p for p in schedule if p < length]


def reference(model, intervenable, prompt, seed, sampler, n, schedule=None, source=None, locs=None):
    """No cache: recompute the whole sequence through IntervenableModel.forward at every step."""
    seq = TOK(prompt)["input_ids"]
    plen = len(seq)
    for step in range(n):
        ids = torch.tensor([seq])
        if intervenable is None:
            logits = model(ids).logits[0, -1]
        elif source is not None:
            src = torch.tensor([TOK(source)["input_ids"]])
            _, out = intervenable({"input_ids": ids}, sources=[{"input_ids": src}],
                                  unit_locations={"sources->base": ([[[locs[0]]]], [[[locs[1]]]])})
            logits = out.logits[0, -1]
        else:
            positions = scheduled(schedule, len(seq), plen)
            if positions:
                _, out = intervenable({"input_ids": ids}, unit_locations={"base": positions})
                logits = out.logits[0, -1]
            else:
                logits = model(ids).logits[0, -1]
        seq.append(int(sampler.sample(logits, cfgen.gumbel_noise(seed, step, logits.shape[-1])[0])))
    return seq[plen:]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.describe())
def test_identity_interventions_reproduce_factual_text(kind, sampler):
    model = make(kind)
    zero = steering(model, torch.zeros(model.config.hidden_size))
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=12, sampler=sampler, seed=5, eos_token_id=[])
    assert all(r.identical), r
    assert [len(t) for t in r.factual_ids] == [12] * 3
    self_swap = cfgen.generate(interchange(model), TOK, PROMPTS, sources=PROMPTS,
                               unit_locations={"sources->base": 1}, max_new_tokens=12, sampler=sampler, seed=5,
                               eos_token_id=[])
    assert all(self_swap.identical)
    assert self_swap.factual_ids == r.factual_ids
    # the factual rows are the plain model's Gumbel-max samples
    for i, prompt in enumerate(PROMPTS):
        assert r.factual_ids[i] == reference(model, None, prompt, 5, sampler, 12)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("schedule", ["all", "prompt", "generation", [1, 4, 9]])
def test_kv_cached_decode_equals_full_recompute_reference(kind, schedule):
    model = make(kind)
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 2
    steer = steering(model, vec)
    sampler = cfgen.Sampler(temperature=0.8)
    r = cfgen.generate(steer, TOK, PROMPTS, max_new_tokens=10, sampler=sampler, seed=11, intervene_on=schedule,
                       eos_token_id=[])
    changed = 0
    for i, prompt in enumerate(PROMPTS):
        assert r.factual_ids[i] == reference(model, None, prompt, 11, sampler, 10)
        cf = reference(model, steer, prompt, 11, sampler, 10, schedule=schedule)
        assert r.counterfactual_ids[i] == cf
        changed += r.first_divergence[i] is not None
    assert changed >= 1  # the steering vector does something, so the comparison means something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_interchange_equals_reference(kind):
    model = make(kind)
    ic = interchange(model)
    sampler = cfgen.Sampler(temperature=0.8)
    sources = ["zzzzzzzz", "qq", "the source text"]
    r = cfgen.generate(ic, TOK, PROMPTS, sources=sources, unit_locations={"sources->base": (1, 1)},
                       max_new_tokens=8, sampler=sampler, seed=2, eos_token_id=[])
    for i, prompt in enumerate(PROMPTS):
        assert r.counterfactual_ids[i] == reference(model, ic, prompt, 2, sampler, 8, source=sources[i], locs=(1, 1))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_invariance(kind):
    model = make(kind)
    steer = steering(model, torch.ones(model.config.hidden_size))
    kw = dict(max_new_tokens=10, seed=[3, 4, 5], temperature=0.9, eos_token_id=[], interventional=True)
    batch = cfgen.generate(steer, TOK, PROMPTS, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = cfgen.generate(steer, TOK, [prompt], **{**kw, "seed": 3 + i})
        assert alone.factual_ids[0] == batch.factual_ids[i]
        assert alone.counterfactual_ids[0] == batch.counterfactual_ids[i]
        assert alone.interventional_ids[0] == batch.interventional_ids[i]
    # a prompt's text does not depend on its position in the batch
    flipped = cfgen.generate(steer, TOK, PROMPTS[::-1], **{**kw, "seed": [5, 4, 3]})
    assert flipped.counterfactual_ids == batch.counterfactual_ids[::-1]


def test_interventional_rows_use_fresh_noise():
    model = make("llama")
    zero = steering(model, torch.zeros(model.config.hidden_size))
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=12, seed=1, interventional=True, eos_token_id=[])
    assert all(r.identical)
    assert r.interventional_ids != r.factual_ids  # same model, independent noise


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hindsight_of_own_output_with_identity_reproduces(kind):
    model = make(kind)
    zero = steering(model, torch.zeros(model.config.hidden_size))
    for sampler in SAMPLERS:
        r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=10, sampler=sampler, seed=7, eos_token_id=[])
        h = cfgen.counterfactual(zero, TOK, PROMPTS, r.factual_ids, num_samples=3, sampler=sampler, seed=100,
                                 eos_token_id=[])
        assert h.mode == "hindsight" and len(h) == 9
        assert h.counterfactual_ids == [r.factual_ids[p] for p in h.prompt_index]


def test_hindsight_law_equals_joint_law():
    """P(cf | factual) by hindsight equals the joint law, on a 6-token vocabulary, 2 new tokens.

    Joint: 6,000 prior seeds. Hindsight: 1,500 posterior draws for each of the two most frequent
    factual sequences. Pass: chi-square homogeneity p > 1e-3 and total variation < 0.1.
    """
    model = make("gpt2", vocab_size=6)
    steer = steering(model, torch.randn(16, generator=torch.Generator().manual_seed(0)) * 2)
    sampler = cfgen.Sampler(temperature=1.0)
    n = 6000
    joint = cfgen.generate(steer, TOK, [[1, 3, 4]], max_new_tokens=2, sampler=sampler, seed=0, num_samples=n,
                           eos_token_id=[])
    pairs = [(tuple(f), tuple(c)) for f, c in zip(joint.factual_ids, joint.counterfactual_ids)]
    facts = sorted({f for f, _ in pairs}, key=lambda f: -sum(1 for g, _ in pairs if g == f))[:2]
    for fact in facts:
        cond = [c for f, c in pairs if f == fact]
        h = cfgen.counterfactual(steer, TOK, [[1, 3, 4]], [list(fact)], num_samples=1500, sampler=sampler,
                                 seed=10**6, eos_token_id=[])
        hind = [tuple(c) for c in h.counterfactual_ids]
        outcomes = sorted(set(cond) | set(hind))
        a = [cond.count(o) for o in outcomes]
        b = [hind.count(o) for o in outcomes]
        tv = 0.5 * sum(abs(x / len(cond) - y / len(hind)) for x, y in zip(a, b))
        assert tv < 0.1, (fact, tv)
        if len(outcomes) > 1:
            assert stats.chi2_contingency([a, b]).pvalue > 1e-3


def test_bf16_model_identity_and_float32_noise(monkeypatch):
    model = make("llama").to(torch.bfloat16)
    zero = steering(model, torch.zeros(model.config.hidden_size, dtype=torch.bfloat16))
    seen = []
    real = cfgen.engine.row_noise

    def spy(*a, **k):
        u = real(*a, **k)
        seen.append(u.dtype)
        return u

    monkeypatch.setattr(cfgen.engine, "row_noise", spy)
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=8, seed=3, temperature=0.8, eos_token_id=[])
    assert all(r.identical) and seen and set(seen) == {torch.float32}


def test_global_rng_state_untouched():
    model = make("gpt2")
    steer = steering(model, torch.ones(16))
    state = torch.get_rng_state()
    r = cfgen.generate(steer, TOK, PROMPTS, max_new_tokens=5, interventional=True, eos_token_id=[])
    cfgen.counterfactual(steer, TOK, PROMPTS, r.factual_ids, num_samples=2, eos_token_id=[])
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("schedule", ["all", "prompt", "generation", [0, 3, 12]])
def test_each_schedule_intervenes_exactly_where_it_says(schedule):
    """Record layer 0's input activations (embeddings + steering) at every call and find where v was added."""
    model = make("gpt2")
    v = torch.full((16,), 3.0)
    steer = pv.IntervenableModel({"layer": 0, "component": "block_input",
                                  "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=v)},
                                 model)
    calls = []
    block, wte, wpe = model.transformer.h[0], model.transformer.wte, model.transformer.wpe
    real_block, real_wte, real_wpe = block.forward, wte.forward, wpe.forward
    record = {}

    def block_fwd(hidden_states, *a, **k):
        calls.append((hidden_states.detach().clone(), record["wte"] + record["wpe"]))
        return real_block(hidden_states, *a, **k)

    def wte_fwd(x):
        record["wte"] = real_wte(x)
        return record["wte"]

    def wpe_fwd(x):
        record["wpe"] = real_wpe(x)
        return record["wpe"]

    block.forward, wte.forward, wpe.forward = block_fwd, wte_fwd, wpe_fwd
    try:
        prompts = ["hello there", "hi"]
        r = cfgen.generate(steer, TOK, prompts, max_new_tokens=6, seed=0, intervene_on=schedule, eos_token_id=[])
    finally:
        del block.forward, wte.forward, wpe.forward
    width = max(len(p) for p in prompts)
    rows = 2 * len(prompts)  # factual rows, then counterfactual rows
    for call, (hidden, clean) in enumerate(calls):
        added = ((hidden - clean) - v).abs().amax(-1) < 1e-5  # [rows, k]
        untouched = (hidden - clean).abs().amax(-1) < 1e-6
        assert bool((added | untouched).all())
        for row in range(rows):
            p = row % len(prompts)
            plen = len(prompts[p])
            if call == 0:
                positions = [j - (width - plen) for j in range(width)]
            else:
                positions = [plen + call - 1]
            for j, pos in enumerate(positions):
                if pos < 0:
                    continue  # padding
                want = row >= len(prompts) and pos in scheduled(schedule, 10**6, plen)
                assert bool(added[row, j]) == want, (call, row, pos)
    assert len(r) == 2


def test_model_pair_weight_edit_and_identical_pair():
    base = make("llama")
    same = cfgen.generate((base, copy.deepcopy(base)), TOK, PROMPTS, max_new_tokens=8, seed=4, eos_token_id=[])
    assert all(same.identical)
    edited = copy.deepcopy(base)
    with torch.no_grad():
        edited.lm_head.weight.add_(torch.randn(edited.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    r = cfgen.generate((base, edited), TOK, PROMPTS, max_new_tokens=8, seed=4, eos_token_id=[])
    assert r.factual_ids == same.factual_ids
    assert not all(r.identical)


def test_rows_stop_at_their_own_eos():
    model = make("gpt2")
    zero = steering(model, torch.zeros(16))
    free = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=10, seed=9, eos_token_id=[])
    eos = free.factual_ids[0][3]
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=10, seed=9, eos_token_id=eos)
    for i in range(3):
        full = free.factual_ids[i]
        expect = full[: full.index(eos)] if eos in full else full
        assert r.factual_ids[i] == expect
        assert r.finish_reasons["factual"][i] == ("eos" if eos in full else "length")


def test_rows_stop_at_their_own_stop_string():
    model = make("gpt2")
    zero = steering(model, torch.zeros(16))
    free = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=10, seed=9, eos_token_id=[])
    letter = TOK.decode([free.factual_ids[1][2]])
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=10, seed=9, eos_token_id=[], stop_strings=letter)
    for i in range(3):
        text = TOK.decode(free.factual_ids[i])
        cut = text.find(letter)
        assert TOK.decode(r.factual_ids[i]) == (text if cut < 0 else text[: cut + 1])
        assert r.finish_reasons["factual"][i] == ("length" if cut < 0 else "stop_string")


def test_result_records_and_html(tmp_path):
    model = make("gpt2")
    steer = steering(model, torch.ones(16) * 2)
    r = cfgen.generate(steer, TOK, PROMPTS, max_new_tokens=6, seed=1, eos_token_id=[], top_k=5)
    recs = r.to_records()
    assert [rec["seed"] for rec in recs] == [1, 1, 1]
    assert recs[0]["sampler"] == {"temperature": 1.0, "top_k": 5, "top_p": None}
    path = tmp_path / "r.jsonl"
    r.to_jsonl(path)
    assert len(path.read_text().splitlines()) == 3
    assert "<table" in r.to_html() and "diverges" in repr(r) or "identical" in repr(r)
    # a record regenerates its row
    again = cfgen.generate(steer, TOK, recs[1]["prompt"], max_new_tokens=6, seed=recs[1]["seed"],
                           sampler=cfgen.Sampler(**recs[1]["sampler"]), eos_token_id=[])
    assert again.counterfactual_ids[0] == r.counterfactual_ids[1]


def test_sampling_site_in_config_sets_sampler_and_seed():
    model = make("gpt2")
    cfg = pv.IntervenableConfig([
        {"layer": 1, "component": "block_output",
         "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=torch.ones(16))},
        cfgen.sampling_site(cfgen.Sampler(temperature=0.5, top_k=4), seed=42),
    ])
    pvm = pv.IntervenableModel(cfg, model)
    r = cfgen.generate(pvm, TOK, PROMPTS, max_new_tokens=6, eos_token_id=[])
    assert r.sampler == cfgen.Sampler(temperature=0.5, top_k=4) and r.seeds == [42] * 3
    plain = steering(model, torch.ones(16))
    ref = cfgen.generate(plain, TOK, PROMPTS, max_new_tokens=6, seed=42, temperature=0.5, top_k=4, eos_token_id=[])
    assert r.counterfactual_ids == ref.counterfactual_ids and r.factual_ids == ref.factual_ids


# ------------------------------------------------------------------ bad input --
def test_bad_inputs_have_clear_errors():
    model = make("gpt2")
    ic = interchange(model)
    with pytest.raises(ValueError, match="without unit_locations"):
        cfgen.generate(ic, TOK, PROMPTS, sources=PROMPTS, max_new_tokens=3)
    with pytest.raises(ValueError, match="outside prompt 1"):
        cfgen.generate(ic, TOK, PROMPTS, sources=PROMPTS, unit_locations={"sources->base": 4}, max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        cfgen.generate(ic, TOK, ["ok", ""], max_new_tokens=3)
    with pytest.raises(ValueError, match="context length"):
        cfgen.generate(ic, TOK, ["x" * 120], max_new_tokens=20)
    with pytest.raises(TypeError, match="IntervenableModel"):
        cfgen.generate(model, TOK, PROMPTS, max_new_tokens=3)
    with pytest.raises(ValueError, match="vocabulary"):
        cfgen.generate((model, make("gpt2", vocab_size=40)), TOK, PROMPTS, max_new_tokens=3)
    with pytest.raises(TypeError, match="either sampler"):
        cfgen.generate(ic, TOK, PROMPTS, max_new_tokens=3, sampler=cfgen.Sampler(), temperature=0.5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        cfgen.generate(ic, TOK, [[3, 99]], max_new_tokens=3)
    with pytest.raises(ValueError, match="intervene_on"):
        cfgen.generate(ic, TOK, PROMPTS, max_new_tokens=3, intervene_on="everywhere")


def test_impossible_observation_names_the_prompt():
    model = make("gpt2")
    zero = steering(model, torch.zeros(16))
    logits = model(torch.tensor([TOK("hi")["input_ids"]])).logits[0, -1]
    worst = int(logits.argmin())
    greedy = cfgen.generate(zero, TOK, "hello there", max_new_tokens=2, do_sample=False, eos_token_id=[])
    with pytest.raises(cfgen.ImpossibleObservation, match=r"prompt 1: observed token .* at step 0") as err:
        cfgen.counterfactual(zero, TOK, ["hello there", "hi"], [greedy.factual_ids[0], [worst, 4]], top_k=2)
    assert err.value.index == (1, 0) and err.value.token == worst


def test_observed_string_that_does_not_round_trip_warns():
    model = make("gpt2")
    zero = steering(model, torch.zeros(16))
    with pytest.warns(UserWarning, match="does not survive tokenization"):
        cfgen.counterfactual(zero, TOK, ["hello"], ["XYZ"], eos_token_id=[])


def test_nan_logits_are_reported():
    model = make("gpt2")
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    zero = steering(model, torch.zeros(16))
    with pytest.raises(ValueError, match="NaN"):
        cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=3)
