"""Concurrency, determinism and size limits of the layers and their backends.

Every check compares with an independent oracle: the single-threaded run of the same code, ``torch.nn``,
or a float64 computation.

* Threads: one eval model shared by serving threads; model copies trained in threads; ``use()`` per
  thread; the first call, which loads (or builds) the C++ extension, made by four threads at once in a
  fresh process; NormMonitor and Batch Renorm's checkpoint state under threads. (That the kernels run
  without the GIL is a measurement: ``python benchmarks/gil_release.py``.)
* Processes: DataLoader workers (fork, spawn) calling the functional norms; a forked child using the
  kernels its parent loaded; Hogwild training of a ``share_memory()`` model in a spawned process.
* Thread counts 1, 2, 3 and ``torch.use_deterministic_algorithms(True)``: every sample, every CPU
  backend, bitwise equal from run to run and within float32 rounding of float64.
* Precision: data of mean 1e4 and std 1, every layer with a ``torch.nn`` counterpart, every CPU
  backend: normkit's error against float64 no worse than torch's.
* Size limits: counts above 2**24 (float32 accumulation, 2 GB); and (``slow``, deselected by default:
  ``python -m pytest -m slow tests/kernels/test_concurrency_limits.py``, 16 GB of free memory, about
  6 minutes) more than 2**31 elements (int32 index overflow) and one set of more than 2**31 values,
  each in a subprocess.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn
from normkit.kernels import _build
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample, run

_ROOT = Path(__file__).resolve().parents[2]


def _kernels_or_skip() -> None:
    if not _build.load():
        pytest.skip(f"the fused CPU kernels are not available here: {_build.load_error()}")


def _equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested tensors / dicts / lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _threads(fn: Callable[[int], Any], n: int = 4) -> list[Any]:
    """``fn(i)`` in ``n`` threads started together; the results (an exception is re-raised)."""
    out: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as e:  # (handed to the main thread)
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return out


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _bigger(s: Sample) -> Sample:
    """The sample at a size where the kernels split their work over threads (and over chunks)."""
    shape = list(s.shape)
    shape[0] = 8
    if s.name == "LayerNorm":
        shape = [64, 64, 7]
    elif s.name == "LayerNorm-2dims":
        shape = [128, 5, 7]
    elif s.name == "BatchNormalization-keras":
        shape = [8, 32, 32, 6]
    elif len(shape) >= 3:
        shape[2:] = [32] * (len(shape) - 2) if len(shape) <= 4 else [10] * (len(shape) - 2)
    return dataclasses.replace(s, shape=tuple(shape))


# ---- 1. threads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_a_shared_eval_model_serves_threads_with_the_single_thread_results(sample: Sample) -> None:
    """Four serving threads on one eval model: each output (and input gradient) is bitwise the one the
    same call gives on one thread."""
    m = sample.module(train=False)
    xs = [sample.input(seed=i) for i in range(4)]
    with torch.no_grad():
        want = [m(x) for x in xs]
    want_grad = [run(m, x)[1]["input"] for x in xs[:2]]

    def serve(t: int) -> list[bool]:
        ok = []
        for it in range(8):
            i = (t + it) % 4
            with torch.no_grad():
                ok.append(_equal(m(xs[i]), want[i]))
            if it < 2:  # grad-enabled inference (saliency, adversarial inputs): the input's gradient
                x = xs[it].detach().clone().requires_grad_()
                y = m(x)
                w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
                (g,) = torch.autograd.grad((y * w).sum(), x)
                ok.append(_equal(g, want_grad[it]))
        return ok

    assert all(all(r) for r in _threads(serve))


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_model_copies_trained_in_threads_match_the_single_thread_training(sample: Sample) -> None:
    """Four threads each train their own copy three steps: outputs, gradients and the final state are
    bitwise those of the same training on one thread."""
    xs = [sample.input(seed=i) for i in range(3)]
    # (built here: Sample.module seeds torch's global generator, which threads would interleave)
    copies = [sample.module(train=True) for _ in range(5)]

    def train(i: int) -> Any:
        m = copies[i]
        params = list(m.parameters())
        opt = torch.optim.SGD(params, lr=0.1) if params else None
        steps = []
        for x in xs:
            if opt is not None:
                opt.zero_grad()
            steps.append(run(m, x))
            if opt is not None:
                opt.step()
        return steps, _state(m)

    want = train(4)
    for got in _threads(train):
        assert _equal(got, want)


@pytest.mark.parametrize(
    "name", ["BatchNorm2d-cl", "GroupNorm", "LayerNorm", "InstanceNorm2d", "BatchNorm1d-3d", "LayerNorm2d-c"]
)
def test_threads_at_a_size_the_kernels_split_over_their_own_threads(name: str) -> None:
    """The same at sizes where each call runs ``parallel_for`` over several chunks (the intra-op pool
    shared by the serving threads): eval outputs and training copies bitwise as on one thread."""
    sample = _bigger(next(s for s in SAMPLES if s.name == name))
    m = sample.module(train=False)
    xs = [sample.input(seed=i) for i in range(2)]
    with torch.no_grad():
        want = [m(x) for x in xs]

    def serve(t: int) -> bool:
        with torch.no_grad():
            return all(_equal(m(xs[(t + i) % 2]), want[(t + i) % 2]) for i in range(3))

    assert all(_threads(serve))

    copies = [sample.module(train=True) for _ in range(5)]  # (built here: see above)

    def train(i: int) -> Any:
        return run(copies[i], xs[0]), _state(copies[i])

    want_train = train(4)
    assert all(_equal(got, want_train) for got in _threads(train))


def test_use_is_per_thread() -> None:
    """``normkit.kernels.use`` is documented as "a context manager, also per thread": a thread inside
    ``use("reference")`` leaves another thread on "auto" (the fused kernels, whose GroupNorm differs
    from the reference's in the last bits, which tells the two apart) and the main thread unchanged."""
    _kernels_or_skip()
    if normkit.kernels.current() != "auto":
        pytest.skip("NORMKIT_BACKEND sets another default backend here")
    x = torch.randn(8, 16, 20, 20, generator=torch.Generator().manual_seed(0)) * 3 + 2
    m = nkn.GroupNorm(4, 16).eval()
    with torch.no_grad():
        y_auto = m(x)
        with normkit.kernels.use("reference"):
            y_ref = m(x)
    assert not torch.equal(y_auto, y_ref)  # (else the check below tells nothing)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, tuple[str, bool]] = {}

    def a() -> None:
        with normkit.kernels.use("reference"):
            inside.set()
            done.wait(30)
            with torch.no_grad():
                seen["a"] = (normkit.kernels.current(), torch.equal(m(x), y_ref))

    def b() -> None:
        inside.wait(30)
        try:
            with torch.no_grad():
                seen["b"] = (normkit.kernels.current(), torch.equal(m(x), y_auto))
        finally:
            done.set()

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start()
    tb.start()
    ta.join()
    tb.join()
    assert seen == {"a": ("reference", True), "b": ("auto", True)}
    assert normkit.kernels.current() == "auto"


def test_norm_monitor_on_a_model_shared_by_threads_counts_every_call() -> None:
    """NormMonitor's hooks on one eval model called by four threads: every call is recorded once."""
    torch.manual_seed(0)
    net = nn.Sequential(nkn.BatchNorm2d(8), nn.ReLU(), nkn.GroupNorm(2, 8)).eval()
    x = torch.randn(4, 8, 6, 6)
    calls = 100
    with normkit.NormMonitor(net, power=False) as monitor:

        def serve(_: int) -> None:
            with torch.no_grad():
                for _ in range(calls):
                    net(x)

        _threads(serve)
    for name, rec in monitor.to_dict().items():
        assert rec["calls"] == 4 * calls, name
        assert len(monitor.records[name].history) == 4 * calls, name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_batch_renorm_under_checkpoint_in_threads_matches_one_thread(reentrant: bool) -> None:
    """Batch Renorm keeps each checkpointed forward's state for its recomputation (a deque per layer,
    found through torch's per-thread checkpoint hooks and graph task): four threads, each training its
    own checkpointed copy, get bitwise the single-thread gradients and final state."""
    xs = [
        (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 + 1).requires_grad_()
        for i in range(4)
    ]

    def train(_: int = 0) -> Any:
        m = nn.Sequential(nkn.BatchRenorm2d(3), nn.SiLU(), nkn.BatchRenorm2d(3))
        params = list(m.parameters())
        steps = []
        for x in xs:
            x = x.detach().clone().requires_grad_()
            for p in params:
                p.grad = None
            y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
            y.square().mean().backward()  # (reentrant checkpointing takes no autograd.grad)
            grads = [x.grad, *(p.grad for p in params)]
            steps.append(grads)
            with torch.no_grad():
                for p, g in zip(params, grads[1:]):
                    p -= 0.1 * g
        return steps, _state(m)

    want = train()
    assert all(_equal(got, want) for got in _threads(train))


_FIRST_CALL = textwrap.dedent(
    """
    import sys, threading
    import torch
    import normkit, normkit.nn as nkn
    from normkit.kernels import _build

    torch.manual_seed(0)
    x = torch.randn(8, 16, 32, 32)
    with normkit.kernels.use("reference"):  # (the reference builds and loads nothing)
        want_gn = normkit.functional.group_norm(x, 4)
        bn = nkn.BatchNorm2d(16)
        xr = x.clone().requires_grad_()
        want_y = bn(xr)
        want_y.square().sum().backward()
    assert not _build._state["loaded"] and not _build._state["tried"], _build._state
    barrier = threading.Barrier(4)
    out, errors = {}, []

    def work(i):
        try:
            barrier.wait()
            if i % 2:
                out[i] = normkit.functional.group_norm(x, 4)
            else:
                m = nkn.BatchNorm2d(16)
                xi = x.clone().requires_grad_()
                y = m(xi)
                y.square().sum().backward()
                out[i] = (y.detach(), xi.grad, m.running_var.clone())
        except BaseException as e:
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert _build._state["loaded"], _build.load_error()
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    for i in range(4):
        if i % 2:
            assert close(out[i], want_gn), i
        else:
            y, g, rv = out[i]
            assert close(y, want_y.detach()) and close(g, xr.grad) and close(rv, bn.running_var), i
    print("first-call threads ok", _build._autograd["module"] is not None)
    """
)


def _run_script(code: str, env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the subprocess ran past {timeout} s: {e.stderr}") from None
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NORMKIT_BACKEND", "NORMKIT_NO_BUILD")}
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_first_call_from_four_threads_loads_a_warm_cache_once(tmp_path: Path) -> None:
    """A fresh process whose first normkit calls come from four threads at once, on a finished build in
    the cache: the kernels load once, no thread sees a half-loaded module or fails, every result right."""
    _kernels_or_skip()
    _build.autograd_module()
    src = _build.build_dir()
    if Path(_build.lib()._name).parent != src:
        pytest.skip("the kernels' sources changed since this process loaded them: no finished build to copy")
    shutil.copytree(
        src, tmp_path / "kernels" / src.name, ignore=shutil.ignore_patterns("lock", "normkit.lock")
    )
    # NORMKIT_NO_BUILD: the copy must be loaded as is (a compile here would be a wrong cache folder)
    out = _run_script(_FIRST_CALL, _env(NORMKIT_CACHE=str(tmp_path), NORMKIT_NO_BUILD="1"), timeout=300)
    assert "first-call threads ok" in out
    assert "compiling" not in out


def _compiler_or_skip() -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja here: nothing to build")


@pytest.mark.slow
def test_first_call_from_four_threads_builds_an_empty_cache_once(tmp_path: Path) -> None:
    """The same in an empty cache (``NORMKIT_CACHE`` a fresh folder): one thread compiles (each extension
    once: no duplicate build racing in the same folder), the others wait for it, all results right.
    (About 90 s of compiling on 2 cores.)"""
    _compiler_or_skip()
    out = _run_script(_FIRST_CALL, _env(NORMKIT_CACHE=str(tmp_path)), timeout=800)
    assert "first-call threads ok" in out, out
    assert out.count("compiling the fused CPU kernels once") == 1, out
    assert out.count("compiling the fused layers' autograd node once") <= 1, out


# ---- 2. processes -------------------------------------------------------------------------------------

_PROCESSES = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader, Dataset
    import normkit
    import normkit.functional as NF
    import normkit.nn as nkn


    class Norms(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            x = torch.randn(4, 6, 9, 9, generator=torch.Generator().manual_seed(i)) * 3 + 5
            return torch.stack([
                NF.group_norm(x, 3),
                NF.layer_norm(x, (9,)),
                NF.batch_norm(x, None, None, training=True).output,
                NF.instance_norm(x).output,
                NF.layer_norm_2d(x),
            ])


    def forked_child(x, want, q):
        torch.set_num_threads(1)  # (as DataLoader's workers: torch's OpenMP pool does not survive a fork)
        q.put(bool(torch.equal(NF.group_norm(x, 8), want)))


    def model():
        torch.manual_seed(0)
        layers = [nkn.BatchNorm2d(8), torch.nn.SiLU(), nkn.GroupNorm(2, 8), nkn.LayerNorm2d(8)]
        return torch.nn.Sequential(*layers)


    def train(m, x, steps, threads):
        torch.set_num_threads(threads)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()


    if __name__ == "__main__":
        assert normkit.kernels._build.load(), normkit.kernels._build.load_error()
        want = torch.stack([Norms()[i] for i in range(6)])
        for ctx in ("fork", "spawn"):
            loader = DataLoader(Norms(), batch_size=2, num_workers=2, multiprocessing_context=ctx)
            got = torch.cat(list(loader))
            assert torch.equal(got, want), (ctx, (got - want).abs().max().item())
        # the kernels loaded (and run on 2 threads) in the parent, then used in a forked child
        x = torch.randn(8, 64, 32, 32)
        want_gn = NF.group_norm(x, 8)
        q = mp.get_context("fork").SimpleQueue()
        p = mp.get_context("fork").Process(target=forked_child, args=(x, want_gn, q))
        p.start()
        p.join(120)
        assert p.exitcode == 0 and q.get() is True, p.exitcode
        # Hogwild: a share_memory() model trained in a spawned process is the model trained here
        x = torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(3)) + 2
        shared, local = model(), model()
        shared.share_memory()
        threads = torch.get_num_threads()
        p = mp.get_context("spawn").Process(target=train, args=(shared, x, 4, threads))
        p.start()
        p.join(300)
        assert p.exitcode == 0, p.exitcode
        train(local, x, 4, threads)
        for (k, a), b in zip(shared.state_dict().items(), local.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k
        assert int(shared[0].num_batches_tracked) == 4
        print("processes ok")
    """
)


def test_dataloader_workers_forked_children_and_hogwild(tmp_path: Path) -> None:
    """DataLoader workers (fork and spawn) whose dataset calls the functional norms return what the main
    process computes; a child forked after the kernels were loaded and used computes with them
    correctly; a ``share_memory()`` model trained in a spawned process (Hogwild) ends as the same
    training in-process (its running statistics written into the shared buffers)."""
    _kernels_or_skip()
    script = tmp_path / "processes.py"
    script.write_text(_PROCESSES)
    out = subprocess.run(
        [sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0 and "processes ok" in out.stdout, out.stdout + out.stderr


# ---- 3. thread counts, determinism --------------------------------------------------------------------

_BACKENDS = ["auto", "reference", "native"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_thread_counts_and_deterministic_algorithms(sample: Sample, backend: str) -> None:
    """With ``torch.set_num_threads`` changed between calls (1, 2, 3 on the fused kernels, whose work split
    follows it; 1 and 3 on the torch-op backends) and ``torch.use_deterministic_algorithms(True)``
    (nothing raises or warns), a training step twice gives bitwise the same output, gradients and
    buffers, within float32 rounding of the same step in float64."""
    if backend == "auto":
        _kernels_or_skip()
    sample = _bigger(sample)
    x = sample.input()
    with normkit.kernels.use(backend):
        m64 = sample.module(train=True, dtype=torch.float64)
        y64, g64 = run(m64, x.double())
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        # (the fused kernels partition by the thread count; the other backends are torch ops: 1 and 3)
        for n in (1, 2, 3) if backend == "auto" else (1, 3):
            torch.set_num_threads(n)
            runs = []
            for _ in range(2):
                with normkit.kernels.use(backend):
                    m = sample.module(train=True)
                    runs.append((*run(m, x), _state(m)))
            assert _equal(runs[0], runs[1]), f"{n} threads: two runs differ"
            y, g, _ = runs[0]
            assert _rel(y, y64) < 1e-4, (n, _rel(y, y64))
            for k in g64:
                # (a parameter's gradient is a sum over the batch of terms that cancel: float32 sums
                # lose more there, torch.nn.LayerNorm's own dbias of this LayerNorm sample 2.6%)
                tol = 5e-4 if k == "input" else 3e-2
                assert _rel(g[k], g64[k]) < tol, (n, k, _rel(g[k], g64[k]))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# ---- 5. precision: large means -----------------------------------------------------------------------


class _Permuted(nn.Module):
    """torch's LayerNorm over C of an NCHW tensor (the oracle of LayerNorm2d)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class _Case:
    name: str
    ours: Callable[[], nn.Module]
    theirs: Callable[[], nn.Module]
    shape: tuple[int, ...]
    channels_last: bool = False

    @property
    def eval_differs(self) -> bool:
        return "Batch" in self.name or "tracked" in self.name


_CASES = [
    _Case("BatchNorm1d", lambda: nkn.BatchNorm1d(4), lambda: nn.BatchNorm1d(4), (4096, 4)),
    _Case("BatchNorm1d-3d", lambda: nkn.BatchNorm1d(4), lambda: nn.BatchNorm1d(4), (8, 4, 4096)),
    _Case("BatchNorm2d", lambda: nkn.BatchNorm2d(4), lambda: nn.BatchNorm2d(4), (8, 4, 64, 64)),
    _Case("BatchNorm2d-cl", lambda: nkn.BatchNorm2d(4), lambda: nn.BatchNorm2d(4), (8, 4, 64, 64), True),
    _Case("BatchNorm3d", lambda: nkn.BatchNorm3d(4), lambda: nn.BatchNorm3d(4), (4, 4, 16, 16, 16)),
    _Case("SyncBatchNorm", lambda: nkn.SyncBatchNorm(4), lambda: nn.BatchNorm2d(4), (8, 4, 64, 64)),
    _Case("GroupNorm", lambda: nkn.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (4, 4, 64, 64)),
    _Case("GroupNorm-cl", lambda: nkn.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (4, 4, 64, 64), True),
    _Case("GroupNorm-1set", lambda: nkn.GroupNorm(1, 4), lambda: nn.GroupNorm(1, 4), (2, 4, 256, 256)),
    _Case(
        "InstanceNorm1d",
        lambda: nkn.InstanceNorm1d(4, affine=True),
        lambda: nn.InstanceNorm1d(4, affine=True),
        (4, 4, 8192),
    ),
    _Case(
        "InstanceNorm2d",
        lambda: nkn.InstanceNorm2d(4, affine=True),
        lambda: nn.InstanceNorm2d(4, affine=True),
        (4, 4, 64, 64),
    ),
    _Case(
        "InstanceNorm2d-cl",
        lambda: nkn.InstanceNorm2d(4, affine=True),
        lambda: nn.InstanceNorm2d(4, affine=True),
        (4, 4, 64, 64),
        True,
    ),
    _Case(
        "InstanceNorm1d-tracked",
        lambda: nkn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
        (4, 4, 8192),
    ),
    _Case("LayerNorm", lambda: nkn.LayerNorm(16384), lambda: nn.LayerNorm(16384), (4, 16384)),
    _Case("LayerNorm-512k", lambda: nkn.LayerNorm(2**19), lambda: nn.LayerNorm(2**19), (2, 2**19)),
    _Case("LayerNorm-rows", lambda: nkn.LayerNorm(64), lambda: nn.LayerNorm(64), (512, 64)),
    _Case("LayerNorm2d", lambda: nkn.LayerNorm2d(64), lambda: _Permuted(64), (4, 64, 32, 32)),
    _Case(
        "LayerNorm2d-chw", lambda: nkn.LayerNorm2d(4, over="chw"), lambda: nn.GroupNorm(1, 4), (4, 4, 64, 64)
    ),
    _Case(
        "BatchNormAct2d-silu",
        lambda: nkn.BatchNormAct2d(4, activation="silu"),
        lambda: nn.Sequential(nn.BatchNorm2d(4), nn.SiLU()),
        (8, 4, 64, 64),
    ),
    _Case(
        "GroupNormAct2d-silu",
        lambda: nkn.GroupNormAct2d(4, num_groups=2, activation="silu"),
        lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()),
        (4, 4, 64, 64),
    ),
]

_MEAN = 1e4
# normkit's error may exceed torch's by this factor (rounding noise), or stay under the floor
_FACTOR, _FLOOR = 4.0, 2e-5


def _load_state(theirs: nn.Module, ours: nn.Module) -> None:
    """Copy ``ours``'s parameters and buffers into ``theirs`` (same order, reshaped)."""
    with torch.no_grad():
        for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
            a.copy_(b.reshape(a.shape))
        mine = {k.rsplit(".", 1)[-1]: v for k, v in ours.named_buffers()}
        for k, v in theirs.named_buffers():
            if k.rsplit(".", 1)[-1] in mine:
                v.copy_(mine[k.rsplit(".", 1)[-1]])


def _measure(m: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach().double(), "dx": x.grad.double()}
    for i, p in enumerate(m.parameters()):
        out[f"dparam{i}"] = p.grad.reshape(-1).double()
    for k, b in m.named_buffers():
        if b.is_floating_point():
            out[k.rsplit(".", 1)[-1]] = b.detach().double()
    return out


def _precision_params() -> list[Any]:
    params = []
    for case in _CASES:
        for backend in _BACKENDS:
            # (eval only where running statistics make it another computation)
            for train in (True, False) if case.eval_differs else (True,):
                mode = "train" if train else "eval"
                params.append(pytest.param(case, backend, train, id=f"{case.name}-{backend}-{mode}"))
    return params


@pytest.mark.parametrize(("case", "backend", "train"), _precision_params())
def test_large_mean_precision_no_worse_than_torch(case: _Case, backend: str, train: bool) -> None:
    """Float32 data of mean 1e4 and std 1 (one-pass float32 statistics lose the variance there): the
    output, every gradient and the running statistics, against float64, are within a factor of
    torch.nn's float32 error (or under a small floor)."""
    if backend == "auto":
        _kernels_or_skip()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(case.shape, generator=g, dtype=torch.float64) + _MEAN).float()
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    dy = torch.randn(case.shape, generator=g)
    torch.manual_seed(0)
    ours = case.ours().train(train)
    with torch.no_grad():
        for k, b in ours.named_buffers():
            if k.endswith("running_mean"):
                b.fill_(_MEAN)  # (eval: the statistics of the data)
    theirs = case.theirs().train(train)
    _load_state(theirs, ours)
    want = _measure(copy.deepcopy(theirs).double(), x.double(), dy.double())
    torch_err = {k: _rel(v, want[k]) for k, v in _measure(copy.deepcopy(theirs), x, dy).items()}
    with normkit.kernels.use(backend):
        got = _measure(copy.deepcopy(ours), x, dy)
    assert got.keys() == want.keys()
    worse = {
        k: (f"{_rel(got[k], want[k]):.1e}", f"torch {torch_err[k]:.1e}")
        for k in want
        if _rel(got[k], want[k]) > max(_FACTOR * torch_err[k], _FLOOR)
    }
    assert not worse, worse


def test_native_instance_norm_gradient_no_worse_than_torch_over_seeds() -> None:
    """The native backend's InstanceNorm (ATen's batch norm of the (1, N * C, S) view, as torch.nn runs
    it; GroupNorm's backward with G = C, which it ran before, had 20-45x torch's error here), summed over
    five seeds (no single draw decides it): against torch.nn.InstanceNorm2d, both float32, vs float64."""
    ours_err = theirs_err = 0.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64) + _MEAN).float()
        dy = torch.randn(x.shape, generator=g)
        theirs = nn.InstanceNorm2d(4, affine=True)
        want = _measure(copy.deepcopy(theirs).double(), x.double(), dy.double())
        t = _measure(theirs, x, dy)
        with normkit.kernels.use("native"):
            o = _measure(nkn.InstanceNorm2d(4, affine=True), x, dy)
        for k in ("dx", "dparam0"):
            theirs_err += _rel(t[k], want[k])
            ours_err += _rel(o[k], want[k])
    assert ours_err <= 2 * theirs_err, (ours_err, theirs_err)


