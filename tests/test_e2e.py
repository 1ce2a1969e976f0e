"""End to end on the embedded SmolLM2-135M-Instruct, and save / load in a fresh process."""

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pyvene as pv
import torch

import cfgen

from .conftest import CharTokenizer, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
STEERING = cfgen.catalogue.path("steering_dark")
PROMPTS = ["Once upon a time, in a quiet harbour town,", "The robot looked at the stars and"]


@pytest.fixture(scope="module")
def embedded():
    return cfgen.load_default_model()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [cfgen.Sampler(temperature=0.8), cfgen.Sampler(temperature=0.7, top_p=0.9)],
                         ids=lambda s: s.describe())
def test_identity_on_the_embedded_model(embedded, sampler):
    model, tok = embedded
    zero = pv.IntervenableModel({"layer": 9, "component": "block_output",
                                 "intervention": pv.AdditionIntervention(embed_dim=576,
                                                                         source_representation=torch.zeros(576))},
                                model)
    r = cfgen.generate(zero, tok, PROMPTS, max_new_tokens=16, sampler=sampler, seed=3)
    assert all(r.identical), r
    h = cfgen.counterfactual(zero, tok, PROMPTS, r.factual_ids, sampler=sampler, seed=9, num_samples=2)
    assert h.counterfactual_ids == [r.factual_ids[p] for p in h.prompt_index]


@pytest.mark.slow
def test_shipped_steering_vector_loads_and_steers(embedded):
    model, tok = embedded
    steer = cfgen.load(STEERING, model)
    key = next(iter(steer.interventions))
    vector = steer.interventions[key].source_representation.clone()
    direct = pv.IntervenableModel({"layer": 9, "component": "block_output",
                                   "intervention": pv.AdditionIntervention(embed_dim=576,
                                                                           source_representation=vector)}, model)
    a = cfgen.generate(steer, tok, PROMPTS, max_new_tokens=12, seed=1, temperature=0.8)
    b = cfgen.generate(direct, tok, PROMPTS, max_new_tokens=12, seed=1, temperature=0.8)
    assert a.counterfactual_ids == b.counterfactual_ids and a.factual_ids == b.factual_ids
    assert not all(a.identical)


@pytest.mark.slow
def test_cli_run_writes_records(tmp_path):
    from cfgen.cli import main

    out = tmp_path / "r.jsonl"
    rc = main(["run", "--intervention", str(STEERING), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
               "--max-new-tokens", "6", "--seed", "2", "--temperature", "0.8", "--out", str(out), "--quiet"])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(r["seed"] == 2 and r["sampler"]["temperature"] == 0.8 for r in records)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from cfgen.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--intervention", str(tmp_path / "missing"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no intervention" in err and "Traceback" not in err


def test_save_load_round_trip_with_sampling_site_in_fresh_process(tmp_path):
    model = tiny_gpt2(init=0.3)
    cfg = pv.IntervenableConfig([
        {"layer": 1, "component": "block_output",
         "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=torch.linspace(-2, 2, 16))},
        cfgen.sampling_site(cfgen.Sampler(temperature=0.7, top_k=6), seed=13),
    ])
    pvm = pv.IntervenableModel(cfg, model)
    tok = CharTokenizer()
    before = cfgen.generate(pvm, tok, ["hello", "hi there"], max_new_tokens=8, eos_token_id=[])
    model.save_pretrained(tmp_path / "model")
    cfgen.save(pvm, tmp_path / "iv")
    script = f"""
import sys, json, torch, transformers
sys.path.insert(0, {str(ROOT)!r})
import cfgen
from tests.conftest import CharTokenizer
model = transformers.GPT2LMHeadModel.from_pretrained({str(tmp_path / 'model')!r}).eval()
pvm = cfgen.load({str(tmp_path / 'iv')!r}, model)
r = cfgen.generate(pvm, CharTokenizer(), ["hello", "hi there"], max_new_tokens=8, eos_token_id=[])
print(json.dumps([r.factual_ids, r.counterfactual_ids, r.seeds, r.sampler.to_dict()]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    fact, cf, seeds, sampler = json.loads(out.stdout.strip().splitlines()[-1])
    assert (fact, cf, seeds) == (before.factual_ids, before.counterfactual_ids, before.seeds)
    assert sampler == {"temperature": 0.7, "top_k": 6, "top_p": None}


@pytest.mark.slow
def test_demo_sections_on_the_embedded_model(embedded, tmp_path):
    from cfgen import catalogue, demo

    model, tok = embedded
    printed = []
    sections = demo.run(model=model, tokenizer=tok, seed=3, max_new_tokens=6, num_samples=2, out=tmp_path / "r.html",
                        echo=printed.append)
    assert [s.name for s in sections] == ["patch", "steering", "hindsight"]
    for s in sections:
        assert len(s.result.interventional_ids) == len(s.result) == 2
        assert s.result.seeds == [3, 4]
    # hindsight: the factual row is the observed sentence itself, token for token
    observed = tok(demo.OBSERVED, add_special_tokens=False)["input_ids"]
    assert sections[2].result.factual_ids == [observed, observed] and sections[2].result.mode == "hindsight"
    # the patch section is the catalogue entry with its recorded source and positions
    ex = catalogue.example("patch_landmark_city")
    again = cfgen.generate(catalogue.load("patch_landmark_city", model), tok, [ex["prompt"]], max_new_tokens=6,
                           temperature=demo.TEMPERATURE, seed=3, num_samples=2, sources=[ex["source"]],
                           unit_locations={"sources->base": tuple(ex["unit_locations"]["sources->base"])})
    assert again.counterfactual_ids == sections[0].result.counterfactual_ids
    # the steering section adds STEERING_SCALE x the saved vector
    vector = next(iter(cfgen.load(STEERING, model).interventions.values())).source_representation
    direct = pv.IntervenableModel({"layer": 9, "component": "block_output",
                                   "intervention": pv.AdditionIntervention(
                                       embed_dim=576, source_representation=vector * demo.STEERING_SCALE)}, model)
    chat = demo.chat_prompt(tok, demo.STORY)
    ref = cfgen.generate(direct, tok, [chat], max_new_tokens=6, temperature=demo.TEMPERATURE, seed=3, num_samples=2)
    assert ref.counterfactual_ids == sections[1].result.counterfactual_ids
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert all(html.escape(s.title) in page for s in sections) and printed[-1].startswith("\nHTML report:")
    assert sum("interventional (fresh noise)" in chunk for chunk in printed) == 3


@pytest.mark.slow
@pytest.mark.parametrize("module", ["cfgen.catalogue", "cfgen.demo"])
def test_docstring_examples_run(embedded, module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
