"""Caches that heal: the native kernel cache and the converted-model cache."""

import json
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
