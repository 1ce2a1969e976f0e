"""cfgen.catalogue (ready-made interventions inside the package), the demo's helpers and its HTML report."""

import configparser
import fnmatch
import json
import re
from pathlib import Path

import pytest
import pyvene as pv
import torch

import cfgen
from cfgen import catalogue, demo
from cfgen.results import CounterfactualResult

from .conftest import tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ["patch_landmark_city", "ravel_country_das", "ravel_country_mdas", "steering_dark"]


# ------------------------------------------------------------- catalogue --
def test_names_are_the_saved_folders_inside_the_package():
    assert catalogue.names() == ENTRIES
    assert catalogue.ROOT == Path(cfgen.__file__).resolve().parent / "catalogue_data"
    for name in ENTRIES:
        folder = catalogue.path(name)
        manifest = json.loads((folder / "cfgen_intervention.json").read_text())
        # every tensor file the manifest names is there, and nothing else is shipped beside it
        files = {e["state_file"] for e in manifest["interventions"]} | {"cfgen_intervention.json"}
        extra = {"example.json"} if name == "patch_landmark_city" else set()
        assert {p.name for p in folder.iterdir()} == files | extra, name


def test_cfgen_exposes_the_catalogue_lazily():
    assert cfgen.catalogue is catalogue
    assert "catalogue" in dir(cfgen)


@pytest.mark.parametrize("bad", ["steering", "interventions/steering_dark/intervention", "data", ""])
def test_unknown_name_is_named_with_the_catalogue_listed(bad):
    with pytest.raises(catalogue.UnknownEntry) as err:
        catalogue.path(bad)
    assert repr(bad) in str(err.value) and all(n in str(err.value) for n in ENTRIES)
    assert isinstance(err.value, KeyError) and isinstance(err.value, FileNotFoundError)


def test_path_refuses_non_strings():
    with pytest.raises(TypeError, match="catalogue name is a string"):
        catalogue.path(Path("steering_dark"))


def test_resolve_prefers_a_saved_folder_then_a_name(tmp_path, monkeypatch):
    saved = tmp_path / "mine"
    saved.mkdir()
    (saved / "cfgen_intervention.json").write_text("{}")
    assert catalogue.resolve(str(saved)) == saved and catalogue.resolve(saved) == saved
    assert catalogue.resolve("steering_dark") == catalogue.path("steering_dark")
    # a folder of the same name without a manifest (e.g. the repository's interventions/steering_dark) does not
    # shadow the catalogue entry
    monkeypatch.chdir(tmp_path)
    (tmp_path / "steering_dark").mkdir()
    assert catalogue.resolve("steering_dark") == catalogue.path("steering_dark")
    (tmp_path / "steering_dark" / "cfgen_intervention.json").write_text("{}")
    assert catalogue.resolve("steering_dark") == Path("steering_dark")
    # another existing folder is returned as given: loading it says what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert catalogue.resolve(empty) == empty
    with pytest.raises(FileNotFoundError, match="not a folder written by"):
        cfgen.load(catalogue.resolve(empty), tiny_gpt2())
    with pytest.raises(catalogue.UnknownEntry, match="no intervention 'nope': .*steering_dark"):
        catalogue.resolve("nope")


def test_example_of_the_patch_and_none_for_the_steering_vector():
    ex = catalogue.example("patch_landmark_city")
    assert set(ex) == {"prompt", "source", "layer", "unit_locations"}
    manifest = json.loads((catalogue.path("patch_landmark_city") / "cfgen_intervention.json").read_text())
    assert ex["layer"] == manifest["interventions"][0]["representation"]["layer"]
    with pytest.raises(FileNotFoundError, match="steering_dark.*no example.json"):
        catalogue.example("steering_dark")


def test_ravel_data_ships_with_its_licence():
    folder = catalogue.data_path("ravel_city")
    assert (folder / "LICENSE").read_text().startswith("MIT License")
    attrs = json.loads((folder / "ravel_city_entity_attributes.json").read_text())
    split = json.loads((folder / "ravel_city_entity_to_split.json").read_text())
    assert len(attrs) == 150 and set(split) == set(attrs)
    with pytest.raises(catalogue.UnknownEntry, match="'ravel'.*ravel_city"):
        catalogue.data_path("ravel")