# ---- 4. size limits (slow; subprocesses) ----------------------------------------------------------------


def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _memory_or_skip(gb: float, why: str) -> None:
    have = _available_gb()
    if have < gb:
        pytest.skip(f"needs {gb:.0f} GB of available memory ({why}); {have:.1f} GB available here")


_BIG = textwrap.dedent(
    """
    import sys, time
    import torch
    import normkit
    import normkit.nn as nkn

    CASE = sys.argv[1]
    DT = torch.bfloat16
    P = 1_000_003  # a prime period: an index wrapped at 2**31 or 2**32 reads another value
    EPS = 1e-5
    L = (1 << 30) + 8  # (1, 2, L): 2**31 + 16 values


    def pattern(shape):
        base = (torch.randn(P, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.25).to(DT)
        x = torch.empty(shape, dtype=DT)
        flat = x.view(-1)
        k = flat.numel() // P
        flat[: k * P].view(k, P).copy_(base.expand(k, P))
        flat[k * P :].copy_(base[: flat.numel() - k * P])
        return x


    def moments(v):  # float64 mean and biased variance of a 1-D view, in chunks (no big temporary)
        n, step = v.numel(), 1 << 24
        mean = sum(v[i : i + step].double().sum().item() for i in range(0, n, step)) / n
        m2 = sum(((v[i : i + step].double() - mean) ** 2).sum().item() for i in range(0, n, step))
        return mean, m2 / n


    def check(y, sets, positions, tol=2e-2):
        # sets: (values of the set as a 1-D view, flat index in y of the set's value j, weight, bias)
        worst = 0.0
        for v, where, w, b in sets:
            mean, var = moments(v)
            rstd = (var + EPS) ** -0.5
            n = v.numel()
            for j in sorted({p for p in positions(n) if 0 <= p < n}):
                want = (v[j].double().item() - mean) * rstd * w + b
                worst = max(worst, abs(y.view(-1)[where(j)].double().item() - want) / max(1.0, abs(want)))
        print(f"{CASE}: worst relative error {worst:.3g}", flush=True)
        assert worst < tol, worst


    def ends(n):
        return [0, 1, n // 2, n - 2, n - 1, (1 << 30) - 1, 1 << 30, (1 << 31) - 1, 1 << 31, (1 << 31) + 1]


    every = range
    t0 = time.time()
    with torch.no_grad():
        if CASE == "layer_norm_last_dim":  # 2 sets of 2**30 + 8
            x = pattern((1, 2, L))
            y = nkn.LayerNorm(L, elementwise_affine=False)(x)
            check(y, [(x[0, r], lambda j, r=r: r * L + j, 1.0, 0.0) for r in range(2)], ends)
        elif CASE == "group_norm_one_set":  # one set of 2**31 + 16 values
            x = pattern((1, 2, L))
            m = nkn.GroupNorm(1, 2)
            m.weight.fill_(2.0)
            m.bias.fill_(-0.5)
            y = m(x)
            check(y, [(x.view(-1), lambda j: j, 2.0, -0.5)], ends)
        elif CASE == "batch_norm_1d":  # 2 channels of 2**30 + 8, running statistics too
            x = pattern((1, 2, L))
            m = nkn.BatchNorm1d(2, affine=False)
            y = m(x)
            check(y, [(x[0, c], lambda j, c=c: c * L + j, 1.0, 0.0) for c in range(2)], ends)
            mean, var = moments(x[0, 1])
            assert abs(m.running_mean[1].item() - 0.1 * mean) < 1e-4
            assert abs(m.running_var[1].item() - (0.9 + 0.1 * var * L / (L - 1))) < 1e-4
        elif CASE == "batch_norm_one_channel":  # one channel of 2**31 + 8 values
            x = pattern((1, 1, (1 << 31) + 8))
            y = nkn.BatchNorm1d(1, affine=False)(x)
            check(y, [(x.view(-1), lambda j: j, 1.0, 0.0)], ends)
        elif CASE == "group_norm_small_planes":  # (2**21 + 1, 32, 32): sets of 128, 2**31 + 1024 values
            N = (1 << 21) + 1
            x = pattern((N, 32, 32))
            y = nkn.GroupNorm(8, 32, affine=False)(x)
            sets = [
                (x[n, 4 * g : 4 * g + 4].reshape(-1), lambda j, n=n, g=g: n * 1024 + g * 128 + j, 1.0, 0.0)
                for n in (0, N // 2, (1 << 21) - 1, N - 1)
                for g in (0, 7)
            ]
            check(y, sets, every)
        elif CASE == "instance_norm_channels_last":  # (2**17 + 1, 16, 32, 32) channels-last
            N = (1 << 17) + 1
            x = pattern((N, 32, 32, 16)).permute(0, 3, 1, 2)
            y = nkn.InstanceNorm2d(16)(x)
            assert y.is_contiguous(memory_format=torch.channels_last)
            sets = [
                (x[n, c].reshape(-1), lambda j, n=n, c=c: n * 16384 + j * 16 + c, 1.0, 0.0)
                for n in (0, N // 2, N - 1)
                for c in (0, 15)
            ]
            check(y.permute(0, 2, 3, 1), sets, every)
        elif CASE == "batch_norm_2d_channels_last":  # (2**17 + 1, 16, 32, 32) channels-last
            N = (1 << 17) + 1
            x = pattern((N, 32, 32, 16)).permute(0, 3, 1, 2)
            y = nkn.BatchNorm2d(16, affine=False)(x)
            sets = [
                (x[:, c].reshape(-1), lambda j, c=c: (j // 1024) * 16384 + (j % 1024) * 16 + c, 1.0, 0.0)
                for c in (0, 15)
            ]
            check(y.permute(0, 2, 3, 1), sets, ends)
        elif CASE == "layer_norm_rows":  # (2**24 + 1, 128)
            N = (1 << 24) + 1
            x = pattern((N, 128))
            y = nkn.LayerNorm(128, elementwise_affine=False)(x)
            rows = (0, 1, N // 2, (1 << 24) - 1, N - 1)
            sets = [(x[n], lambda j, n=n: n * 128 + j, 1.0, 0.0) for n in rows]
            check(y, sets, every)
        elif CASE.startswith("backward_"):
            # the fused backward with dy = x (no third 4 GiB tensor): then dweight = n var rstd,
            # dbias = n mean and dx = w x_hat eps / (var + eps), exactly
            x = pattern((1, 2, L))
            if CASE == "backward_layer_norm":
                dims, w, b, sets = (2,), None, None, [(x[0, r], r * L, 1.0) for r in range(2)]
            elif CASE == "backward_batch_norm":
                w = torch.tensor([0.5, 2.0]).reshape(1, 2, 1)
                b = torch.tensor([0.1, -0.2]).reshape(1, 2, 1)
                dims, sets = (0, 2), [(x[0, c], c * L, w.view(-1)[c].item()) for c in range(2)]
            else:  # backward_group_norm: one set of 2**31 + 16
                x = x.view(1, 1, 2, L)
                dims, w, b, sets = (2, 3), None, None, [(x.view(-1), 0, 1.0)]
            assert normkit.kernels.plan(x, dims, w, b) is not None
            y, stats = normkit.kernels.norm_forward(x, w, b, None, dims, EPS)
            del y
            needs = (True, w is not None, b is not None)
            dx, dw, db = normkit.kernels.norm_backward(x, x, w, b, None, stats, dims, needs)
            for c, (v, base, wc) in enumerate(sets):
                n = v.numel()
                mean, var = moments(v)
                rstd = (var + EPS) ** -0.5
                if dw is not None:
                    assert abs(dw.view(-1)[c].item() / (n * var * rstd) - 1) < 1e-4, "dweight"
                    assert abs(db.view(-1)[c].item() / (n * mean) - 1) < 1e-4, "dbias"
                worst = 0.0
                for j in {p for p in ends(n) if 0 <= p < n}:
                    want = wc * (v[j].double().item() - mean) * rstd * EPS / (var + EPS)
                    worst = max(worst, abs(dx.view(-1)[base + j].double().item() - want))
                print(f"{CASE}: dx worst absolute error {worst:.3g} (values about {EPS / (var + EPS):.1e})")
                assert worst < 2e-6, worst
        else:
            raise SystemExit(f"unknown case {CASE}")
    print(CASE, "ok", f"{time.time() - t0:.0f} s", flush=True)
    """
)

