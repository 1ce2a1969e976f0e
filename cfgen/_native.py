"""Build, check and call the fused C kernels in ``_native.c`` (CPU only).

The library is compiled once per source / compiler / flags into
``$CFGEN_CACHE_DIR/native`` (written to a temporary name, then renamed, with
its SHA-256 recorded beside it; a file that does not match its record is
rebuilt, never loaded) and loaded with ctypes, whose calls release the GIL, so row blocks run on
``torch.get_num_threads()`` threads. Before first use its output is compared
with the eager torch code bit for bit; any failure (no C compiler, an exotic
platform, a mismatch) falls back to the eager path with one warning.
``CFGEN_BACKEND=eager`` skips the kernels, ``native`` makes failures errors,
``compiled`` uses ``torch.compile`` kernels instead (``_compiled.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from ._ieee import log_softmax32
from .models import cache_root

_CHOICES = ("auto", "native", "eager", "compiled")
_SOURCE = Path(__file__).with_name("_native.c")
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failed: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None


def backend() -> str:
    """The kernel choice from ``CFGEN_BACKEND`` (``auto``, ``native``, ``eager`` or ``compiled``)."""
    choice = os.environ.get("CFGEN_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"CFGEN_BACKEND={choice!r}; use one of {', '.join(_CHOICES)}")
    return choice


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2"):
        flags.append("-mavx2")
    return flags


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    return cc


def _target(cc: str) -> Path:
    """The cache path for this kernel source, compiler identity, flags and machine (they key its name)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + repr((_flags(), version, platform.machine())).encode())
    return cache_root() / "native" / f"cfgen_native_{key.hexdigest()[:16]}.so"


def _digest_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(target: Path) -> bool:
    """Whether ``target`` is exactly the library cfgen built there (its SHA-256 matches the record beside it).

    A truncated, half-written, foreign or planted file fails this and is never dlopen'ed (loading runs its
    constructors; mapping a truncated one dies with SIGBUS). This guards against accidents and stray files,
    not against someone who can write both files in the user's cache.
    """
    try:
        expected = _digest_path(target).read_text(encoding="ascii").strip()
        actual = hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError:
        return False
    return len(expected) == 64 and expected == actual


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_temps(folder: Path, older_than_s: float = 3600.0) -> None:
    """Delete temporary files of builds that were killed (a build takes seconds; these are an hour old)."""
    now = time.time()
    for entry in folder.glob("cfgen_native_*.tmp"):
        try:
            if now - entry.stat().st_mtime > older_than_s:
                entry.unlink()
        except OSError:
            pass


