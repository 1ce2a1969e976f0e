"""Differential tests against pyvene itself: every accepted argument form means what it means in pyvene.

For each form, the logits cfgen's counterfactual rows compute at the prompt (batched, left-padded) equal
``IntervenableModel.forward`` on each prompt alone with the same form (atol 1e-5, float32), and the first
counterfactual token is argmax(log_softmax(pyvene's logits) + cfgen's noise for that seed and step 0).
"""

from __future__ import annotations

import pytest
import pyvene as pv
import torch

import cfgen
import cfgen.engine

from .conftest import CharTokenizer, tiny_llama

TOK = CharTokenizer()
PROMPTS = ["hello world", "abcdef"]  # 11 and 6 tokens: the second row is left-padded by 5
SOURCES = ["qrstuvwxyzab", "zyxwvu"]  # 12 and 6 tokens
D = 16


class Spy(cfgen.Sampler):
    """Records the logits the decode loop samples from."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "seen", [])

    def sample(self, logits, noise):
        self.seen.append(logits.clone())
        return super().sample(logits, noise)


def ids(text):
    return torch.tensor([TOK(text)["input_ids"]])


def check(intervenable, per_prompt, seed=3, **kwargs):
    """per_prompt(p) -> pyvene forward kwargs for prompt p alone; kwargs: cfgen's call for all prompts."""
    spy = Spy()
    r = cfgen.generate(intervenable, TOK, PROMPTS, max_new_tokens=1, seed=seed, sampler=spy, eos_token_id=[],
                       **kwargs)
    n = len(PROMPTS)
    cf_logits = spy.seen[0][n:2 * n]
    for p in range(n):
        with torch.no_grad():
            _, out = intervenable({"input_ids": ids(PROMPTS[p])}, **per_prompt(p))
        ref = out.logits[0, -1].float()
        torch.testing.assert_close(cf_logits[p], ref, atol=1e-5, rtol=0)
        noise = cfgen.gumbel_noise(seed, 0, ref.shape[-1])[0]
        assert r.counterfactual_ids[p][0] == int((torch.log_softmax(ref, -1) + noise).argmax())
    r.step0_logits, r.step0_factual = cf_logits, spy.seen[0][:n]
    # every form checked here must reach the logits compared (an intervention that cannot is no test)
    assert not torch.allclose(r.step0_logits, r.step0_factual, atol=1e-4)
    return r


@pytest.fixture(scope="module")
def model():
    return tiny_llama(init=0.5)


def vanilla(model, layer=0):
    return pv.IntervenableModel({"layer": layer, "component": "block_output",
                                 "intervention_type": pv.VanillaIntervention}, model)


def src(p):
    return [{"input_ids": ids(SOURCES[p])}]


@pytest.mark.parametrize("form", [3, [3, 1], (3, 1), [0, 2, 4], [1, 3, 5, 0]])
def test_broadcast_unit_locations_mean_what_pyvene_means(model, form):
    iv = vanilla(model)
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": form}},
          sources=SOURCES, unit_locations={"sources->base": form})


def test_a_pair_of_ints_is_source_then_base_not_two_positions(model):
    iv = vanilla(model)
    pair = check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": [3, 1]}},
                 sources=SOURCES, unit_locations={"sources->base": [3, 1]}, seed=0)
    both = check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": ([[[3, 1]]], [[[3, 1]]])}},
                 sources=SOURCES, unit_locations={"sources->base": ([3, 1], [3, 1])}, seed=0)
    # "positions 3 and 1 in both" is a different intervention: the rows' logits differ
    assert not torch.allclose(pair.step0_logits, both.step0_logits, atol=1e-3)


def test_nested_per_intervention_per_prompt_locations(model):
    iv = vanilla(model)
    s, b = [[2], [4]], [[7], [1]]
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": ([[s[p]]], [[b[p]]])}},
          sources=SOURCES, unit_locations={"sources->base": ([s], [b])})
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": ([[s[p]]], [[b[p]]])}},
          sources=SOURCES, unit_locations={"sources->base": (s, b)})  # cfgen: one list per prompt


def addition(model, **kw):
    return pv.IntervenableModel({"layer": 0, "component": "block_output",
                                 "intervention_type": pv.AdditionIntervention}, model, **kw)