def test_package_data_globs_cover_every_catalogue_file():
    # setuptools matches these globs relative to the package folder; the wheel test checks a real build
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["cfgen"].splitlines() if p.strip()]
    package = ROOT / "cfgen"
    files = [p.relative_to(package).as_posix() for p in (package / "catalogue_data").rglob("*") if p.is_file()]
    assert files
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                                             for pat in patterns)]
    assert not uncovered, uncovered


def test_no_reference_to_the_old_catalogue_layout():
    old = re.compile(r"interventions/\w+/(intervention|das|mdas|data)\b|\"interventions\" */")
    hits = []
    for folder in ("cfgen", "tests", "docs", "bench", "interventions"):
        for p in (ROOT / folder).rglob("*"):
            if p.suffix in {".py", ".md", ".cfg", ".toml", ".ipynb"} and "_build" not in p.parts:
                hits += [f"{p.relative_to(ROOT)}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
                         if old.search(line) and p.name != "test_catalogue.py"]
    for p in (ROOT / "README.md", ROOT / "Makefile"):
        hits += [f"{p.name}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1) if old.search(line)]
    assert not hits, hits


def test_readme_snippet_uses_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## In a notebook\s+```python\n(.*?)```", readme, re.S).group(1)
    assert 'cfgen.catalogue.load("steering_dark", model)' in snippet


# ------------------------------------------------------------------ CLI --
def test_cli_answers_an_unknown_intervention_in_one_line_before_loading_a_model(capsys):
    from cfgen.cli import _load_intervention, main

    with pytest.raises(SystemExit) as err:
        _load_intervention("no_such_entry", model=None)  # no model needed to refuse it
    msg = str(err.value.code)
    assert "\n" not in msg and "'no_such_entry'" in msg and all(n in msg for n in ENTRIES)
    assert "build.py" not in msg
    with pytest.raises(SystemExit) as err:
        main(["demo", "--intervention", "/no/such/folder"])
    msg = str(err.value.code)
    assert "\n" not in msg and "/no/such/folder" in msg and "steering_dark" in msg


def test_demo_flags_default_to_the_catalogue_and_the_swept_scale():
    from cfgen.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.intervention == "steering_dark" and args.steering_scale == demo.STEERING_SCALE
    assert args.temperature == demo.TEMPERATURE


# ------------------------------------------------------------------ demo --
def test_demo_scale_is_the_one_its_sweep_chose():
    text = (ROOT / "interventions" / "steering_dark" / "scale_sweep.md").read_text()
    chosen = float(re.search(r"^Chosen: ([0-9.]+)$", text, re.M).group(1))
    assert demo.STEERING_SCALE == chosen
    readme = (ROOT / "interventions" / "steering_dark" / "README.md").read_text()
    assert text.split("\n\n")[1] in readme  # the sweep's table is in the entry's README


def test_scale_steering_multiplies_the_vector_and_refuses_other_interventions():
    model = tiny_gpt2()
    vec = torch.linspace(-1, 1, 16)
    steer = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                  "intervention": pv.AdditionIntervention(embed_dim=16, source_representation=vec)},
                                 model)
    assert demo.scale_steering(steer, 0.25) is steer
    got = next(iter(steer.interventions.values())).source_representation
    assert torch.equal(got, vec * 0.25) and torch.equal(vec, torch.linspace(-1, 1, 16))  # the caller's is untouched
    patch = pv.IntervenableModel({"layer": 1, "component": "block_output",
                                  "intervention_type": pv.VanillaIntervention}, model)
    with pytest.raises(ValueError, match="constant source_representation"):
        demo.scale_steering(patch, 2.0)
    with pytest.raises(TypeError, match="scale must be a number"):
        demo.scale_steering(steer, "2")