_BIG_CASES = [
    "layer_norm_last_dim",
    "group_norm_one_set",
    "batch_norm_1d",
    "batch_norm_one_channel",
    "group_norm_small_planes",
    "instance_norm_channels_last",
    "batch_norm_2d_channels_last",
    "layer_norm_rows",
    "backward_layer_norm",
    "backward_batch_norm",
    "backward_group_norm",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _BIG_CASES)
def test_more_than_2_31_elements(case: str) -> None:
    """bfloat16 inputs of more than 2**31 elements (an int32 index wraps: a wrong value or a segfault) and
    sets of more than 2**31 values, through the fused CPU kernels (the default backend), forward and
    backward, against a chunked float64 oracle at sampled positions: both ends of every checked set,
    around 2**30 and 2**31, and the last element. About 9 GB each, in a subprocess (a segfault fails
    the test instead of the run); up to about 2 minutes each on 2 cores."""
    _memory_or_skip(16, "a 4 GiB bfloat16 input, its 4 GiB output and the oracle's chunks: about 9 GB")
    _kernels_or_skip()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _BIG, case], env=_env(), capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{case}: ran past 600 s: {e.stderr}") from None
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{case}: exit {res.returncode} (a negative code is a signal)\n{out}"
    assert f"{case} ok" in out, out


