"""The engine's cross-cutting behaviour: HF processors in generate / counterfactual, step-by-step hindsight,
locks and hooks on shared models, arguments checked before model work, chats as prompts."""

import threading

import pytest
import pyvene as pv
import torch

import cfgen
import cfgen.engine as E
from cfgen.noise import PRIOR

from .conftest import CharTokenizer, tiny_llama
from .test_processors import CASES, PROMPTS, V, hf_generate, hf_processors, make_model, stops

TOK = CharTokenizer()


def steering(model, vector, layer=1):
    return pv.IntervenableModel({"layer": layer, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=model.config.hidden_size,
                                                                         source_representation=vector)}, model)


# ------------------------------------------------------------------ processors through the engine --
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_generate_with_processors_equals_hf_generate(case):
    """cfgen.generate's factual tokens (KV-cached, batched engine) == HF generate(do_sample=False,
    [HF's own processors] + SamplerHook) with the same noise; an identity intervention's counterfactual equals
    the factual text, and hindsight of it under the same processors reproduces it."""
    name, kw, user = case
    kw = dict(kw)
    model = make_model()
    max_new = kw.pop("max_new_tokens", 10)
    stop = stops(case[1])
    eos = kw.pop("eos_token_id", sorted(stop))
    seeds = [11, 12]
    zero = steering(model, torch.zeros(model.config.hidden_size))
    extra = {"logits_processor": user} if user else {}
    r = cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=max_new, seed=seeds, eos_token_id=eos, **kw, **extra)
    ours = [ids + ([next(iter(stop))] if why == "eos" and len(stop) == 1 else []) for ids, why in
            zip(r.factual_ids, r.finish_reasons["factual"])]
    theirs = hf_generate(model, hf_processors(model, case[1], user, len(PROMPTS[0]), max_new), seeds, max_new,
                         stop, greedy=r.sampler.greedy)
    if len(stop) == 1:
        assert ours == theirs, name
    else:  # several stop ids: compare up to where each ended
        assert [t[:len(o)] for o, t in zip(r.factual_ids, theirs)] == r.factual_ids, name
    assert r.counterfactual_ids == r.factual_ids
    assert r.settings["processors"] and r.provenance["processors"]
    h = cfgen.counterfactual(zero, TOK, PROMPTS, r.factual_ids, num_samples=2, seed=5, eos_token_id=eos,
                             max_new_tokens=max_new, **kw, **extra)
    assert [ids[:len(r.factual_ids[p])] for ids, p in zip(h.counterfactual_ids, h.prompt_index)] == \
        [r.factual_ids[p] for p in h.prompt_index]


def test_processors_change_the_counterfactual_consistently_with_the_factual():
    """A steering vector under repetition_penalty: factual and counterfactual rows each apply the penalty to
    their own history (a row-by-row reference with Processing.sample agrees)."""
    model = make_model()
    steer = steering(model, torch.linspace(-3, 3, model.config.hidden_size))
    r = cfgen.generate(steer, TOK, PROMPTS, max_new_tokens=8, seed=[1, 2], eos_token_id=[], repetition_penalty=2.0)
    sampler, processing, _ = cfgen.processors.build(repetition_penalty=2.0)
    for kind, m in (("factual", model), ("counterfactual", None)):
        ids = getattr(r, f"{kind}_ids")
        for row, prompt in enumerate(PROMPTS):
            seq = list(prompt)
            for step in range(8):
                with torch.no_grad():
                    if m is None:
                        _, out = steer({"input_ids": torch.tensor([seq])})
                        logits = out.logits[0, -1:]
                    else:
                        logits = m(torch.tensor([seq])).logits[0, -1:]
                u = cfgen.gumbel_noise(r.seeds[row], step, V)
                seq.append(int(processing.sample(logits.float(), u, [seq], [len(prompt)])[0]))
            assert ids[row] == seq[len(prompt):], (kind, row)


