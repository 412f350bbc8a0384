"""Building and loading the fused CPU kernels (``csrc/norm_cpu.cpp``) with torch's extension machinery.

The extension is compiled once per machine and torch version, on first use or ahead of time with
``normkit kernels build`` (about 40 s with g++ and ninja), into an on-disk cache:
``$NORMKIT_CACHE`` or ``~/.cache/normkit`` (``$XDG_CACHE_HOME/normkit``), under a folder named
after the torch version, the CPU's vector extensions (the kernels are compiled for the machine they
run on, ``-march=native``) and a hash of the sources and flags (each normkit version builds its
own). A finished build records its library's digest; a library that does not match it (cut
short) is never loaded but rebuilt, and a matching one is loaded as is, without a lock or a
compiler (a read-only cache works). Set ``NORMKIT_NO_BUILD=1`` to never compile (a finished build
is still used). A failed build is recorded in the folder with its cause and the toolchain it used
(``build-failed.json``): later processes with the same compiler and ninja do not try again (each
of ``normkit compare``'s workers, every test process, paid the failed compile again), they say why;
``normkit kernels build`` always tries, and a changed ``CXX``, compiler or ninja tries again.

It is written against the LibTorch stable ABI (``STABLE_TORCH_LIBRARY``): the kernels only touch
memory the Python side allocated, and need nothing from torch but ``parallel_for``.

A second, optional extension (``csrc/autograd.cpp``, torch's C++ API, built into ``autograd/`` of
the same folder on first use) records the layers' fast path as one C++ autograd node; it calls the
kernels through their C entry points, which Python hands it once. If it cannot be built, the layers
use a Python ``autograd.Function`` instead (same results, more per-call overhead).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["KernelBuildWarning", "build_dir", "exclusive", "is_built", "lib", "load", "load_error"]

_SOURCE = Path(__file__).with_name("csrc") / "norm_cpu.cpp"
_NAME = "normkit_cpu"
# the kernels' compiler flags (benchmarks/ab_kernels.py builds its variants with the same)
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math")
_LOCK = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None, "tried": False, "lib": None}
_AUTOGRAD_SOURCE = Path(__file__).with_name("csrc") / "autograd.cpp"
_AUTOGRAD_NAME = "normkit_autograd"
_autograd: dict[str, object] = {"tried": False, "module": None, "error": None}


class KernelBuildWarning(RuntimeWarning):
    """The fused CPU kernels could not be built; normkit runs on its reference backend instead."""


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(
                        sorted(
                            f
                            for f in line.split(":", 1)[1].split()
                            if f.startswith(("avx", "fma", "f16c", "sse"))
                        )
                    )
                    break
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build_dir() -> Path:
    """Where the compiled extension lives (created on build): a folder per torch version, Python, CPU and
    source under ``$NORMKIT_CACHE/kernels/`` (default ``$XDG_CACHE_HOME/normkit`` or ``~/.cache/normkit``).

    Example:
        >>> normkit.kernels.build_dir().parent.name
        'kernels'
    """
    root = os.environ.get("NORMKIT_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "normkit"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"torch{torch.__version__.replace('+', '_')}-{py}-{_cpu_tag()}-src{_source_tag()}"
    return base / "kernels" / name


def _source_tag() -> str:
    """The kernels' sources and flags, hashed: each version of normkit builds into its own folder (two
    installs sharing a cache rebuilt it for each other, in turn)."""
    h = hashlib.sha1()
    for src in (_SOURCE, _AUTOGRAD_SOURCE):
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:10]


def is_built() -> bool:
    """Whether a compiled extension is in the cache.

    Example:
        >>> normkit.kernels.is_built() in (True, False)
        True
    """
    d = build_dir()
    return d.is_dir() and any(d.glob(f"{_NAME}*.so"))


def _no_build() -> bool:
    """``NORMKIT_NO_BUILD`` set to anything but empty, 0, false, no or off."""
    return os.environ.get("NORMKIT_NO_BUILD", "").strip().lower() not in ("", "0", "false", "no", "off")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sealed(so: Path) -> bool:
    """Whether ``so`` is the complete file a finished build left (its digest as recorded then): a
    truncated library (a build killed while linking, a full disk, a partial copy) crashed every
    process that loaded it with SIGBUS."""
    try:
        return (so.parent / (so.name + ".sha256")).read_text().strip() == _digest(so)
    except OSError:
        return False


def _seal(so: Path) -> None:
    with contextlib.suppress(OSError):  # (a read-only cache: it is only checked, never sealed)
        tmp = so.parent / (so.name + ".sha256.tmp")
        tmp.write_text(_digest(so))
        tmp.replace(so.parent / (so.name + ".sha256"))


def _staged(d: Path, src: Path) -> Path:
    """``src`` copied into the build folder: the build then names the same path whichever install of
    this normkit built it (a different path made ninja rebuild)."""
    dst = d / "src" / src.name
    data = src.read_bytes()
    try:
        if not dst.is_file() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(dst)
    except OSError:
        return src
    return dst


_FAILED = "build-failed.json"


def _toolchain() -> dict[str, object]:
    """What a build in this process would run: the compiler torch takes (``$CXX``, else ``c++``) and
    ninja, each as found on the ``PATH`` with its modification time (an install or upgrade changes it)."""

    def found(name: str) -> list[object]:
        path = shutil.which(name)
        if path is None:
            return [name, None]
        try:
            return [path, os.stat(path).st_mtime_ns]
        except OSError:
            return [path, None]

    return {"cxx": found(os.environ.get("CXX", "c++")), "ninja": found("ninja")}


def _recorded_failure(d: Path) -> str | None:
    """The cause of an earlier failed build in ``d`` with this process's toolchain, or ``None``."""
    try:
        rec = json.loads((d / _FAILED).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("toolchain") != _toolchain():
        return None
    return str(rec.get("cause", "unknown cause"))


def _record_failure(d: Path, cause: str) -> None:
    with contextlib.suppress(OSError):  # (a read-only cache: every process tries, as before)
        tmp = d / (_FAILED + ".tmp")
        tmp.write_text(json.dumps({"cause": cause, "toolchain": _toolchain(), "when": time.time()}))
        tmp.replace(d / _FAILED)


def _build_cause(e: BaseException) -> str:
    """The line of a failed build that says why (``c++: not found``, the compiler's ``error:``)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for pattern in ("not found", "error:", "fatal", "No such file"):
        hit = next((line for line in lines if pattern in line), None)
        if hit is not None:
            return hit[:300]
    return lines[0][:300] if lines else type(e).__name__


@contextlib.contextmanager
def exclusive(d: Path) -> Iterator[None]:
    """Hold the build folder ``d`` while torch's extension machinery builds or loads into it.

    ``torch.utils.cpp_extension.load`` guards a folder with a plain ``lock`` file and waits, without
    end, for it to go away: a process killed while holding it (a Ctrl-C'd or timed-out run during a
    build, a worker terminated at start-up) leaves every later load of that folder waiting forever.
    normkit first takes an ``flock`` on ``d/normkit.lock``, which the kernel releases when its holder
    dies, so a torch ``lock`` still there once normkit holds the folder is one such leftover: it is
    removed (with a note on stderr) and torch goes on. torch 2.14 and later lock the folder with an
    advisory lock that a dead holder releases: nothing is removed there. Where ``fcntl`` is missing
    (Windows) this only yields.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from normkit.kernels._build import exclusive
    >>> d = Path(tempfile.mkdtemp())
    >>> from normkit.kernels._build import _torch_waits_on_lock_files
    >>> (d / "lock").touch()          # what a killed build leaves behind
    >>> with exclusive(d):            # torch <= 2.13: a note on stderr, removed .../lock, left by ...
    ...     left = (d / "lock").exists()
    >>> left == (not _torch_waits_on_lock_files())   # (torch 2.14 and later: harmless, and kept)
    True
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; torch's own lock file is all there is
        yield
        return
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "normkit.lock", "a") as f:
        # another process loading a cached build holds the folder for a moment (torch's up-to-date
        # check): wait quietly; a note only when it lasts (that process is compiling)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(
                        f"normkit: waiting for another process building in {d}", file=sys.stderr, flush=True
                    )
                    fcntl.flock(f, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        try:
            stale = d / "lock"
            if _torch_waits_on_lock_files() and stale.exists():
                stale.unlink(missing_ok=True)
                print(f"normkit: removed {stale}, left by an interrupted build", file=sys.stderr, flush=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _torch_waits_on_lock_files() -> bool:
    """Whether torch's extension loader guards a folder with a lock file whose mere existence blocks
    (``FileBaton``: torch up to 2.13), which :func:`exclusive` clears when a killed build left one.
    From torch 2.14 it holds an OS-level advisory lock on the same path instead: the kernel releases
    it when its holder dies, and the file stays after every load, so there is nothing to clear (and a
    note at every start would be wrong)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def load_error() -> str | None:
    """Why the last build or load failed, or ``None``."""
    err = _state["error"]
    return None if err is None else str(err)


def load(build: bool = True, verbose: bool = False, retry: bool = False) -> bool:
    """Load the fused CPU kernels, compiling them first when needed (and ``build``); True on success.

    A failed build warns once (:class:`KernelBuildWarning`) and returns False: every norm then runs
    on the reference backend. It is recorded in the build folder, so later processes with the same
    compiler and ninja warn without compiling again; ``retry`` (or ``verbose``) builds regardless.
    """
    if _state["loaded"]:
        return True
    with _LOCK:
        if _state["loaded"]:
            return True
        if not build and not is_built():
            return False
        if _state["tried"] and not (verbose or retry):
            return False
        _state["tried"] = True
        d = build_dir()
        so = d / f"{_NAME}.so"
        if not verbose and _sealed(so):  # a finished build of these sources: no lock, no ninja
            return _loaded(so)
        if _no_build():
            _state["error"] = f"NORMKIT_NO_BUILD is set and {d} holds no finished build"
            return False
        try:
            from torch.utils import cpp_extension

            d.mkdir(parents=True, exist_ok=True)
            with exclusive(d):
                if not verbose and _sealed(so):  # another process built it while this one waited
                    return _loaded(so)
                failed = None if (retry or verbose) else _recorded_failure(d)
                if failed is not None:
                    _state["error"] = f"an earlier build in {d} failed with this compiler: {failed}"
                    warnings.warn(
                        f"normkit: the fused CPU kernels are not built: an earlier build failed ({failed}) "
                        "and the compiler has not changed since; normkit runs on its reference backend "
                        "(correct, slower). `normkit kernels build --verbose` tries again and shows why.",
                        KernelBuildWarning,
                        stacklevel=3,
                    )
                    return False
                with contextlib.suppress(OSError):
                    so.unlink()  # (unsealed: possibly cut short; ninja would take it as up to date)
                if not verbose:
                    print(
                        "normkit: compiling the fused CPU kernels once (about 40 s; `normkit kernels build` "
                        f"does it ahead of time) into {d}",
                        file=sys.stderr,
                        flush=True,
                    )
                path = cpp_extension.load(
                    name=_NAME,
                    sources=[str(_staged(d, _SOURCE))],
                    extra_cflags=list(CFLAGS),
                    build_directory=str(d),
                    is_python_module=False,
                    verbose=verbose,
                )
                _seal(Path(str(path)))
                with contextlib.suppress(OSError):
                    (d / _FAILED).unlink()
            return _loaded(Path(str(path)))
        except Exception as e:  # no compiler, no ninja, a compile error: keep working without the kernels
            _state["error"] = f"{type(e).__name__}: {e}".strip()
            if d.is_dir():
                _record_failure(d, _build_cause(e))
            warnings.warn(
                f"normkit: the fused CPU kernels could not be built ({_build_cause(e)}); normkit runs on its "
                "reference backend instead (correct, slower). `normkit kernels build --verbose` shows the "
                "compiler's output.",
                KernelBuildWarning,
                stacklevel=3,
            )
            return False


def _loaded(so: Path) -> bool:
    _state["lib"] = _bind(str(so))
    _state["loaded"] = True
    _state["error"] = None
    return True


def _bind(path: str) -> ctypes.CDLL:
    """The extension's C entry points (``normkit_forward`` ...) through ctypes, with their signatures."""
    so = ctypes.CDLL(path)
    i32, i64, p, dbl = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    so.normkit_forward.argtypes = [ctypes.c_int, p, p, p, p, p, i64, i64, i64, i64, i64, dbl]
    so.normkit_forward.restype = i32
    so.normkit_forward_train.argtypes = [
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        dbl,
        dbl,
        i32,
    ]
    so.normkit_forward_train.restype = i32
    so.normkit_backward.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, i64, i64, i64, i64, i64]
    so.normkit_backward.restype = i32
    so.normkit_backward_members.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, *[i64] * 7]
    so.normkit_backward_members.restype = i32
    so.normkit_act_forward.argtypes = [ctypes.c_int, p, p, p, p, p, p, i64, dbl, i64, i64, i64, i32]
    so.normkit_act_forward.restype = i32
    so.normkit_act_backward.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, p, i64, dbl, i64, i64, i64, i32]
    so.normkit_act_backward.restype = i32
    so.normkit_gn_act_forward.argtypes = [
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        dbl,
        i64,
        dbl,
    ]
    so.normkit_gn_act_forward.restype = i32
    so.normkit_gn_act_backward.argtypes = [
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        dbl,
    ]
    so.normkit_gn_act_backward.restype = i32
    so.normkit_proxy_stats.argtypes = [ctypes.c_int, p, p, p, p, p, i64, i64, i64, dbl, dbl, p, p]
    so.normkit_proxy_stats.restype = i32
    so.normkit_proxy_stats_backward.argtypes = [
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        dbl,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
    ]
    so.normkit_proxy_stats_backward.restype = i32
    return so