@pytest.mark.parametrize("shape", [(D,), (1, D), (1, 1, D)])
def test_source_representations_shapes_broadcast_as_in_pyvene(model, shape):
    iv = addition(model)
    rep = torch.linspace(-2, 2, D).reshape(shape)
    check(iv, lambda p: {"unit_locations": {"base": 2}, "source_representations": rep},
          unit_locations={"base": 2}, source_representations=rep)


def test_source_representations_one_per_prompt(model):
    iv = addition(model)
    rep = torch.stack([torch.linspace(-2, 2, D), torch.linspace(3, -1, D)])
    check(iv, lambda p: {"unit_locations": {"base": [1, 3, 4]}, "source_representations": rep[p]},
          unit_locations={"base": [1, 3, 4]}, source_representations=rep)
    check(iv, lambda p: {"unit_locations": {"base": [1, 3, 4]}, "source_representations": rep[p]},
          unit_locations={"base": [1, 3, 4]}, source_representations=rep[:, None])


def test_base_only_pair_with_none_source(model):
    iv = addition(model)
    rep = torch.linspace(-2, 2, D)
    check(iv, lambda p: {"unit_locations": {"sources->base": (None, 3)}, "source_representations": rep},
          unit_locations={"sources->base": (None, 3)}, source_representations=rep)


def test_two_interventions_list_and_dict_of_representations(model):
    iv = pv.IntervenableModel([{"layer": 0, "component": "block_output", "intervention_type": pv.AdditionIntervention},
                               {"layer": 0, "component": "mlp_output", "intervention_type": pv.AdditionIntervention}],
                              model)
    a, b = torch.linspace(-1, 1, D), torch.linspace(2, 0, D)
    check(iv, lambda p: {"unit_locations": {"base": 1}, "source_representations": [a, b]},
          unit_locations={"base": 1}, source_representations=[a, b])
    k0, k1 = iv.sorted_keys
    check(iv, lambda p: {"unit_locations": {"base": 1}, "source_representations": {k0: a, k1: b}},
          unit_locations={"base": 1}, source_representations={k0: a, k1: b})


def heads(model, unit):
    return pv.IntervenableModel({"layer": 0, "component": "head_attention_value_output", "unit": unit,
                                 "intervention_type": pv.VanillaIntervention}, model)


def test_head_positions_h_pos_and_padding_shifts_positions_only(model):
    iv = heads(model, "h.pos")
    h, q = [[1], [3]], [[4], [2]]
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": (
          [[[h[p]], [q[p]]]], [[[h[p]], [q[p]]]])}},
          sources=SOURCES, unit_locations={"sources->base": ([[h, q]], [[h, q]])})


def test_head_units_h_are_not_shifted_by_padding(model):
    iv = heads(model, "h")
    same_len = ["zyxwvutsrqp", "qwerty"]  # as long as each prompt: the head is swapped at every position
    spy = Spy()
    r = cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, seed=1, sampler=spy, eos_token_id=[],
                       sources=same_len, unit_locations={"sources->base": ([[0], [2]], [[0], [2]])})
    for p in range(2):
        with torch.no_grad():
            _, out = iv({"input_ids": ids(PROMPTS[p])}, sources=[{"input_ids": ids(same_len[p])}],
                        unit_locations={"sources->base": ([[[0, 2][p:p + 1]]], [[[0, 2][p:p + 1]]])})
        torch.testing.assert_close(spy.seen[0][2 + p], out.logits[0, -1], atol=1e-5, rtol=0)
    assert len(r.counterfactual_ids) == 2


def test_refused_forms_name_the_form_before_model_work(model):
    iv = vanilla(model)
    with pytest.raises(ValueError, match="unit_locations.*'sources->base'"):
        cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, sources=SOURCES,
                       unit_locations={"sources->base": ([[[1]], [[2]], [[3]]], [[[1]]])})
    with pytest.raises(ValueError, match="no base locations"):
        cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, sources=SOURCES, unit_locations={"sources->base": (4, None)})
    with pytest.raises(ValueError, match="unknown unit_locations key 'src'"):
        cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, unit_locations={"src": 1})
    with pytest.raises(ValueError, match=r"source_representations\[.*\] has shape \(3, 16\)"):
        cfgen.generate(addition(model), TOK, PROMPTS, max_new_tokens=1, unit_locations={"base": 1},
                       source_representations=torch.ones(3, D))
    with pytest.raises(ValueError, match="head units"):
        cfgen.generate(heads(model, "h"), TOK, PROMPTS, max_new_tokens=1, source_representations=torch.ones(4))