def test_scm_breaking_and_unknown_arguments_are_refused():
    model = make_model()
    zero = steering(model, torch.zeros(model.config.hidden_size))
    with pytest.raises(ValueError, match="num_beams"):
        cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=3, num_beams=4)
    with pytest.raises(TypeError, match="Accepted HF generate arguments"):
        cfgen.generate(zero, TOK, PROMPTS, max_new_tokens=3, no_such_argument=1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        cfgen.generate(zero, TOK, PROMPTS)
    r = cfgen.generate(zero, TOK, PROMPTS, max_length=9, seed=0, eos_token_id=[])
    assert [len(t) for t in r.factual_ids] == [3, 3]  # max_length counts the 6-token prompt


def test_processor_that_bans_an_observed_token_is_named():
    model = make_model()
    zero = steering(model, torch.zeros(model.config.hidden_size))
    with pytest.raises(cfgen.ImpossibleObservation, match=r"prompt 1: .*step 1.*banned by NoRepeatNGram"):
        cfgen.counterfactual(zero, TOK, PROMPTS, [[8, 9], [8, 8]], no_repeat_ngram_size=1, eos_token_id=[])


# ------------------------------------------------------------------------- step-by-step hindsight --
def test_hindsight_noise_drawn_per_step_equals_the_whole_posterior():
    """Rows holding a Hindsight draw, at each step, exactly the noise posterior_noise gives for the whole text."""
    torch.manual_seed(0)
    T, S = 5, 3
    logits = torch.randn(T, V) * 3
    tokens = logits.argsort(-1, descending=True)[torch.arange(T), torch.tensor([0, 2, 1, 3, 0])]  # in every support
    for sampler in (cfgen.Sampler(), cfgen.Sampler(temperature=0.7, top_k=8)):
        seeds = [40 + j for j in range(S)]
        whole = cfgen.posterior_noise(logits.expand(S, -1, -1), tokens.expand(S, -1), sampler=sampler,
                                      seed=torch.tensor(seeds)[:, None])
        h = E.Hindsight(logits, tokens, sampler)
        rows = E.Rows(context=[[1]] * S, prompt_len=[1] * S, seed=seeds, max_new=[T] * S, stream=[PRIOR] * S,
                      posterior=[h] * S)
        for k in range(T):
            assert torch.equal(E.row_noise(rows, list(range(S)), [k] * S, V, "cpu"), whole[:, k])
        after = E.row_noise(rows, [0], [T], V, "cpu")  # beyond the observed text: prior noise
        assert torch.equal(after, cfgen.gumbel_noise(seeds[0], T, V))


def test_observed_eos_ends_the_factual_text_and_replay_is_identical():
    model = tiny_llama(init=0.3)
    zero = steering(model, torch.zeros(16))
    h = cfgen.counterfactual(zero, TOK, ["hello"], [[5, 6, 2, 7]], eos_token_id=[2], seed=3)
    assert h.factual_ids == [[5, 6]] and h.finish_reasons["factual"] == ["eos"]
    assert h.counterfactual_ids == [[5, 6]] and h.identical == [True]


# ---------------------------------------------------------------------------- shared models --
def test_threads_sharing_a_model_get_their_serial_results():
    """4 threads x 2 interventions (two IntervenableModels wrapping one model) == the serial results."""
    model = tiny_llama(init=0.3)
    a = steering(model, torch.linspace(-2, 2, 16))
    b = pv.IntervenableModel({"layer": 0, "component": "block_output",
                              "intervention": pv.AdditionIntervention(embed_dim=16,
                                                                      source_representation=torch.ones(16))}, model)
    prompts = ["hello there", "hi", "a longer prompt"]

    def call(m, seed):
        return cfgen.generate(m, TOK, prompts, max_new_tokens=12, seed=seed, eos_token_id=[]).counterfactual_ids

    jobs = [(a, 1), (b, 2), (a, 3), (b, 4), (a, 1), (b, 2), (a, 5), (b, 6)]
    serial = [call(m, s) for m, s in jobs]
    got = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            got[i] = call(*jobs[i])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == serial


class Boom(pv.AdditionIntervention):
    """An intervention that fails at the third forward (mid-decode)."""

    calls = 0

    def forward(self, base, source=None, subspaces=None, **kw):
        Boom.calls += 1
        if Boom.calls == 3:
            raise KeyboardInterrupt
        return super().forward(base, source, subspaces, **kw)


def test_interrupt_mid_decode_leaves_model_and_user_hooks_as_found():
    model = tiny_llama(init=0.3)
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
    iv = Boom(embed_dim=16, source_representation=torch.ones(16))
    boom = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": iv}, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Boom.calls = 0
    with pytest.raises(KeyboardInterrupt):
        cfgen.generate(boom, TOK, "hello", max_new_tokens=6, seed=0, eos_token_id=[])
    assert "forward" not in vars(iv)  # cfgen's patched forward is gone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    seen.clear()
    model(torch.tensor([[3, 4]]))
    assert seen == [1]  # the user's hook still fires
    r = cfgen.generate(boom, TOK, "hello", max_new_tokens=2, seed=0, eos_token_id=[])  # and the model still works
    assert len(r.factual_ids[0]) == 2
    seen.clear()
    model(torch.tensor([[3, 4]]))
    assert seen == [1]
    handle.remove()


# ------------------------------------------------------------------------------ arguments --
@pytest.mark.parametrize("kwargs, error", [
    ({"seed": True}, TypeError), ({"seed": "12"}, TypeError), ({"seed": [1.7]}, TypeError),
    ({"seed": 2**63}, ValueError), ({"num_samples": True}, TypeError), ({"num_samples": 0}, ValueError),
    ({"max_new_tokens": -5}, ValueError), ({"max_new_tokens": 1.5}, TypeError),
    ({"stop_strings": [""]}, ValueError),
])
def test_bad_arguments_are_refused_before_model_work(kwargs, error, monkeypatch):
    model = tiny_llama()
    zero = steering(model, torch.zeros(16))
    monkeypatch.setattr(E, "run", lambda *a, **k: pytest.fail("decoded anyway"))
    call = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error):
        cfgen.generate(zero, TOK, "hello", **call)
    with pytest.raises(error):
        cfgen.counterfactual(zero, TOK, "hello", "abc", **call)