def autograd_module(build: bool = True, verbose: bool = False) -> object | None:
    """The optional C++ autograd Function of the layers' fast path (``csrc/autograd.cpp``), or ``None``.

    Built next to the kernels (torch's C++ API, so per torch and Python version) on first use; a
    failed build is remembered (:func:`autograd_error`) and the Python Function runs instead.
    """
    if _autograd["module"] is not None:
        return _autograd["module"]
    if _autograd["tried"] and not verbose:
        return None
    if not load(build=build):
        return None
    with _LOCK:
        if _autograd["module"] is not None:
            return _autograd["module"]
        d = build_dir() / "autograd"
        so_path = d / f"{_AUTOGRAD_NAME}.so"
        sealed = not verbose and _sealed(so_path)
        if not sealed and (not build or _no_build()):
            return None
        _autograd["tried"] = True
        try:
            if sealed:  # a finished build of these sources: imported as is (no lock, no ninja)
                mod = _import_extension(so_path)
            else:
                mod = _build_autograd(d, so_path, verbose)
            so = lib()
            entries = (
                so.normkit_forward,
                so.normkit_forward_train,
                so.normkit_backward,
                so.normkit_gn_act_forward,
                so.normkit_gn_act_backward,
                so.normkit_proxy_stats,
                so.normkit_proxy_stats_backward,
            )
            addr = [ctypes.cast(f, ctypes.c_void_p).value for f in entries]
            mod.init(*addr)  # type: ignore[attr-defined]
            _autograd["module"], _autograd["error"] = mod, None
            return mod
        except Exception as e:  # optional: the Python Function does the same job, a little slower
            _autograd["error"] = f"{type(e).__name__}: {e}".strip()
            return None