def test_pyvene_fast_path_left_on_by_a_pyvene_call_does_not_leak_into_cfgen(model):
    iv = vanilla(model)
    with torch.no_grad():
        iv({"input_ids": ids(PROMPTS[0])}, sources=src(0), unit_locations={"sources->base": 3})
    assert iv.use_fast  # pyvene switched its fast path on for good
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": ([[[2 + p]]], [[[1 + p]]])}},
          sources=SOURCES, unit_locations={"sources->base": ([[2], [3]], [[1], [2]])})
    assert iv.use_fast


@pytest.mark.parametrize("cls,kw", [(pv.RotatedSpaceIntervention, {}),
                                    (pv.LowRankRotatedSpaceIntervention, {"low_rank_dimension": 4}),
                                    (pv.SigmoidMaskRotatedSpaceIntervention, {}),
                                    (pv.BoundlessRotatedSpaceIntervention, {})])
def test_distributed_interventions_without_keep_last_dim_act_on_each_position(model, cls, kw):
    """Built the default way they see one unit at a time, exactly as the keep_last_dim=True build does (whose
    batch > 1 bug in pyvene 0.1.8 for Boundless / SigmoidMaskRotated cfgen works around)."""
    torch.manual_seed(4)
    default = cls(embed_dim=D, **kw)
    if hasattr(default, "intervention_boundaries"):  # Boundless starts near identity: open its boundary
        with torch.no_grad():
            default.intervention_boundaries.fill_(1.0)
            default.temperature.fill_(0.01)
    per_pos = cls(embed_dim=D, keep_last_dim=True, **kw)
    per_pos.load_state_dict(default.state_dict())
    rep = torch.linspace(-3, 3, D)
    out = []
    for iv in (default, per_pos):
        im = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": iv}, model)
        out.append(cfgen.generate(im, TOK, PROMPTS, max_new_tokens=6, seed=2, intervene_on="all",
                                  source_representations=rep, eos_token_id=[]))
    assert out[0].counterfactual_ids == out[1].counterfactual_ids
    assert not all(out[0].identical)  # the intervention does something
    im = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention": per_pos}, model)
    check(im, lambda p: {"unit_locations": {"base": [1, 2, 3]}, "source_representations": rep},
          unit_locations={"base": [1, 2, 3]}, source_representations=rep)


def test_noise_intervention_needs_its_four_positions(model):
    im = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention_type": pv.NoiseIntervention},
                              model)
    check(im, lambda p: {"unit_locations": {"base": [0, 1, 2, 4]}}, unit_locations={"base": [0, 1, 2, 4]})
    with pytest.raises(ValueError, match="exactly 4 positions"):
        cfgen.generate(im, TOK, PROMPTS, max_new_tokens=2, intervene_on="all")


def test_non_hugging_face_pyvene_models_are_refused_in_one_line():
    from pyvene.models.gru.modelings_gru import GRUConfig, GRULMHeadModel

    gru = GRULMHeadModel(GRUConfig(vocab_size=32, h_dim=16, n_layer=1))
    im = pv.IntervenableModel({"layer": 0, "component": "cell_output", "intervention_type": pv.VanillaIntervention},
                              gru)
    with pytest.raises(TypeError, match="GRULMHeadModel.*token-by-token decoding"):
        cfgen.generate(im, TOK, PROMPTS, max_new_tokens=2)


def _hidden(model, seq, layer, add=None):
    """Output of decoder layer ``layer`` for ``seq`` in a plain forward (``add`` added to layer 0's output)."""
    seen = []

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def adder(mod, args, out):
        return (out[0] + add,) + out[1:] if isinstance(out, tuple) else out + add

    handles = [model.model.layers[layer].register_forward_hook(lambda mod, args, out: seen.append(first(out)))]
    if add is not None:
        handles.append(model.model.layers[0].register_forward_hook(adder))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
    finally:
        for h in handles:
            h.remove()
    return seen[0][0]


