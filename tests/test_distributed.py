"""Prompt sets over torchrun ranks (Gloo, 2 CPU processes) give the single-process file byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfgen.distributed import assign, batches_of, ranks

JOB = Path(__file__).with_name("_dist_job.py")
ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(JOB), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_batches_and_assignment_cover_every_prompt_once():
    batches = batches_of(7, 3)
    assert [list(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    owned = sorted(b for r in range(2) for b in assign(len(batches), r, 2))
    assert owned == [0, 1, 2]
    with pytest.raises(ValueError, match="3 ranks for 2 batches"):
        assign(2, 0, 3)
    with pytest.raises(ValueError, match="batch_size"):
        batches_of(3, 0)


def test_without_torchrun_is_rank_zero_of_one():
    with ranks() as ctx:
        assert (ctx.rank, ctx.world_size) == (0, 1)
        out = ctx.map_batches(lambda b: [i for i, _ in b], list("abcde"), batch_size=2)
    assert out == [[0, 1], [2, 3], [4]]


def test_two_gloo_ranks_write_the_single_process_file(tmp_path):
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    one = subprocess.run([sys.executable, str(JOB), str(single)], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(str(multi))
    assert two.returncode == 0, two.stderr[-2000:]
    assert single.read_bytes() == multi.read_bytes()
    assert len(single.read_text().splitlines()) == 5


def test_a_failing_rank_is_named_and_no_file_is_left(tmp_path):
    out = tmp_path / "out.jsonl"
    res = _torchrun(str(out), "1")
    assert res.returncode != 0
    assert "rank 1 failed" in res.stderr + res.stdout
    assert not out.exists() and not (tmp_path / "out.jsonl.tmp").exists()