def _import_extension(so: Path) -> object:
    """The Python extension module ``so``, imported from its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(_AUTOGRAD_NAME, so)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_autograd(d: Path, so: Path, verbose: bool) -> object:
    from torch.utils import cpp_extension

    d.mkdir(parents=True, exist_ok=True)
    with exclusive(d):
        if not verbose and _sealed(so):  # another process built it while this one waited
            return _import_extension(so)
        with contextlib.suppress(OSError):
            so.unlink()  # (unsealed: possibly cut short)
        if not verbose:
            print(
                "normkit: compiling the fused layers' autograd node once (about 35 s)",
                file=sys.stderr,
                flush=True,
            )
        mod = cpp_extension.load(
            name=_AUTOGRAD_NAME,
            sources=[str(_staged(d, _AUTOGRAD_SOURCE))],
            extra_cflags=["-O2"],
            build_directory=str(d),
            verbose=verbose,
        )
        if so.is_file():
            _seal(so)
    return mod


def autograd_error() -> str | None:
    """Why the C++ autograd node could not be built or loaded, or ``None``."""
    err = _autograd["error"]
    return None if err is None else str(err)


def lib() -> ctypes.CDLL:
    """The loaded extension's C entry points (call :func:`load` first)."""
    so = _state["lib"]
    assert so is not None, "normkit: the fused CPU kernels are not loaded"
    return so  # type: ignore[return-value]