_COUNT = textwrap.dedent(
    """
    import torch, normkit, normkit.nn as nkn

    n = 2**25 + 3  # a count float32 cannot hold, above 2**24 (float32 sums stop counting there)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=g, dtype=torch.float64) + 1e3).float()
    dy = torch.randn(n, generator=g)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()

    def measure(m, x, dy):
        x = x.reshape(1, 1, n).clone().requires_grad_()
        y = m(x)
        y.backward(dy.reshape(1, 1, n).to(y.dtype))
        return [y.detach().double(), x.grad.double(), m.weight.grad.double(), m.running_mean.double(),
                m.running_var.double()]

    want = measure(torch.nn.BatchNorm1d(1).double(), x.double(), dy.double())
    theirs = [rel(a, b) for a, b in zip(measure(torch.nn.BatchNorm1d(1), x, dy), want)]
    bad = []
    for backend in ("auto", "reference", "native"):
        with normkit.kernels.use(backend):
            ours = [rel(a, b) for a, b in zip(measure(nkn.BatchNorm1d(1), x, dy), want)]
        for name, o, t in zip(("y", "dx", "dweight", "running_mean", "running_var"), ours, theirs):
            if o > max(4 * t, 2e-6):
                bad.append(f"{backend} {name}: {o:.1e} (torch {t:.1e})")
    assert not bad, bad
    print("count ok")
    """
)


def test_batch_norm_over_more_than_2_24_values_no_worse_than_torch() -> None:
    """BatchNorm over one channel of 2**25 + 3 values of mean 1e3 (float32 accumulators stop counting at
    2**24): output, gradients and running statistics against float64, every CPU backend within a
    factor of torch's error. About 2 GB, in a subprocess."""
    _memory_or_skip(4, "2**25 values in float32 and float64 with their gradients: about 2 GB")
    out = _run_script(_COUNT, _env(), timeout=600)
    assert "count ok" in out