def test_collect_intervention_returns_factual_and_counterfactual_activations():
    model = tiny_llama(init=0.5)
    reference = tiny_llama(init=0.5)  # same weights, never wrapped by pyvene (its hidden states stay intact)
    im = pv.IntervenableModel([{"layer": 0, "component": "block_output", "intervention_type": pv.AdditionIntervention},
                               {"layer": 1, "component": "block_output", "intervention_type": pv.CollectIntervention}],
                              model)
    add_key, collect_key = im.sorted_keys
    rep = torch.linspace(-1, 1, D)
    r = cfgen.generate(im, TOK, PROMPTS, max_new_tokens=5, seed=1, intervene_on="all",
                       source_representations={add_key: rep}, eos_token_id=[])
    assert set(r.collected) == {"factual", "counterfactual"}
    for p in range(len(PROMPTS)):
        for kind, ids_, add in (("factual", r.factual_ids, None), ("counterfactual", r.counterfactual_ids, rep)):
            got = r.collected[kind][p][collect_key]
            seq = r.prompt_ids[p] + ids_[p][:-1]  # the last sampled token is never fed
            assert got["positions"] == list(range(len(seq)))
            want = _hidden(reference, seq, 1, add)
            torch.testing.assert_close(got["activations"].reshape(len(seq), D), want, atol=1e-5, rtol=1e-5)


def test_collect_at_unit_locations_collects_those_prompt_positions_only():
    model = tiny_llama(init=0.5)
    reference = tiny_llama(init=0.5)
    im = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention_type": pv.CollectIntervention},
                              model)
    r = cfgen.generate(im, TOK, PROMPTS, max_new_tokens=3, seed=1, unit_locations={"base": [1, 2, 4]}, eos_token_id=[])
    key = im.sorted_keys[0]
    for kind in ("factual", "counterfactual"):
        for p in range(len(PROMPTS)):
            got = r.collected[kind][p][key]
            assert got["positions"] == [1, 2, 4]
            want = _hidden(reference, r.prompt_ids[p], 1)[[1, 2, 4]]
            torch.testing.assert_close(got["activations"].reshape(3, D), want, atol=1e-5, rtol=0)
    assert r.identical == [True, True]  # collecting changes nothing


def _left_padded(texts):
    seqs = [TOK(t)["input_ids"] for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return {"input_ids": ids, "attention_mask": mask}


def test_tokenized_sources_use_their_tensor_coordinates(model):
    iv = vanilla(model)
    enc = _left_padded(SOURCES)  # the second source is left-padded by 6: its tokens sit at 6..11
    form = ([[[8], [9]]], [[[2], [3]]])  # tensor coordinates for the source, prompt coordinates for the base
    check(iv, lambda p: {"sources": [{k: v[p:p + 1] for k, v in enc.items()}],
                         "unit_locations": {"sources->base": ([[form[0][0][p]]], [[form[1][0][p]]])}},
          sources=enc, unit_locations={"sources->base": form})
    check(iv, lambda p: {"sources": [{k: v[p:p + 1] for k, v in enc.items()}],
                         "unit_locations": {"sources->base": ([[form[0][0][p]]], [[form[1][0][p]]])}},
          sources=[enc], unit_locations={"sources->base": form})


def test_sources_one_per_intervention_group(model):
    iv = pv.IntervenableModel([{"layer": 0, "component": "block_output", "group_key": 0},
                               {"layer": 1, "component": "block_output", "group_key": 1}], model)
    other = ["mnopqrstuvwx", "lkjihg"]
    a, b = _left_padded(SOURCES), _left_padded(other)
    locs = ([[[1], [7]], [[2], [8]]], [[[3], [0]], [[4], [5]]])

    def ref(p):
        return {"sources": [{k: v[p:p + 1] for k, v in a.items()}, {k: v[p:p + 1] for k, v in b.items()}],
                "unit_locations": {"sources->base": ([[locs[0][i][p]] for i in range(2)],
                                                     [[locs[1][i][p]] for i in range(2)])}}

    check(iv, ref, sources=[a, b], unit_locations={"sources->base": locs})
    with pytest.raises(ValueError, match="3 tokenized sources for 2 intervention groups"):
        cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, sources=[a, b, a], unit_locations={"sources->base": 1})


def test_source_strings_per_intervention_group(model):
    iv = pv.IntervenableModel([{"layer": 0, "component": "block_output", "group_key": 0},
                               {"layer": 1, "component": "block_output", "group_key": 1}], model)
    other = ["mnopqrstuvwx", "lkjihg"]
    check(iv, lambda p: {"sources": [{"input_ids": ids(SOURCES[p])}, {"input_ids": ids(other[p])}],
                         "unit_locations": {"sources->base": 2}},
          sources=[SOURCES, other], unit_locations={"sources->base": 2})


