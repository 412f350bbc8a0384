"""The kernels' build folder under interrupted builds: a killed process must not stall later loads.

torch's ``cpp_extension.load`` guards its build folder with a ``lock`` file and waits for it without
end; a process killed while holding it (a timed-out or Ctrl-C'd run) used to leave every later
``normkit compare`` and every in-process first use of the kernels waiting forever.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from normkit.kernels import _build

fcntl = pytest.importorskip("fcntl", reason="flock is POSIX-only (Windows has torch's lock file only)")


def test_a_lock_left_by_a_killed_build_does_not_stall_the_next_load(tmp_path: Path) -> None:
    assert _build.load(), _build.load_error()  # the suite's own build (the cached one, normally)
    _build.autograd_module()
    src = _build.build_dir()
    dst = tmp_path / "kernels" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "normkit.lock"))  # keeps mtimes
    (dst / "lock").touch()  # what a process killed inside cpp_extension.load leaves behind
    if (dst / "autograd").is_dir():
        (dst / "autograd" / "lock").touch()
    # the folder as a build killed while holding it leaves it; the finished build is loaded as is (no
    # lock taken), and the next build's lock clears what the killed one left
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from normkit.kernels import _build
        assert _build.load(), _build.load_error()
        print("loaded", _build.autograd_module() is not None, _build.autograd_error())
        for d in (Path({str(dst)!r}), Path({str(dst / "autograd")!r})):
            if d.is_dir():
                with _build.exclusive(d):
                    pass
        """
    )
    env = {**os.environ, "NORMKIT_CACHE": str(tmp_path)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("loading the kernels waited on the lock a killed build left behind") from None
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("loaded"), out.stdout + out.stderr
    if not _build._torch_waits_on_lock_files():
        # torch 2.14 and later: an advisory lock on the same file, released by the kernel when its
        # holder dies: the load did not wait (above), and the file is left alone, without a note
        assert "left by an interrupted build" not in out.stderr, out.stderr
        return
    assert f"removed {dst / 'lock'}, left by an interrupted build" in out.stderr
    assert not (dst / "lock").exists()
    # the autograd node's folder is cleared the same way (the node is optional: built here normally)
    if (dst / "autograd").is_dir() and "loaded True" in out.stdout:
        assert not (dst / "autograd" / "lock").exists()


def test_the_folder_waits_for_a_live_holder_and_is_free_once_the_holder_is_killed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "build"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from normkit.kernels._build import exclusive\n"
            f"with exclusive(Path({str(d)!r})):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with _build.exclusive(d):
                got.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not got.wait(3.0), "the folder was taken while another process held it"
        holder.send_signal(signal.SIGKILL)  # dies holding it, as a killed build does
        start = time.monotonic()
        assert got.wait(30.0), "the folder stayed locked after its holder died"
        t.join(5.0)
        assert time.monotonic() - start < 30.0
        # a wait of more than 2 s (the other process is compiling) says so once
        assert capfd.readouterr().err.count(f"normkit: waiting for another process building in {d}") == 1
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_moment_of_waiting_says_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # another process loading a cached build holds the folder for a fraction of a second: no note
    # (compare's workers load at once, and their stderr is the user's terminal)
    d = tmp_path / "build"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from pathlib import Path\n"
            "from normkit.kernels._build import exclusive\n"
            f"with exclusive(Path({str(d)!r})):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(0.5)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with _build.exclusive(d):
            waited = time.monotonic() - start
    finally:
        holder.wait(30)
        if holder.stdout is not None:
            holder.stdout.close()
    assert 0.05 < waited < 2.0, waited  # it did wait for the holder
    assert "waiting" not in capfd.readouterr().err


def _copy_of_the_build(tmp_path: Path) -> Path:
    assert _build.load(), _build.load_error()
    _build.autograd_module()
    src = _build.build_dir()
    dst = tmp_path / "kernels" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "normkit.lock"))
    return dst


