"""The ``cfgen`` command: input checks, help, and runs that survive interruption (tiny local model)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cfgen
from cfgen import cli
from cfgen.cli import main

from .test_caches import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the old lighthouse keeper", "once upon a time", "the cat sat on the mat", "hello world", "the dog ran",
           "a dark storm"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama + word-level tokenizer folder, a steering intervention saved with cfgen.save, a prompts file."""
    import pyvene as pv
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cli")
    folder = save_tiny_model(root / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    steer = pv.IntervenableModel({"layer": 1, "component": "block_output", "intervention": pv.AdditionIntervention(
        embed_dim=16, source_representation=torch.linspace(-40, 40, 16))}, model)
    cfgen.save(steer, root / "iv")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return root


def base_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(root / "model"), "--intervention", str(root / "iv"), "--prompts-file",
            str(root / "prompts.txt"), "--batch-size", "2", "--max-new-tokens", "5", "--temperature", "0.7",
            "--seed", "3", "--num-samples", "2", "--quiet", "--out", str(out), *extra]


def usage_error(capsys, argv) -> str:
    """Run main(argv), expect an argparse-style exit 2, return the one error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cfgen")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------ input checks --
@pytest.mark.parametrize(("flag", "value", "expect"), [
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--batch-size", "-1", "--batch-size must be an integer >= 1, got -1"),
    ("--batch-size", "2.5", "'2.5' is not an integer"),
    ("--seed", "-1", "--seed must be an integer between 0 and"),
    ("--seed", str(2**63), "--seed must be an integer between 0 and 9223372036854775807"),
    ("--seed", "1.7", "'1.7' is not an integer"),
    ("--seed", "twelve", "'twelve' is not an integer"),
    ("--num-samples", "0", "--num-samples must be an integer >= 1"),
    ("--max-new-tokens", "-5", "--max-new-tokens must be an integer >= 1"),
    ("--top-k", "-2", "--top-k must be an integer >= 0"),
    ("--temperature", "nan", "'nan' is not a finite number"),
    ("--unit-locations", "{bad", "is not JSON"),
    ("--unit-locations", '{"foo": 3}', 'one key, "sources->base" or "base"'),
    ("--unit-locations", '{"base": 3, "sources->base": 3}', 'one key, "sources->base" or "base"'),
    ("--unit-locations", "[1, [2]]", "mixes positions and lists of positions"),
    ("--unit-locations", "[-1]", "position -1 is negative"),
    ("--unit-locations", '"abc"', '"abc" is not a position'),
    ("--unit-locations", "[true]", "true is not a position"),
    ("--unit-locations", "null", "null is not a position"),
    ("--unit-locations", "[]", "an empty list names no position"),
    ("--unit-locations", "[[[[1]]]]", "nests 4 lists; pyvene reads at most 3"),
    ("--intervene-on", "3,x", "use prompt, generation, all, or positions"),
    ("--intervene-on", "-1", "positions must be a non-empty list of ints >= 0"),
    ("--intervene-on", "[]", "positions must be a non-empty list of ints >= 0"),
    ("--intervene-on", "sometimes", "use prompt, generation, all, or positions"),
])
def test_bad_flag_values_are_one_line_errors(capsys, flag, value, expect):
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "hi", flag, value])
    assert line.startswith(f"cfgen run: error: argument {flag}") and expect in line, line


@pytest.mark.parametrize(("value", "parsed", "for_pyvene"), [
    ("3", {"base": 3}, {"base": 3}),
    ("[3, 5]", {"base": [3, 5]}, {"base": [3, 5]}),
    ('{"base": [[3], [4]]}', {"base": [[3], [4]]}, {"base": [[3], [4]]}),
    ('{"sources->base": [2, 3]}', {"sources->base": [2, 3]}, {"sources->base": (2, 3)}),
    ('{"sources->base": [[2, 4], [3, 5]]}', {"sources->base": [[2, 4], [3, 5]]},
     {"sources->base": ([2, 4], [3, 5])}),
    ('{"sources->base": [1, 2, 3]}', {"sources->base": [1, 2, 3]}, {"sources->base": [1, 2, 3]}),
])
def test_unit_locations_json_forms(value, parsed, for_pyvene):
    args = cli.build_parser().parse_args(["run", "--intervention", "x", "--unit-locations", value])
    assert args.unit_locations == parsed
    assert cli._pyvene_locations(args.unit_locations) == for_pyvene


@pytest.mark.parametrize(("value", "parsed"), [("prompt", "prompt"), ("generation", "generation"), ("all", "all"),
                                               ("3,5,7", [3, 5, 7]), ("[3, 5, 7]", [3, 5, 7]), ("0", [0])])
def test_intervene_on_accepts_schedules_and_positions(value, parsed):
    assert cli.build_parser().parse_args(["run", "--intervention", "x", "--intervene-on", value]).intervene_on == parsed


def test_sampler_values_are_checked_before_model_work(capsys, monkeypatch):
    monkeypatch.setattr(cfgen.models, "load_default_model", lambda **kw: pytest.fail("the model was loaded"))
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "hi", "--top-p", "1.5"])
    assert "--top-p must be in (0, 1]" in line
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "hi", "--seed", str(2**63 - 1),
                                "--num-samples", "3"])
    assert "seeds must be below 2**63" in line


def test_missing_model_and_files_are_named_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cfgen.models, "load_default_model", lambda **kw: pytest.fail("the model was loaded"))
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "hi", "--model", str(tmp_path / "nope")])
    assert line == f"cfgen run: error: --model {tmp_path / 'nope'}: no such folder"
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "hi", "--model", str(tmp_path)])
    assert "not a Hugging Face model folder (it has no config.json)" in line
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompts-file", str(tmp_path / "p.txt")])
    assert f"--prompts-file {tmp_path / 'p.txt'}: cannot read it" in line
    line = usage_error(capsys, ["run", "--intervention", "x"])
    assert "give --prompt TEXT" in line
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "a", "--prompt", "b", "--prompt", "c",
                                "--observed", "x", "--observed", "y"])
    assert "2 --observed for 3 prompts" in line


def test_output_path_is_checked_before_model_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cfgen.models, "load_default_model", lambda **kw: pytest.fail("the model was loaded"))
    run = ["run", "--intervention", "steering_dark", "--prompt", "hi", "--out"]
    assert f"the folder {tmp_path / 'no'} does not exist" in usage_error(capsys, run + [str(tmp_path / "no" / "r")])
    assert "is a folder; give a file name" in usage_error(capsys, run + [str(tmp_path)])
    existing = tmp_path / "r.jsonl"
    existing.write_text("precious\n")
    line = usage_error(capsys, run + [str(existing)])
    assert "already exists; pass --resume to continue it or --overwrite to replace it" in line
    assert existing.read_text() == "precious\n"
    assert "is not a record of cfgen run" in usage_error(capsys, run + [str(existing), "--resume"])
    assert "--resume continues an --out FILE" in usage_error(capsys, ["run", "--intervention", "steering_dark",
                                                                      "--prompt", "hi", "--resume"])
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "is not writable" in usage_error(capsys, run + [str(locked / "r.jsonl")])


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cfgen {cfgen.__version__}"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "run" in a.choices).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"cfgen {name} {action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "prompts per batch (default: 8)" in " ".join(text.split())
    assert "--intervene-on" in text and "3,5,7" in text


# --------------------------------------------------------------------------- the runs --
def test_run_prints_interventional_text_and_takes_positions(setup, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    argv = [a for a in base_args(setup, out, "--interventional", "--intervene-on", "0,2") if a != "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and [r["prompt_index"] for r in records] == [i // 2 for i in range(12)]
    assert printed.count("    interventional: ") == 12  # one line per row, next to factual and counterfactual
    for rec in records:
        assert rec["interventional"].replace("⟦", "").replace("⟧", "")
        assert rec["settings"]["intervene_on"] == [0, 2] and rec["settings"]["cli"]["intervene_on"] == [0, 2]
    assert not all(r["factual_ids"] == r["counterfactual_ids"] for r in records)  # the steering does something
    assert f"wrote 12 records to {out}" in printed


def test_unit_locations_bare_forms_mean_base_positions(setup, tmp_path):
    runs = {}
    for form in ("1", "[1]", '{"base": [1]}'):
        out = tmp_path / f"{len(runs)}.jsonl"
        assert main(base_args(setup, out, "--unit-locations", form)) == 0
        runs[form] = [{k: v for k, v in json.loads(line).items() if k not in ("settings", "provenance")}
                      for line in out.read_text().splitlines()]
    assert runs["1"] == runs["[1]"] == runs['{"base": [1]}']


def test_resume_refuses_other_settings_and_other_prompts(setup, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(base_args(setup, out)) == 0
    capsys.readouterr()
    before = out.read_bytes()
    line = usage_error(capsys, base_args(setup, out, "--resume", "--seed", "4"))
    assert "written with other settings (--seed 3 there, --seed 4 now)" in line
    line = usage_error(capsys, base_args(setup, out, "--resume", "--temperature", "0.9"))
    assert "--temperature 0.7 there, --temperature 0.9 now" in line
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(PROMPTS)))
    line = usage_error(capsys, base_args(setup, out, "--resume", "--prompts-file", str(other)))
    assert "is for prompt 0 'the old lighthouse keeper', which is not prompt 0 of this run" in line
    assert main(base_args(setup, out, "--resume")) == 0
    assert "already holds all 12 records of this run; nothing to do" in capsys.readouterr().out
    assert out.read_bytes() == before


def _spawn(argv, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", cli._DELAY_ENV: str(delay)}
    script = "import sys, torch; torch.set_num_threads(1); from cfgen.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"cfgen run ended before writing {n} lines: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("cfgen run wrote nothing in time")


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_to_the_same_bytes(setup, tmp_path, capsys, how):
    """Kill `cfgen run` after its first batch (of 3), resume, compare with an uninterrupted run byte for byte.

    The subprocess sleeps 2 s after each written batch (the test-only cfgen.cli._DELAY_ENV) so the signal lands
    mid-run. After SIGKILL a torn half line is appended to stand for a kill in the middle of a write.
    """
    reference = tmp_path / "reference.jsonl"
    assert main(base_args(setup, reference)) == 0
    out = tmp_path / "interrupted.jsonl"
    proc = _spawn(base_args(setup, out), delay=2.0)
    _wait_for_lines(out, proc, 4)  # the first batch: 2 prompts x 2 samples
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    kept = out.read_bytes()
    n = kept.count(b"\n")
    assert 0 < n < 12 and reference.read_bytes().startswith(kept)
    if how == "SIGINT":
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == (f"cfgen run: interrupted; {n} records are safe in "
                                                f"{out}; rerun with --resume to finish")
    else:
        assert proc.returncode == -signal.SIGKILL
        with open(out, "ab") as f:
            f.write(b'{"prompt": "the cat sat on')
    capsys.readouterr()
    assert main(base_args(setup, out, "--resume")) == 0
    assert out.read_bytes() == reference.read_bytes()
    printed = capsys.readouterr()
    assert f"resuming {out}: {n // 2} of 6 prompts done, {6 - n // 2} to go" in printed.err
    assert ("dropped an incomplete last line (26 bytes)" in printed.err) == (how == "SIGKILL")
    assert f"wrote {12 - n} records to {out} (12 in all)" in printed.out


def test_first_ctrl_c_asks_to_stop_after_the_batch_second_stops_now(capsys):
    with cli._StopAfterBatch() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        assert "stopping after the current batch (Ctrl-C again to stop now)" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's handler is back


def test_an_error_mid_run_keeps_the_finished_batches(setup, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference.jsonl"
    assert main(base_args(setup, reference)) == 0
    real, calls = cfgen.api.generate, []

    def failing_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("something about batch 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(cfgen.api, "generate", failing_second_batch)
    out = tmp_path / "r.jsonl"
    capsys.readouterr()
    assert main(base_args(setup, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [f"cfgen run: stopped by the error below; 4 records are safe in {out} (rerun with --resume "
                        "once it is fixed)", "cfgen run: something about batch 2"]
    monkeypatch.setattr(cfgen.api, "generate", real)
    assert main(base_args(setup, out, "--resume")) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_a_second_writer_is_refused_and_a_failed_run_leaves_no_empty_file(setup, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "r.jsonl"
    with open(out, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = usage_error(capsys, base_args(setup, out, "--resume"))
    assert line == f"cfgen run: error: --out {out}: another cfgen run is writing to it"
    out.unlink()
    argv = base_args(setup, out)
    argv[argv.index("--intervention") + 1] = str(tmp_path / "missing")
    line = usage_error(capsys, argv)  # refused before the model loads, naming it and the catalogue
    assert "--intervention" in line and "missing" in line and "steering_dark" in line
    assert not out.exists()


def test_undecodable_text_and_foreign_files_are_refused(capsys, tmp_path):
    line = usage_error(capsys, ["run", "--intervention", "x", "--prompt", "ok", "--prompt", "bad \udcff byte"])
    assert "--prompt number 2 is not valid UTF-8 text (at character 4)" in line
    foreign = tmp_path / "r.jsonl"
    foreign.write_text(json.dumps({"prompt": "hi", "prompt_index": 0, "sample_index": 0, "settings": {}}) + "\n")
    line = usage_error(capsys, ["run", "--intervention", "steering_dark", "--prompt", "hi", "--out", str(foreign),
                                "--resume"])
    assert "line 1 records no cfgen run settings (written by other code or an older cfgen)" in line


def _torchrun_cfgen(argv, nproc=2):
    """``torchrun --nproc_per_node N -m cfgen ARGV`` with two Gloo CPU ranks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "cfgen",
           *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_run_over_two_ranks_writes_the_single_process_file_and_resumes_from_parts(setup, tmp_path):
    reference = tmp_path / "reference.jsonl"
    assert main(base_args(setup, reference)) == 0
    ref = reference.read_bytes()

    out = tmp_path / "ranks.jsonl"
    res = _torchrun_cfgen(base_args(setup, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == ref
    assert not list(tmp_path.glob("ranks.jsonl.rank*"))  # the parts are merged and gone

    # An interrupted run leaves its ranks' parts: rank 1 had finished batch 1 (prompts 2, 3) and torn a line.
    resumed = tmp_path / "resumed.jsonl"
    lines = ref.splitlines(keepends=True)
    (tmp_path / "resumed.jsonl.rank1.part").write_bytes(b"".join(lines[4:8]) + b'{"prompt": "the')
    res = _torchrun_cfgen(base_args(setup, resumed, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert resumed.read_bytes() == ref


def test_more_ranks_than_batches_is_refused_by_rank(setup, tmp_path):
    out = tmp_path / "out.jsonl"
    res = _torchrun_cfgen(base_args(setup, out, "--batch-size", "6"))
    assert res.returncode != 0
    assert "2 ranks for 1 batches" in res.stderr and "rank 1" in res.stderr
    assert not out.exists()
