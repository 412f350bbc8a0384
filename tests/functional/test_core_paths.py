"""The core's two forward paths: the unscaled eager CPU path and the branch-free scaled path.

``normkit.ops.core.norm_forward`` tries the unscaled path (shift by one element per set) in plain
eager CPU calls and falls back to the scaled path where a set needs it. Both must give the float64
oracle's answer, on ordinary data and at the extremes, forward and backward; and the fallback must
really be taken where the unscaled path alone would be wrong.
"""

from __future__ import annotations

import pytest
import torch

from normkit.ops import core
from tests.reference import ref_group_norm


def _scaled_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "_fast_path_allowed", lambda x, mask: False)


def _x(scale: float, offset: float = 0.0, seed: int = 0, shape=(4, 6, 5, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.randn(shape, generator=g, dtype=torch.float64) * scale).float()


CASES = [  # (scale, offset, eps)
    (1.0, 0.0, 1e-5),
    (1e-2, 1e4, 1e-5),  # the README's large-offset example
    (1e-2, 1e4, 0.0),
    (1e30, 0.0, 1e-5),  # squares overflow fp32: needs the scale
    (1e-30, 0.0, 0.0),  # squares underflow and eps does not dominate: needs the scale
    (1e-30, 0.0, 1e-5),  # eps dominates: the unscaled path is exact enough
    (3e37, 0.0, 1e-5),
]


@pytest.mark.parametrize("scale, offset, eps", CASES)
@pytest.mark.parametrize("dims", [(0, 2, 3), (1, 2, 3), (2, 3)], ids=["bn", "ln", "in"])
def test_both_paths_match_the_float64_oracle(monkeypatch, scale, offset, eps, dims):
    x = _x(scale, offset)
    w = torch.rand(1, 6, 1, 1) + 0.5
    b = torch.randn(1, 6, 1, 1)
    fast, fast_stats = core.norm_forward(x, w, b, None, dims, eps)
    with monkeypatch.context() as m:
        _scaled_only(m)
        scaled, scaled_stats = core.norm_forward(x, w, b, None, dims, eps)
    xd = x.double()
    mean = xd.mean(dims, keepdim=True)
    var = (xd - mean).square().mean(dims, keepdim=True)
    want = (xd - mean) / torch.sqrt(var + eps) * w.double() + b.double()
    for y in (fast, scaled):
        assert bool(torch.isfinite(y).all())
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    for stats in (fast_stats, scaled_stats):
        got_mean, got_var = core.mean_var(stats)
        # the mean to fp32 precision, and to 1e-6 of the spread (exact centring, even at an offset of 1e4)
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-6 * float(var.sqrt().max()))
        if 1e-18 < scale < 1e18:  # the variance itself fits in fp32
            torch.testing.assert_close(got_var.double(), var, rtol=1e-4, atol=0.0)


# The gradient's entries scale like 1 / std: cases where that is outside fp32 are left to the
# forward tests above.
GRAD_CASES = [c for c in CASES if c[0] < 1e20 and not (c[0] < 1e-20 and c[2] == 0.0)]