class WordTokenizer:
    """ids -> fixed strings, some of them markup, to test marking and escaping."""

    words = {0: " The", 1: " city", 2: " Paris", 3: " Rome", 4: "<script>alert(1)</script>", 5: " &", 6: "\n",
             7: " é", 8: " <b>bold</b>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.words[i] for i in ids)


def test_marked_spans_and_changed_share():
    tok = WordTokenizer()
    # the shared prefix is kept whatever its length; a later match counts from min_run tokens on
    assert demo.marked_spans(tok, [0, 1, 2, 6], [0, 1, 3, 6]) == [(" The city", False), (" Rome\n", True)]
    assert demo.marked_spans(tok, [0, 1, 2, 6], [0, 1, 3, 6], min_run=1) == [
        (" The city", False), (" Rome", True), ("\n", False)]
    assert demo.marked_spans(tok, [2, 5, 7, 8], [3, 5, 7, 8]) == [(" Rome", True), (" & é <b>bold</b>", False)]
    assert demo.marked_spans(tok, [0, 1], [0, 1]) == [(" The city", False)]
    assert demo.marked_spans(tok, [0], [3, 7]) == [(" Rome é", True)]
    assert demo.marked_spans(tok, [0], []) == []
    for ref, ids in (([2, 5, 7], [5, 3, 7, 4]), ([0, 1, 2, 3], [3, 0, 1, 2, 6])):
        assert "".join(t for t, _ in demo.marked_spans(tok, ref, ids)) == tok.decode(ids)
    assert demo.changed_share([0, 1, 2, 6], [0, 1, 3, 6]) == 0.5
    assert demo.changed_share([0, 1, 2, 6], [0, 1, 3, 6], min_run=1) == 0.25
    assert demo.changed_share([0, 1, 2, 3], [3, 0, 1, 2, 6]) == 0.4  # the run 0 1 2 is shared, 3 and 6 are not
    assert demo.changed_share([0, 1], [0, 1]) == 0.0 and demo.changed_share([0], [2, 3]) == 1.0
    assert demo.changed_share([], []) == 0.0 and demo.changed_share([1], []) == 1.0


def _section(mode="prior"):
    res = CounterfactualResult(
        prompts=["<script>alert('prompt')</script>"], prompt_ids=[[0]],
        factual_ids=[[0, 1, 2, 4], [0, 8]], counterfactual_ids=[[0, 1, 3, 4], [0, 8]], seeds=[3, 4],
        sampler=cfgen.Sampler(temperature=0.7), mode=mode, interventional_ids=[[5, 8], [7]],
        prompt_index=[0, 0], sample_index=[0, 1], tokenizer=WordTokenizer())
    return demo.Section("patch", "1. <i>title</i>", "about <script>x</script> & more", "<prompt>", res)


def test_report_escapes_every_model_text():
    page = demo.report_html([_section(), _section("hindsight")], WordTokenizer(), title="<demo>")
    assert "<script" not in page.lower() and "<b>bold" not in page and "<i>title" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;prompt&gt;" in page and "&lt;demo&gt;" in page and " &amp;" in page
    # the changed token is marked, the shared ones are not; the interventional row is there
    assert "<mark> Rome&lt;script&gt;" in page and "<mark> Paris" not in page and "<mark> The" not in page
    assert page.count("interventional (fresh noise)") == 4 and page.count("observed (no intervention)") == 2
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_terminal_section_shows_three_texts_with_marks():
    text = demo.format_section(_section(), WordTokenizer())
    lines = text.splitlines()
    assert lines[0] == "== 1. <i>title</i>"
    cf = next(line for line in lines if "counterfactual (same noise)" in line)
    assert "⟦ Rome<script>alert(1)</script>⟧" in cf and "⟦" not in next(line for line in lines if "factual (no intervention)" in line)
    assert sum("interventional (fresh noise)" in line for line in lines) == 2
    assert "counterfactual 25%, interventional 100%" in lines[-1]  # (2/4 + 0/2) / 2 and both fully changed


@pytest.mark.parametrize("kw,match", [({"max_new_tokens": 0}, "max_new_tokens"), ({"num_samples": 1.5}, "num_samples"),
                                      ({"steering": "nope"}, "no intervention 'nope'")])
def test_demo_refuses_bad_arguments_before_loading_a_model(kw, match):
    with pytest.raises((ValueError, catalogue.UnknownEntry), match=match):
        demo.run(out=None, echo=lambda s: pytest.fail("printed before refusing"), **kw)