def _right_padded(texts):
    seqs = [TOK(t)["input_ids"] for t in texts]
    width = max(map(len, seqs))
    return {"input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])}


@pytest.mark.parametrize("padding", ["left", "right"])
def test_tokenized_prompts_use_their_tensor_coordinates(model, padding):
    iv = vanilla(model)
    enc = (_left_padded if padding == "left" else _right_padded)(PROMPTS)
    base = [[6], [7]] if padding == "left" else [[6], [2]]  # real tokens of row 1: 5..10 (left) or 0..5 (right)
    form = ([[[1], [3]]], [base])
    spy = Spy()
    r = cfgen.generate(iv, TOK, enc, max_new_tokens=3, seed=5, sampler=spy, eos_token_id=[], sources=SOURCES,
                       unit_locations={"sources->base": form})
    assert r.prompt_ids == [TOK(p)["input_ids"] for p in PROMPTS]
    for p in range(2):
        m = enc["attention_mask"][p:p + 1]
        row = {"input_ids": enc["input_ids"][p:p + 1], "attention_mask": m, "position_ids": (m.cumsum(1) - 1).clamp(min=0)}
        with torch.no_grad():
            _, out = iv(row, sources=src(p), unit_locations={"sources->base": ([[form[0][0][p]]], [[base[p]]])})
        last = int(m[0].nonzero().max())
        ref = out.logits[0, last]
        torch.testing.assert_close(spy.seen[0][2 + p], ref, atol=1e-5, rtol=0)
        noise = cfgen.gumbel_noise(5, 0, ref.shape[-1])[0]
        assert r.counterfactual_ids[p][0] == int((torch.log_softmax(ref, -1) + noise).argmax())


def test_left_padded_tokenized_prompts_give_the_string_prompts_tokens(model):
    iv = addition(model)
    rep = torch.linspace(-2, 2, D)
    a = cfgen.generate(iv, TOK, _left_padded(PROMPTS), max_new_tokens=6, seed=2, intervene_on="all",
                       source_representations=rep)
    b = cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=6, seed=2, intervene_on="all", source_representations=rep)
    assert (a.factual_ids, a.counterfactual_ids) == (b.factual_ids, b.counterfactual_ids)
    c = cfgen.generate(iv, TOK, _right_padded(PROMPTS), max_new_tokens=6, seed=2, intervene_on="all",
                       source_representations=rep, temperature=1e-3)
    d = cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=6, seed=2, intervene_on="all", source_representations=rep,
                       temperature=1e-3)
    assert (c.factual_ids, c.counterfactual_ids) == (d.factual_ids, d.counterfactual_ids)


def test_hindsight_accepts_tokenized_prompts(model):
    iv = addition(model)
    rep = torch.zeros(D)  # identity: the observed text comes back
    r = cfgen.counterfactual(iv, TOK, _right_padded(PROMPTS), [[5, 6, 7], [8, 9]], num_samples=2, seed=1,
                             intervene_on="all", source_representations=rep)
    assert r.counterfactual_ids == r.factual_ids
    assert r.prompt_ids == [TOK(p)["input_ids"] for p in PROMPTS]


def test_serial_mode_chains_sources_as_pyvene_does(model):
    # both at layer 0: source_1's patched value at b is what reaches the base (and its last position)
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output", "group_key": 0},
                                 {"layer": 0, "component": "block_output", "group_key": 1}],
                                intervention_types=pv.VanillaIntervention, mode="serial")
    iv = pv.IntervenableModel(cfg, model)
    other = ["mnopqrstuvwx", "lkjihg"]
    a, b = [[2], [5]], [[4], [1]]  # source_0 -> source_1 at (a -> b); source_1 -> base at (b -> base)
    base = [[6], [3]]

    def ref(p):
        return {"sources": [{"input_ids": ids(SOURCES[p])}, {"input_ids": ids(other[p])}],
                "unit_locations": {"source_0->source_1": ([[a[p]]], [[b[p]]]),
                                   "source_1->base": ([[b[p]]], [[base[p]]])}}

    r = check(iv, ref, sources=[SOURCES, other],
              unit_locations={"source_0->source_1": ([a], [b]), "source_1->base": ([b], [base])})
    assert not torch.allclose(r.step0_logits, r.step0_factual, atol=1e-3)  # the chain reaches the base
    with pytest.raises(ValueError, match="source_0->source_1"):
        cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=1, sources=[SOURCES, other],
                       unit_locations={"sources->base": 1})


