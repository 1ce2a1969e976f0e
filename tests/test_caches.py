"""Caches that heal: the native kernel cache and the converted-model cache."""

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Loads the native library in a fresh process with the cache in argv[1]; prints where it came from.
LOAD = """
import sys, warnings
sys.path.insert(0, {root!r})
warnings.simplefilter("error")
from cfgen import _native
lib = _native.library()
print("LOADED" if lib is not None else "EAGER", _native._target(_native._compiler()))
"""


def _load_in_subprocess(cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CFGEN_CACHE_DIR": str(cache), "CFGEN_BACKEND": "auto", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", LOAD.format(root=str(ROOT))], env=env, capture_output=True,
                          text=True, timeout=300)


def _compiler_or_skip() -> str:
    from cfgen import _native

    try:
        return _native._compiler()
    except RuntimeError as err:
        pytest.skip(f"native kernel cache tests need a C compiler: {err}")


def _built(cache: Path) -> Path:
    first = _load_in_subprocess(cache)
    assert first.returncode == 0 and first.stdout.startswith("LOADED"), first.stderr
    target = Path(first.stdout.split()[1])
    assert target.is_file() and target.parent == cache / "native"
    return target


def test_truncated_native_library_is_rebuilt_not_loaded(tmp_path):
    """Mapping a truncated .so used to kill the process with SIGBUS; now its hash mismatch triggers a rebuild."""
    _compiler_or_skip()
    target = _built(tmp_path)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 3])
    again = _load_in_subprocess(tmp_path)
    assert again.returncode == 0, f"exit {again.returncode}: {again.stderr[-2000:]}"  # -7 would be SIGBUS
    assert again.stdout.startswith("LOADED"), again.stderr
    assert target.stat().st_size == len(good)
    from cfgen import _native

    assert _native._verified(target)
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(CANARY, "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.mark.parametrize("digest", ["none", "stale"])
def test_planted_native_library_never_runs(tmp_path, digest):
    """A foreign .so at the cache path (with no digest, or the digest of the real build) is replaced unopened."""
    cc = _compiler_or_skip()
    cache, canary = tmp_path / "cache", tmp_path / "canary"
    target = _built(cache)
    if digest == "none":
        (target.parent / (target.name + ".sha256")).unlink()
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    subprocess.run([cc, "-shared", "-fPIC", f'-DCANARY="{canary}"', "-o", str(target), str(src)], check=True)
    # Control: the planted library does run its constructor when anything dlopens it.
    probe = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(target)!r})"], timeout=60)
    assert probe.returncode == 0 and canary.read_text() == "ran"
    canary.unlink()
    planted = target.read_bytes()
    again = _load_in_subprocess(cache)
    assert again.returncode == 0 and again.stdout.startswith("LOADED"), again.stderr
    assert not canary.exists()
    assert target.read_bytes() != planted


def test_unbuildable_native_library_falls_back_with_one_warning(tmp_path, monkeypatch):
    """A bad cached .so and a compiler that fails: the eager kernels run, with one warning naming the cause."""
    from cfgen import _native

    monkeypatch.setenv("CFGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CFGEN_BACKEND", "auto")
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake-cc 1.0; exit 0; fi\n"
                       "echo 'fake-cc: cannot compile' >&2; exit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    target = _native._target(str(failing))
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF truncated")
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_failed", None)
    with pytest.warns(RuntimeWarning, match="fake-cc: cannot compile") as caught:
        assert _native.library() is None
        assert _native.library() is None
    assert len([w for w in caught if "native CPU kernels" in str(w.message)]) == 1