def test_a_truncated_library_is_not_loaded(tmp_path: Path) -> None:
    """A library cut short (a build killed while linking, a full disk, a partial copy of the cache) killed
    every process that loaded it (SIGBUS, exit 135), ``normkit kernels build`` too. Only a library whose
    digest matches the one its build recorded is loaded: here, with building off, the norms run on the
    reference backend and say why."""
    dst = _copy_of_the_build(tmp_path)
    so = dst / "normkit_cpu.so"
    with open(so, "r+b") as f:
        f.truncate(so.stat().st_size // 3)
    code = textwrap.dedent(
        """
        import torch, normkit
        from normkit.kernels import _build
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
        y = normkit.nn.BatchNorm2d(6).double()(x)
        want = torch.nn.BatchNorm2d(6).double()(x)
        print("ok", _build.load(), float((y - want).abs().max()), _build.load_error())
        """
    )
    env = {**os.environ, "NORMKIT_CACHE": str(tmp_path), "NORMKIT_NO_BUILD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    ok, loaded, err, *why = out.stdout.split(maxsplit=3)
    assert ok == "ok" and loaded == "False" and float(err) < 1e-12, out.stdout
    assert "NORMKIT_NO_BUILD is set" in out.stdout and "no finished build" in out.stdout


def test_a_finished_build_loads_read_only_and_names_its_own_sources(tmp_path: Path) -> None:
    """A finished build is loaded without a lock, so a read-only cache (baked into an image) works (the
    lock file could not be opened: every norm fell back); its build names the source copied into the
    folder, so two installs of the same normkit sharing a cache do not rebuild for each other."""
    dst = _copy_of_the_build(tmp_path)
    built = _build.build_dir()
    assert str(built / "src" / "norm_cpu.cpp") in (built / "build.ninja").read_text()
    for p in sorted(dst.rglob("*"), reverse=True):
        p.chmod(p.stat().st_mode & 0o555)
    dst.chmod(0o555)
    try:
        code = (
            "from normkit.kernels import _build\nprint(_build.load(), _build.autograd_module() is not None)"
        )
        env = {**os.environ, "NORMKIT_CACHE": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        for p in [dst, *dst.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stdout + out.stderr[-2000:]
    assert "compiling" not in out.stderr


def test_a_failed_build_is_not_tried_again_by_each_process_until_the_compiler_changes(tmp_path: Path) -> None:
    """A build that failed was compiled again by every later process (each of ``normkit compare``'s
    workers, each test process: a compile error costs the whole compile each time). It is recorded in
    the build folder with the compiler and ninja it ran: a process with the same toolchain warns, naming
    the cause, and runs the reference backend (still correct); ``normkit kernels build`` tries again, and
    so does a process after the compiler changed."""
    cxx = tmp_path / "fake-c++"
    cxx.write_text(
        "#!/bin/sh\n"
        'case "$1" in --version|-v|-dumpversion) echo "g++ (GCC) 12.2.0"; exit 0;; esac\n'
        "echo 'fake-c++: error: this compiler always fails' >&2\nexit 1\n"
    )
    cxx.chmod(0o755)
    code = textwrap.dedent(
        """
        import warnings, torch, normkit
        from normkit.kernels import _build
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y = normkit.nn.BatchNorm2d(6).double()(x)
        want = torch.nn.BatchNorm2d(6).double()(x)
        print(float((y - want).abs().max()))
        print(" | ".join(str(m.message) for m in w if m.category is _build.KernelBuildWarning))
        """
    )
    env = {**os.environ, "NORMKIT_CACHE": str(tmp_path / "cache"), "CXX": str(cxx)}
    env.pop("NORMKIT_NO_BUILD", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args], env=env, capture_output=True, text=True, timeout=300)

    first = run(sys.executable, "-c", code)
    assert first.returncode == 0, first.stderr[-2000:]
    err, warned = first.stdout.splitlines()
    assert float(err) < 1e-12 and "could not be built" in warned and "always fails" in warned, first.stdout
    assert "compiling the fused CPU kernels" in first.stderr

    second = run(sys.executable, "-c", code)
    err, warned = second.stdout.splitlines()
    assert float(err) < 1e-12, second.stdout
    assert "compiling" not in second.stderr, second.stderr[-2000:]
    assert "an earlier build failed" in warned and "always fails" in warned, warned

    status = run(sys.executable, "-m", "normkit", "kernels", "status")
    assert "an earlier build failed with this compiler" in status.stdout, status.stdout

    explicit = run(sys.executable, "-m", "normkit", "kernels", "build")
    assert explicit.returncode != 0 and "compiling the fused CPU kernels" in explicit.stderr, explicit.stderr[
        -2000:
    ]

    os.utime(cxx, ns=(time.time_ns(), time.time_ns() + 10**9))  # an upgraded compiler
    after = run(sys.executable, "-c", code)
    assert "compiling the fused CPU kernels" in after.stderr, after.stderr[-2000:]