def _compile(cc: str, target: Path) -> None:
    """Compile into a temporary file, record its hash, then rename both into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *_flags(), "-o", tmp, str(_SOURCE)], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip()[:2000]}")
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        # Digest first: a reader between the two renames sees a mismatch and rebuilds, never a wrong match.
        _write_atomically(_digest_path(target), digest.encode("ascii") + b"\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _build() -> ctypes.CDLL:
    cc = _compiler()
    target = _target(cc)
    if not _verified(target):
        _compile(cc, target)
        if not _verified(target):  # e.g. a concurrent writer, or a file system that does not keep what it is given
            raise RuntimeError(f"{target} does not match the hash recorded beside it after rebuilding")
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.cfgen_gumbel.argtypes = [ptr, ptr, i64, i64, ptr]
    lib.cfgen_gumbel.restype = None
    lib.cfgen_posterior.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int32, ptr, ptr]
    lib.cfgen_posterior.restype = None
    lib.cfgen_log_softmax.argtypes = [ptr, i64, i64, ctypes.c_int32, ptr]
    lib.cfgen_log_softmax.restype = None
    lib.cfgen_advise_huge.argtypes = [ptr, i64]
    lib.cfgen_advise_huge.restype = None
    return lib


def _empty(lib: ctypes.CDLL, rows: int, vocab: int) -> torch.Tensor:
    out = torch.empty(rows, vocab, dtype=torch.float32)
    if out.numel() >= 1 << 21:  # large and fresh: huge pages fault in ~20x fewer times
        lib.cfgen_advise_huge(out.data_ptr(), out.numel() * 4)
    return out


def library(device: Optional[torch.device] = None) -> Optional[ctypes.CDLL]:
    """The checked native library, or None where the eager path should run (always off the CPU)."""
    global _lib, _failed
    choice = backend()
    if choice in ("eager", "compiled") or (device is not None and torch.device(device).type != "cpu"):
        return None
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                lib = _build()
                _self_check(lib)
                _lib = lib
            except Exception as err:  # no compiler, a platform we cannot build for, a mismatch
                _failed = f"{type(err).__name__}: {err}"
                if choice == "auto":
                    warnings.warn(
                        f"cfgen: the native CPU kernels are unavailable ({_failed}); using the eager torch "
                        "kernels (same bits, slower). Set CFGEN_BACKEND=eager to skip the attempt.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if _lib is None and choice == "native":
        raise RuntimeError(f"CFGEN_BACKEND=native but the native kernels are unavailable: {_failed}")
    return _lib


def _self_check(lib: ctypes.CDLL) -> None:
    """Compare the kernels with the eager torch code on inputs that reach every branch."""
    from . import _eager
    _eager_gumbel, _eager_posterior, _row_keys = _eager.gumbel, _eager.posterior, _eager.row_keys

    seeds = torch.tensor([0, 1, 2**40 + 3], dtype=torch.int64)
    k1, k2 = _row_keys(seeds, seeds * 7, 0)
    same = torch.equal(gumbel(lib, k1, k2, 1003), _eager_gumbel(k1, k2, 1003))
    z = torch.linspace(-60.0, 8.0, 3 * 1003).reshape(3, 1003)[:, torch.randperm(1003, generator=torch.Generator().manual_seed(0))]
    z[1, ::5] = float("-inf")
    y, m = z.argmax(-1), torch.tensor([0.5, -1.0, 3.0])
    bits = 46
    same = same and torch.equal(log_softmax(lib, z, bits), log_softmax32(z))
    same = same and torch.equal(posterior(lib, z, y, k1, k2, m, bits)[0], _eager_posterior(z, y, k1, k2, m)[0])
    if not same:
        raise RuntimeError("the compiled kernels do not reproduce the eager torch code bit for bit on this platform")


def _parallel(fn, rows: int, work_per_row: int) -> None:
    """Call ``fn(lo, hi)`` over row ranges, on up to ``torch.get_num_threads()`` threads."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), rows, (rows * work_per_row) >> 16))
    if threads == 1:
        fn(0, rows)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, threads), thread_name_prefix="cfgen")
    bounds = [rows * i // threads for i in range(threads + 1)]
    for f in [_pool.submit(fn, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()


def gumbel(lib: ctypes.CDLL, k1: torch.Tensor, k2: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[len(k1), vocab]`` float32 Gumbel noise for row keys ``k1``, ``k2`` (int64, CPU)."""
    k1, k2 = k1.contiguous(), k2.contiguous()
    out = _empty(lib, len(k1), vocab)
    p1, p2, po = k1.data_ptr(), k2.data_ptr(), out.data_ptr()

    def run(lo: int, hi: int) -> None:
        lib.cfgen_gumbel(p1 + 8 * lo, p2 + 8 * lo, hi - lo, vocab, po + 4 * lo * vocab)

    _parallel(run, len(k1), vocab)
    return out


def log_softmax(lib: ctypes.CDLL, z: torch.Tensor, bits: int) -> torch.Tensor:
    """``_ieee.log_softmax32`` of float32 rows ``z`` ``[N, V]`` (CPU)."""
    z = z.contiguous()
    rows, vocab = z.shape
    out = _empty(lib, rows, vocab)
    pz, po = z.data_ptr(), out.data_ptr()

    def run(lo: int, hi: int) -> None:
        lib.cfgen_log_softmax(pz + 4 * lo * vocab, hi - lo, vocab, bits, po + 4 * lo * vocab)

    _parallel(run, rows, vocab)
    return out


def posterior(
    lib: ctypes.CDLL, z: torch.Tensor, y: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, m: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused posterior noise for float32 rows ``z`` ``[N, V]``; returns (noise, impossible-row flags)."""
    z, y, k1, k2, m = (t.contiguous() for t in (z, y, k1, k2, m))
    rows, vocab = z.shape
    out = _empty(lib, rows, vocab)
    status = torch.zeros(rows, dtype=torch.int32)
    pz, py, p1, p2, pm, po, ps = (t.data_ptr() for t in (z, y, k1, k2, m, out, status))

    def run(lo: int, hi: int) -> None:
        lib.cfgen_posterior(
            pz + 4 * lo * vocab, py + 8 * lo, p1 + 8 * lo, p2 + 8 * lo, pm + 4 * lo,
            hi - lo, vocab, bits, po + 4 * lo * vocab, ps + 4 * lo,
        )  # fmt: skip

    _parallel(run, rows, vocab)
    return out, status.bool()