# ------------------------------------------------------------------ the converted-model cache --
WORDS = ("the a lighthouse keeper ship sea night lamp stairs old climbed light every to for of and was "
         "dark storm bright red blue cat dog ran sat on mat hello world once upon time there").split()


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama and a word-level fast tokenizer, saved as a local HF folder (nothing from a hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .conftest import tiny_llama

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    model = tiny_llama(vocab_size=len(vocab), seed=seed, init=0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """CFGEN_CACHE_DIR in a temp folder; the GGUF conversion replaced by saving a tiny model (counted)."""
    from cfgen import models

    monkeypatch.setenv("CFGEN_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_export(folder):
        calls.append(Path(folder))
        save_tiny_model(Path(folder))

    monkeypatch.setattr(models, "_export", fake_export)
    models._load.cache_clear()
    yield models, calls
    models._load.cache_clear()


def _no_temps(target: Path) -> bool:
    return not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_model_cache_converts_once_then_loads(model_cache):
    models, calls = model_cache
    model, tok = models.load_default_model()
    assert len(calls) == 1 and model.config.vocab_size == len(WORDS) + 4 and tok.padding_side == "left"
    models._load.cache_clear()
    models.load_default_model()
    assert len(calls) == 1  # a complete cache is used as is
    assert models._cache_problem(models.default_model_dir()) is None and _no_temps(models.default_model_dir())


@pytest.mark.parametrize("damage", ["no-config", "truncated-weights", "bad-header", "no-weights", "empty-folder",
                                    "a-file"])
def test_incomplete_model_cache_is_detected_and_converted_again(model_cache, damage):
    models, calls = model_cache
    target = models.default_model_dir()
    save_tiny_model(target)
    weights = target / "model.safetensors"
    if damage == "no-config":
        (target / "config.json").unlink()
    elif damage == "truncated-weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    elif damage == "bad-header":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "empty-folder":
        shutil.rmtree(target)
        target.mkdir()
    else:
        shutil.rmtree(target)
        target.write_text("not a folder")
    problem = models._cache_problem(target)
    assert problem
    with pytest.warns(RuntimeWarning, match="incomplete .*converting it again"):
        model, _ = models.load_default_model()
    assert len(calls) == 1 and model.config.vocab_size == len(WORDS) + 4
    assert models._cache_problem(target) is None and _no_temps(target)


def test_safetensors_check_accepts_real_files_and_names_the_size(tmp_path):
    from cfgen import models

    folder = save_tiny_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    assert models._safetensors_problem(weights) is None
    size = weights.stat().st_size
    with open(weights, "ab") as f:
        f.write(b"\0")
    assert f"{size + 1} bytes but its header describes {size}" in models._safetensors_problem(weights)


def test_interrupted_conversion_leaves_no_temp_folder(model_cache, monkeypatch):
    models, _ = model_cache

    def interrupted(folder):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.load_default_model()
    target = models.default_model_dir()
    assert not target.exists() and _no_temps(target)


def test_stale_temp_folders_of_killed_conversions_are_removed(model_cache):
    """Dead owner on this host, or (other host / old naming) older than an hour: removed. A live owner: kept."""
    import socket

    models, calls = model_cache
    parent = models.default_model_dir().parent
    parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    folders = {
        "dead-owner": f".SmolLM2-135M-Instruct-tmp-{host}-{int(dead.stdout)}-abc",
        "live-owner": f".SmolLM2-135M-Instruct-tmp-{host}-{os.getpid()}-def",
        "old-other-host": ".SmolLM2-135M-Instruct-tmp-elsewhere-1-ghi",
        "new-other-host": ".SmolLM2-135M-Instruct-tmp-elsewhere-2-jkl",
        "old-naming": ".SmolLM2-135M-Instruct-x1y2z3",
        "unrelated": ".something-else",
    }
    for name in folders.values():
        (parent / name).mkdir()
        (parent / name / "model.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for key in ("old-other-host", "old-naming", "live-owner", "unrelated"):
        os.utime(parent / folders[key], (two_hours_ago, two_hours_ago))
    models.load_default_model()
    left = {key for key, name in folders.items() if (parent / name).exists()}
    assert left == {"live-owner", "new-other-host", "unrelated"}
    assert len(calls) == 1


def test_stale_native_build_temps_are_removed(tmp_path):
    from cfgen import _native

    old, fresh, other = (tmp_path / "cfgen_native_ab.x1.so.tmp", tmp_path / "cfgen_native_ab.x2.so.tmp",
                         tmp_path / "unrelated.tmp")
    for path in (old, fresh, other):
        path.write_bytes(b"partial")
    for path in (old, other):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    _native._remove_stale_temps(tmp_path)
    assert not old.exists() and fresh.exists() and other.exists()
