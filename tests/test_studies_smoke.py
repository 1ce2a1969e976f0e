"""The three study scripts in bench/ run end to end in their tiny --smoke configuration (n = 2).

In-process (one model load per script, no interpreter start-up each); the full
studies are never run in CI.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.slow


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_study_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_edit_vs_steering_smoke(tmp_path):
    study = _script("study_edit_vs_steering")
    study.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "edit_vs_steering.csv")
    n_settings = 1 + len(study.EDITS) + len(study.STEERING_SCALES) + 2  # control + edits + steering + patch + DAS
    assert len(rows) == 2 * n_settings
    control = [r for r in rows if r["family"] == "control"]
    assert [float(r["identical"]) for r in control] == [1.0, 1.0]  # same model (prior and hindsight): texts kept
    assert {r["mode"] for r in rows} == {"prior", "hindsight"}
    for r in rows:
        assert r["n"] == "2"
        for key in ("identical", "lcp_mean", "edit_distance"):
            assert float(r[f"{key}_low"]) <= float(r[key]) <= float(r[f"{key}_high"])
        # an identical text has shared prefix 1 and edit distance 0, so these can only agree in that direction
        assert float(r["identical"]) <= float(r["lcp_mean"]) + 1e-9
    recs = [json.loads(line) for line in open(tmp_path / "edit_vs_steering_records.jsonl")]
    assert len(recs) == 2 * n_settings
    assert (tmp_path / "edit_vs_steering.png").stat().st_size > 0
    assert "paper" in (tmp_path / "edit_vs_steering.md").read_text()


def test_steering_scale_reaches_the_model():
    # pyvene adds a stored source_representation and ignores one passed at call time: the script must scale the
    # stored vector. Scale 0 changes nothing; the scales give the stored norms.
    import cfgen

    study = _script("study_edit_vs_steering")
    model, tok = cfgen.load_default_model()
    norms = {}
    for scale in (0.0, 1.0, 2.0):
        (iv,) = study.steering(model, scale).interventions.values()
        norms[scale] = float(iv.source_representation.norm())
    assert norms[0.0] == 0.0 and norms[2.0] == pytest.approx(2 * norms[1.0], rel=1e-6) and norms[1.0] > 1
    r = cfgen.generate(study.steering(model, 0.0), tok, study.PROMPTS[:2], max_new_tokens=4, seed=0)
    assert r.identical == [True, True]
    r = cfgen.generate(study.steering(model, 2.0), tok, study.PROMPTS[:2], max_new_tokens=4, seed=0)
    assert r.identical != [True, True]  # twice the shipped vector (KL ~0.6 at 1x) moves the first tokens


def test_stability_smoke(tmp_path):
    _script("study_stability").main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(tmp_path / "stability.csv")
    assert [r["sweep"] for r in rows] == ["temperature", "top_p", "top_k"]
    for r in rows:
        assert 1 <= int(r["n"]) <= 2
        gap = float(r["interventional_mean"]) - float(r["counterfactual_mean"])
        assert float(r["gap"]) == pytest.approx(gap, abs=2e-4)  # the paired mean is the difference of means
        assert r["gap_excludes_0"].startswith("too few")  # n = 2 never supports a verdict
    assert (tmp_path / "stability.png").stat().st_size > 0


def test_bias_smoke(tmp_path):
    study = _script("study_bias")
    study.main(["--smoke", "--out", str(tmp_path)])
    recs = [json.loads(line) for line in open(tmp_path / "bias_records.jsonl")]
    assert len(recs) <= 2
    for rec in recs:
        # profile 1 is odd: its sex was forced to Female before the interventions
        if rec["profile"] == 1:
            assert rec["group"] == "forced Female" and rec["sex_direction"] == "Female->Male"
        assert set(study.INTERVENTIONS) <= set(rec)
        assert rec[study.INTERVENTIONS[2]]["counterfactual"]["Sex"] == rec["factual"]["Sex"]  # placebo comes later
    rows = _rows(tmp_path / "bias.csv")
    if recs:
        assert {r["intervention"] for r in rows} == set(study.INTERVENTIONS)
        assert all(r["survives"] in ("", "yes", "no", "below placebo") or r["survives"].startswith("too few") for r in rows)
    assert (tmp_path / "bias.md").read_text().startswith("2 profiles")