def _check_group_norm_grads(forward, scale: float, offset: float, eps: float) -> None:
    """GroupNorm(2) over 6 channels: ``forward(x, w, eps) -> stats`` (on the (N, G, C/G, H, W)
    view), then :func:`core.norm_backward` from those statistics, against float64 autograd."""
    x = _x(scale, offset, seed=3)
    w = torch.rand(1, 6, 1, 1, dtype=torch.float64) + 0.5
    dy = torch.randn(x.shape, dtype=torch.float64)
    xd = x.double().requires_grad_(True)
    wd = w.clone().requires_grad_(True)
    ref = ref_group_norm(xd, 2, wd.view(6), None, eps)
    want_dx, want_dw = torch.autograd.grad(ref, (xd, wd), dy)
    xv = x.view(4, 2, 3, 5, 5)
    wv = w.float().view(1, 2, 3, 1, 1)
    stats = forward(xv, wv, eps)
    dx, dw, _ = core.norm_backward(
        dy.float().view_as(xv), xv, wv, None, None, stats, (2, 3, 4), (True, True, False)
    )
    assert dx is not None and dw is not None
    # compare relative to the gradient's own size (its entries scale like 1 / std)
    size = want_dx.abs().max()
    torch.testing.assert_close(dx.view_as(x).double() / size, want_dx / size, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(dw.view(6).double(), want_dw.view(6), rtol=1e-4, atol=1e-4)


def _forward_stats(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return core.norm_forward(x, w, None, None, (2, 3, 4), eps)[1]


@pytest.mark.parametrize("scale, offset, eps", GRAD_CASES)
def test_backward_from_either_path_matches_the_float64_oracle(monkeypatch, scale, offset, eps):
    _check_group_norm_grads(_forward_stats, scale, offset, eps)
    with monkeypatch.context() as m:
        _scaled_only(m)
        _check_group_norm_grads(_forward_stats, scale, offset, eps)


def test_fallback_is_taken_exactly_where_the_unscaled_path_fails(monkeypatch):
    calls = []
    real = core._scale_shift

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(core, "_scale_shift", spy)
    core.norm_forward(_x(1.0), None, None, None, (0, 2, 3), 1e-5)
    core.norm_forward(_x(1e-2, 1e4), None, None, None, (0, 2, 3), 1e-5)
    core.norm_forward(_x(1e-30), None, None, None, (0, 2, 3), 1e-5)  # eps dominates
    assert calls == []
    y, _ = core.norm_forward(_x(1e30), None, None, None, (0, 2, 3), 1e-5)
    assert calls == [1] and bool(torch.isfinite(y).all())
    y, _ = core.norm_forward(torch.tensor([[[3e38, -3e38, 1.0, 2.0]]]), None, None, None, (2,), 1e-5)
    assert calls == [1, 1] and bool(torch.isfinite(y).all())
    y, _ = core.norm_forward(_x(1e-30), None, None, None, (0, 2, 3), 0.0)
    assert calls == [1, 1, 1] and bool(torch.isfinite(y).all())


def test_scaled_path_runs_wherever_data_dependent_flow_is_not_allowed():
    x = _x(1.0)
    assert core._fast_path_allowed(x, None)
    assert not core._fast_path_allowed(x, torch.ones_like(x, dtype=torch.bool))
    assert not core._fast_path_allowed(x.to("meta"), None)
    seen = []

    def f(t):
        seen.append(core._fast_path_allowed(t, None))
        return core.norm_forward(t, None, None, None, (1,), 1e-5)[0]

    torch.func.vmap(f)(torch.randn(3, 4, 5))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        f(mode.from_tensor(torch.randn(4, 5)))
    assert seen == [False, False]


def test_moments_compile_fullgraph_equals_eager():
    # Dynamo traces moments() itself (no op boundary): it must take the branch-free path, unbroken.
    from normkit.ops import moments

    def f(x):
        m = moments(x, (0, 2, 3))
        return m.mean, m.var

    x = _x(1.0, 1e4)
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    for got, want in zip(torch.compile(f, fullgraph=True)(x), f(x)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# norm_forward_fused: the statistics Inductor reads the input once for (normkit.ops._inductor).


@pytest.fixture(params=["welford", "two_pass"])
def moments(request, monkeypatch):
    """Each test of the fused statistics twice: with torch.var_mean (Welford, in generated code) and
    with the two-pass sums GPUs take for half-precision inputs (here forced for every input)."""
    monkeypatch.setattr(core, "two_pass_moments", lambda x: request.param == "two_pass")
    return request.param


@pytest.mark.parametrize("scale, offset, eps", CASES)
@pytest.mark.parametrize("dims", [(0, 2, 3), (1, 2, 3), (2, 3)], ids=["bn", "ln", "in"])
def test_one_read_statistics_match_the_float64_oracle(moments, scale, offset, eps, dims):
    x = _x(scale, offset)
    w = torch.rand(1, 6, 1, 1) + 0.5
    b = torch.randn(1, 6, 1, 1)
    y, stats = core.norm_forward_fused(x, w, b, None, dims, eps)
    xd = x.double()
    mean = xd.mean(dims, keepdim=True)
    var = (xd - mean).square().mean(dims, keepdim=True)
    want = (xd - mean) / torch.sqrt(var + eps) * w.double() + b.double()
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    got_mean, got_var = core.mean_var(stats)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-6 * float(var.sqrt().max()))
    if 1e-18 < scale < 1e18:
        torch.testing.assert_close(got_var.double(), var, rtol=1e-4, atol=0.0)


def test_one_read_statistics_take_the_wide_moments_only_where_the_plain_ones_overflow(moments):
    """A set whose squared deviations leave float32 (1e30, and values of both signs near the float32
    maximum, whose difference itself overflows) takes the moments of x * 2^-96; others keep the
    moments of x - x0 (the saved inverse scale says which)."""
    x = torch.stack([_x(1.0, shape=(6, 5, 5)), _x(1e30, shape=(6, 5, 5)), _x(1e-2, 1e4, shape=(6, 5, 5))])
    y, stats = core.norm_forward_fused(x, None, None, None, (1, 2, 3), 1e-5)
    assert stats[core._INV].flatten().tolist() == [1.0, 2.0**-96, 1.0]
    xd = x.double()
    var = xd.var((1, 2, 3), keepdim=True, correction=0)
    want = (xd - xd.mean((1, 2, 3), keepdim=True)) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    edge = torch.tensor([[[3e38, -3e38, 1.0, 2.0]]])
    y, stats = core.norm_forward_fused(edge, None, None, None, (2,), 1e-5)
    ed = edge.double()
    want = (ed - ed.mean(2, keepdim=True)) / ed.std(2, keepdim=True, correction=0)
    assert float(stats[core._INV]) == 2.0**-96
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_one_read_statistics_in_float64_keep_float64(moments):
    """float64 sets, ordinary and wide (1e200: squares beyond float64), to float64 rounding: the
    per-set selection and eps stay in float64 (a Python scalar in a ``where`` would be float32)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=g, dtype=torch.float64) * 3e-3
    x[1] *= 1e203
    x[2] += 1e6
    y, stats = core.norm_forward_fused(x, None, None, None, (1,), 1e-5)
    assert stats.dtype == torch.float64
    assert stats[core._INV].flatten().tolist() == [1.0, 2.0**-768, 1.0]
    small = x.clone()
    small[1] *= 1e-203  # (the oracle's own squares would overflow; eps is nothing next to that set)
    var = small.var(1, keepdim=True, correction=0)
    want = (small - small.mean(1, keepdim=True)) / torch.sqrt(
        var + torch.tensor([[1e-5], [0.0], [1e-5]], dtype=torch.float64)
    )
    torch.testing.assert_close(y[:2], want[:2], rtol=1e-12, atol=1e-12)
    # (the 1e6 offset: float64's own rounding of x, 1e-10, is 3e-8 of the spread; the exact path)
    torch.testing.assert_close(y, core.norm_forward(x, None, None, None, (1,), 1e-5)[0], rtol=0, atol=1e-14)
    mean, got_var = core.mean_var(stats)
    torch.testing.assert_close(mean[0], x[0].mean(0, keepdim=True), rtol=1e-13, atol=1e-17)
    torch.testing.assert_close(got_var[0], var[0], rtol=1e-12, atol=0.0)


def test_one_read_statistics_of_a_wide_set_with_an_outlier_first(moments):
    """A wide set (1e30) whose first value, the shift, is its outlier: the wide moments are
    centred (Welford or a two-pass), not one-pass sums about that value, whose cancellation grows
    with the set's size (it was off by 0.6 at 32768 values compiled)."""
    g = torch.Generator().manual_seed(6)
    x = 1e30 + 1e27 * torch.randn(1, 32768, generator=g, dtype=torch.float64)
    x[0, 0] = -1e30
    xf = x.float()
    compiled = torch.compile(lambda t: core.norm_forward_fused(t, None, None, None, (1,), 1e-5)[0])
    xd = xf.double()
    var = xd.var(1, keepdim=True, correction=0)
    want = (xd - xd.mean(1, keepdim=True)) / torch.sqrt(var)
    for y in (core.norm_forward_fused(xf, None, None, None, (1,), 1e-5)[0], compiled(xf)):
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-3)  # |y| up to 181


def test_one_read_statistics_leave_masks_and_a_tiny_eps_to_the_scaled_path(monkeypatch):
    calls = []
    real = core.norm_forward
    monkeypatch.setattr(core, "norm_forward", lambda *a: calls.append(a[-1]) or real(*a))
    x = _x(1e-30)
    core.norm_forward_fused(x, None, None, None, (1, 2, 3), 1e-5)
    assert calls == []
    y, _ = core.norm_forward_fused(x, None, None, None, (1, 2, 3), 0.0)  # squares underflow, eps = 0
    assert calls == [0.0] and bool(torch.isfinite(y).all())
    core.norm_forward_fused(_x(1.0), None, None, torch.ones(4, 6, 5, 5, dtype=torch.bool), (1, 2, 3), 1e-5)
    assert calls == [0.0, 1e-5]


@pytest.mark.parametrize("scale, offset, eps", [c for c in GRAD_CASES if c[2] > 0] + [(1e30, 0.0, 1e-5)])
def test_backward_from_one_read_statistics_matches_the_float64_oracle(moments, scale, offset, eps):
    """The backward as Inductor traces it (no in-place ops) from the one-read statistics, a wide set
    included (1e30: squared deviations overflow float32; its gradient, like 1 / std, still fits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Traced(TorchDispatchMode):  # core._tracing() is true under a dispatch mode, as in Inductor
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return core.norm_forward_fused(x, w, None, None, (2, 3, 4), eps)[1]

    with Traced():  # forward and backward as traced (the backward's branch without in-place ops)
        _check_group_norm_grads(forward, scale, offset, eps)


def test_two_pass_moments_are_for_half_precision_inputs_off_the_cpu(monkeypatch):
    """GPUs' generated code takes the two-pass moments for bfloat16 / float16 only; the CPU keeps
    Welford's for every dtype (``core.WELFORD_DEVICES``). A meta tensor stands for a GPU one."""

    def on(device: str, dtype: torch.dtype) -> bool:
        return core.two_pass_moments(torch.empty(2, dtype=dtype, device=device))

    assert [on("meta", d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] == [
        True, True, False, False,
    ]  # fmt: skip
    assert not any(on("cpu", d) for d in (torch.bfloat16, torch.float16, torch.float32))
    monkeypatch.setattr(core, "WELFORD_DEVICES", set())
    assert on("cpu", torch.bfloat16) and not on("cpu", torch.float32)


def test_a_wide_sets_variance_is_finite_where_it_fits_float32(moments):
    """A set that takes the wide moments (its squared deviations from its first value overflow
    float32) but whose variance fits float32 (3e36): ``mean_var`` gives it, not inf (the scale's
    square, 2^192, does not fit float32 itself)."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(1, 4096)
    x[0, 0] = -2.0e19
    x[0, 1:20] = 2.0e19
    x[0, 20:] = torch.randn(4076, generator=g) * 1e18
    xd = x.double()
    want = (xd - xd.mean(1, keepdim=True)) / xd.std(1, keepdim=True, correction=0)
    fused = lambda t: core.norm_forward_fused(t, None, None, None, (1,), 1e-5)  # noqa: E731
    scales = []
    for y, stats in (fused(x), torch.compile(fused)(x)):  # (eager CPU var_mean sums in float64)
        scales.append(float(stats[core._INV]))
        mean, var = core.mean_var(stats)
        torch.testing.assert_close(var.double(), xd.var(1, keepdim=True, correction=0), rtol=1e-5, atol=0.0)
        torch.testing.assert_close(mean.double(), xd.mean(1, keepdim=True), rtol=0.0, atol=1e13)  # (std 2e18)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert scales[1] == 2.0**-96  # (the compiled code's float32 sums overflow: the wide moments)