@pytest.mark.parametrize("prompt, error", [(b"abc", TypeError), ([True, False], TypeError), ([[3.0, 4.0]], TypeError),
                                           ("ok \udc80", ValueError)])
def test_prompts_that_are_not_text_or_ids_are_refused(prompt, error):
    zero = steering(tiny_llama(), torch.zeros(16))
    with pytest.raises(error):
        cfgen.generate(zero, TOK, prompt, max_new_tokens=2)


def test_seed_none_draws_a_fresh_recorded_seed_that_replays():
    zero = steering(tiny_llama(init=0.3), torch.linspace(-1, 1, 16))
    a = cfgen.generate(zero, TOK, "hello", max_new_tokens=8, eos_token_id=[])
    b = cfgen.generate(zero, TOK, "hello", max_new_tokens=8, eos_token_id=[])
    assert a.seeds != b.seeds
    again = cfgen.generate(zero, TOK, "hello", max_new_tokens=8, eos_token_id=[], seed=a.seeds[0])
    assert again.factual_ids == a.factual_ids and again.counterfactual_ids == a.counterfactual_ids


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template: <role>: content\\n ..., then the assistant's turn."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        text += "assistant: " if add_generation_prompt else ""
        return {"input_ids": [1] + self(text)["input_ids"]}


def test_chats_go_through_the_chat_template():
    tok = ChatTokenizer()
    zero = steering(tiny_llama(init=0.3), torch.zeros(16))
    chat = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    one = cfgen.generate(zero, tok, chat, max_new_tokens=4, seed=1, eos_token_id=[])
    two = cfgen.generate(zero, tok, [chat, chat + [{"role": "assistant", "content": "yo"}]], max_new_tokens=4,
                         seed=1, eos_token_id=[])
    assert one.prompt_ids == [ids] and two.prompt_ids[0] == ids and len(two.prompt_ids) == 2
    assert one.factual_ids[0] == cfgen.generate(zero, tok, [ids], max_new_tokens=4, seed=1,
                                                eos_token_id=[]).factual_ids[0]


def test_calls_that_cannot_fit_are_refused_with_the_number(monkeypatch):
    zero = steering(tiny_llama(), torch.zeros(16))
    monkeypatch.setattr(cfgen.checks, "available_memory", lambda: 2**20)  # 1 MiB left
    with pytest.raises(MemoryError, match="decoding 2000 rows of up to"):
        cfgen.generate(zero, TOK, "hello", max_new_tokens=4, num_samples=1000)
    with pytest.raises(MemoryError, match="GiB"):
        cfgen.counterfactual(zero, TOK, ["hello"] * 64, [[5] * 120] * 64)


def test_weights_left_on_the_meta_device_are_refused():
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(tiny_llama().config)
    with pytest.raises(ValueError, match="meta"):
        cfgen.generate(steering(model, torch.zeros(16)), TOK, "hi", max_new_tokens=2)