def test_no_deprecation_warning_or_import_chatter_reaches_the_user():
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import warnings; warnings.simplefilter('always')\n"
        "import cfgen.engine; pv = cfgen.engine.import_pyvene()\n"
        "import torch, cfgen\n"
        "from conftest import tiny_llama, tiny_gpt2, CharTokenizer\n"
        "for make in (tiny_llama, tiny_gpt2):\n"
        "    m = make()\n"
        "    iv = pv.IntervenableModel({'layer': 0, 'component': 'block_output',"
        " 'intervention_type': pv.AdditionIntervention}, m)\n"
        "    cfgen.generate(iv, CharTokenizer(), ['abc', 'hello'], max_new_tokens=3, source_representations=torch.ones(16))\n"
        "    cfgen.counterfactual(iv, CharTokenizer(), 'abc', [[5, 6]], source_representations=torch.ones(16))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr.lower() and "deprecated" not in out.stdout.lower(), out.stderr
    assert "nnsight" not in out.stdout, out.stdout


@pytest.mark.parametrize("subspaces", [1, [1], [[[1], [1]]], [[[1]]]])
def test_subspaces_broadcast_as_in_pyvene(model, subspaces):
    iv = pv.IntervenableModel({"layer": 0, "component": "block_output", "intervention": pv.VanillaIntervention(
        embed_dim=D, subspace_partition=[[0, 8], [8, 16]])}, model)
    check(iv, lambda p: {"sources": src(p), "unit_locations": {"sources->base": 3}, "subspaces": [[[1]]]},
          sources=SOURCES, unit_locations={"sources->base": 3}, subspaces=subspaces)


def test_hindsight_and_do_refuse_a_bad_form_before_any_model_work(model, monkeypatch):
    import cfgen.tokens

    def no_model_work(*a, **k):
        raise AssertionError("model work before the arguments were checked")

    monkeypatch.setattr(cfgen.engine, "teacher_forced_logits", no_model_work)
    iv = vanilla(model)
    with pytest.raises(ValueError, match="unknown unit_locations key"):
        cfgen.counterfactual(iv, TOK, PROMPTS, [[5, 6], [7]], sources=SOURCES, unit_locations={"src": 1})
    fake = cfgen.CounterfactualResult(
        prompts=PROMPTS, prompt_ids=[TOK(p)["input_ids"] for p in PROMPTS], factual_ids=[[5, 6], [7, 8]],
        counterfactual_ids=[[5, 6], [7, 8]], seeds=[0, 0], sampler=cfgen.Sampler(), mode="hindsight",
        prompt_index=[0, 1], sample_index=[0, 0], tokenizer=TOK)
    with pytest.raises(ValueError, match="no base locations"):
        cfgen.tokens.do(iv, TOK, fake, {1: 9}, sources=SOURCES, unit_locations={"sources->base": (2, None)})


@pytest.mark.parametrize("form", [[3, 1], [0, 2, 4], 2, (None, 4)])
def test_base_only_forms_mean_what_pyvene_means(model, form):
    # pyvene reads {"base": [s, b]} as source s -> base b like "sources->base": only base position b is touched
    iv = addition(model)
    rep = torch.linspace(-2, 2, D)
    check(iv, lambda p: {"unit_locations": {"base": form}, "source_representations": rep},
          unit_locations={"base": form}, source_representations=rep)


def test_base_positions_in_pyvene_nesting_apply_to_every_prompt(model):
    iv = addition(model)
    rep = torch.linspace(-2, 2, D)
    check(iv, lambda p: {"unit_locations": {"base": [[[3, 5]]]}, "source_representations": rep},
          unit_locations={"base": [[[3, 5]]]}, source_representations=rep)


def test_interventions_confined_to_the_prompt_do_not_run_at_generated_steps(model):
    iv = addition(model)
    calls = []
    inner = iv.interventions[iv.sorted_keys[0]]
    inner.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=6, seed=0, unit_locations={"base": [[[1, 2]]]},
                   source_representations=torch.ones(D), eos_token_id=[])
    assert len(calls) == 1  # the prefill only; the KV cache carries the intervened prompt
    calls.clear()
    cfgen.generate(iv, TOK, PROMPTS, max_new_tokens=6, seed=0, intervene_on="generation",
                   source_representations=torch.ones(D), eos_token_id=[])
    assert len(calls) == 6  # a schedule over generated tokens runs at every step
