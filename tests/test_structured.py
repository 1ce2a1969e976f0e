"""Structured record generation and do(field = value) (cfgen.structured) on tiny random models."""

import pytest
import pyvene as pv
import torch

import cfgen
import cfgen.engine
import cfgen.structured as cs
from cfgen.api import INTERVENTIONAL
from cfgen.noise import PRIOR

from .conftest import tiny_gpt2, tiny_llama


class LineTokenizer:
    """Greedy longest-match over a small piece vocabulary; several pieces end a line."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pieces = ["\n", " ", ":", "x\n", "y\n", ".\n", "!\n"] + list("abcdefghijklmnopqrstuvwxyz") + list("0123")

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            best = max((p for p in self.pieces if text.startswith(p, i)), key=len)
            ids.append(3 + self.pieces.index(best))
            i += len(best)
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i - 3] if i >= 3 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


TOK = LineTokenizer()
V = 3 + len(LineTokenizer.pieces)  # 39
SCHEMA = cs.Schema(["sex", "race", "age", "job"], max_value_tokens=5,
                   parsers={"age": cs.parse_number, "sex": cs.choice({"m": ["male"], "f": ["female"]})})
PROMPTS = ["a record", "the census data of one person"]  # different lengths: a padded batch


def make(kind="gpt2"):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind](vocab_size=V, init=0.3)


def reference(model, context, schema, seed, sampler, *, start=0, stream=PRIOR, eos=(2,)):
    """No cache: recompute everything per token. Returns the value token lists of fields start.."""
    seq, labels, values = list(context), [TOK(lb)["input_ids"] for lb in schema.labels], []
    m = schema.max_value_tokens
    nl = TOK("\n")["input_ids"]
    for i in range(start, len(schema.fields)):
        seq += labels[i]
        val = []
        for j in range(m):
            logits = model(torch.tensor([seq])).logits[0, -1]
            tok = int(sampler.sample(logits, cfgen.gumbel_noise(seed, i * m + j, V, stream=stream)[0]))
            if tok in eos:
                seq += nl
                break
            val.append(tok)
            seq.append(tok)
            if "\n" in TOK.decode([tok]):
                break
            if j == m - 1:
                seq += nl
        values.append(val)
    return values


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_records_equal_the_uncached_reference(kind):
    model = make(kind)
    sampler = cfgen.Sampler(temperature=0.9)
    recs = cs.generate_records(model, TOK, PROMPTS, SCHEMA, n=3, seed=10, sampler=sampler)
    assert len(recs) == 6 and recs.seeds == list(range(10, 16))
    shared = cs.generate_records(model, TOK, PROMPTS[1], SCHEMA, n=3, seed=20, sampler=sampler)  # one shared prompt
    finishes = set()
    with torch.no_grad():
        for rs in (recs, shared):
            for r in range(len(rs)):
                assert rs.value_ids[r] == reference(model, rs.prompts[r], SCHEMA, rs.seeds[r], sampler)
                finishes |= set(rs.finish[r])
    assert {"newline", "length"} <= finishes  # both ways a value ends are exercised


def test_forced_labels_are_never_sampled(monkeypatch):
    model = make("llama")
    steps = []
    real = cfgen.engine.gumbel_noise  # the engine's decode loop draws every row's noise

    def spy(seeds, step, vocab, **kw):
        steps.extend(zip(seeds.tolist(), torch.as_tensor(step).expand(len(seeds)).tolist()))
        return real(seeds, step, vocab, **kw)

    monkeypatch.setattr(cfgen.engine, "gumbel_noise", spy)
    recs = cs.generate_records(model, TOK, "a record", SCHEMA, n=4, seed=0)
    m = SCHEMA.max_value_tokens
    for r in range(len(recs)):
        ids, mask = recs.ids(r), recs.sampled_mask(r)
        # every label sits verbatim where the schema puts it, and is marked as forced
        at = 0
        for i, lb in enumerate(recs.label_ids):
            assert ids[at:at + len(lb)] == lb and not any(mask[at:at + len(lb)])
            at += len(lb) + len(recs.value_ids[r][i]) + len(recs.filler_ids[r][i])
        assert at == len(ids)
        # noise was drawn exactly once per sampled token (plus one per EOS), at step i * m + j
        drawn = sorted(s for seed, s in steps if seed == recs.seeds[r])
        expected = sorted(i * m + j for i in range(4)
                          for j in range(len(recs.value_ids[r][i]) + (recs.finish[r][i] == "eos")))
        assert drawn == expected
        assert sum(mask) == sum(len(v) for v in recs.value_ids[r])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_do_field_keeps_earlier_fields_sets_one_and_regenerates_with_the_same_noise(kind):
    model = make(kind)
    sampler = cfgen.Sampler(temperature=0.9)
    recs = cs.generate_records(model, TOK, PROMPTS, SCHEMA, n=2, seed=3, sampler=sampler)
    # setting a field to its own tokens reproduces every record exactly (same noise, same steps)
    same = cs.do_field(model, TOK, recs, "race", [recs.value_ids[r][1] for r in range(len(recs))])
    assert same.counterfactual.value_ids == recs.value_ids
    assert same.counterfactual.texts == recs.texts
    cf = cs.do_field(model, TOK, recs, "race", "zzz", interventional=True)
    assert [v["race"] for v in cf.counterfactual.values] == ["zzz"] * 4
    changed = 0
    with torch.no_grad():
        for r in range(len(recs)):
            assert cf.counterfactual.value_ids[r][0] == recs.value_ids[r][0]  # earlier field untouched
            assert cf.counterfactual.finish[r][1] == "set"
            context = list(recs.prompts[r]) + recs.label_ids[0] + recs.value_ids[r][0] + recs.filler_ids[r][0]
            context += recs.label_ids[1] + TOK(" zzz\n")["input_ids"]
            assert cf.counterfactual.value_ids[r][2:] == reference(model, context, SCHEMA, recs.seeds[r], sampler,
                                                                   start=2)
            assert cf.interventional.value_ids[r][2:] == reference(model, context, SCHEMA, recs.seeds[r], sampler,
                                                                   start=2, stream=INTERVENTIONAL)
            changed += cf.counterfactual.value_ids[r][2:] != recs.value_ids[r][2:]
    assert changed >= 1
    assert len(cf.changes("age")) == 4 and len(cf.changes("age", interventional=True)) == 4
    # a value per row, and a function of the row's values
    fn = cs.do_field(model, TOK, recs, "sex", lambda row: "f" if row["sex"] != "f" else "m", rows=[0, 1])
    assert len(fn.counterfactual) == 2
    assert [v["sex"] for v in fn.counterfactual.values] == ["f" if v["sex"] != "f" else "m"
                                                            for v in recs.values[:2]]
    last = cs.do_field(model, TOK, recs, "job", "x")  # the last field: nothing to regenerate
    assert [v["job"] for v in last.counterfactual.values] == ["x"] * 4
    assert [v[:3] for v in last.counterfactual.value_ids] == [v[:3] for v in recs.value_ids]


def test_parsing_and_unparseable_counts():
    assert cs.parse_number("$45,000 a year") == 45000.0
    assert cs.parse_number("52k") == 52000.0 and cs.parse_number("age 34.5") == 34.5
    with pytest.raises(ValueError, match="no number"):
        cs.parse_number("unknown")
    pick = cs.choice({"White": ["caucasian"], "Black": ["african american"]})
    assert pick("African American") == "Black" and pick(" caucasian, male") == "White" and pick("other") is None
    ids = lambda s: TOK(s)["input_ids"]  # noqa: E731
    recs = cs.Records(schema=SCHEMA, prompts=[[3], [3]], seeds=[0, 1], sampler=cfgen.Sampler(),
                      label_ids=[ids(lb) for lb in SCHEMA.labels],
                      value_ids=[[ids(" male\n"), ids(" abc\n"), ids(" 31\n"), ids(" cook")],
                                 [ids(" what\n"), ids("\n"), ids(" old\n"), ids(" x\n")]],
                      filler_ids=[[[], [], [], ids("\n")], [[], [], [], []]],
                      finish=[["newline"] * 3 + ["length"], ["newline"] * 4], tokenizer=TOK)
    assert recs.values[0] == {"sex": "male", "race": "abc", "age": "31", "job": "cook"}
    assert recs.values[1]["race"] is None and recs.values[1]["job"] == "x"
    assert recs.parsed()[0]["age"] == 31.0 and recs.parsed()[0]["sex"] == "m"
    assert recs.unparseable() == {"sex": 1, "race": 1, "age": 1, "job": 0}
    assert recs.texts[0] == "sex: male\nrace: abc\nage: 31\njob: cook\n"
    assert recs.to_records()[1]["parsed"]["age"] is None


def test_bad_input_errors():
    model = make("gpt2")
    with pytest.raises(ValueError, match="unique"):
        cs.Schema(["a", "a"])
    with pytest.raises(ValueError, match="one label per field"):
        cs.Schema(["a", "b"], labels=["a:"])
    with pytest.raises(ValueError, match="unknown fields"):
        cs.Schema(["a"], parsers={"b": cs.parse_number})
    recs = cs.generate_records(model, TOK, "a record", SCHEMA, n=2)
    with pytest.raises(KeyError, match="unknown field 'income'"):
        cs.do_field(model, TOK, recs, "income", "3")
    with pytest.raises(ValueError, match="one per row"):
        cs.do_field(model, TOK, recs, "sex", ["m", "f", "m"])
    with pytest.raises(IndexError, match="out of range"):
        cs.do_field(model, TOK, recs, "sex", "m", rows=[5])
    zero = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=16, source_representation=torch.zeros(16))}, model)
    with pytest.raises(TypeError, match="plain Hugging Face"):
        cs.generate_records(zero, TOK, "a record", SCHEMA)
