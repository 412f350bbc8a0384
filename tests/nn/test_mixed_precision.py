"""Mixed-precision training as a user runs it: autocast, whole-model casts, mixed dtypes, GradScaler,
extreme values per dtype, and half-precision layouts.

The oracle is torch.nn (same weights, same dtype setting) or a float64 closed form written here; normkit is
never compared with itself. Accuracy is "max |error| / max |reference|" against float64, and where torch.nn
has a twin normkit must be at least as accurate as torch in the same setting (within a small floor).

The last section holds the defects a mixed-precision audit found (each test failed before its fix): float16
buffers that skipped or double-rounded a finite update, Ghost BN writing inf into float16 buffers, Proxy
Norm's half-parameter gradients rounded twice, and the Keras layer's missing dtype check.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

import normkit
import normkit.nn as nkn

F64 = torch.float64
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# accuracy floors (relative to the max of the reference) for "at least as accurate as torch"
FLOOR = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def perturb(m: nn.Module, seed: int = 7) -> nn.Module:
    """Non-trivial affine parameters and running statistics (every term matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(m.named_parameters()) + list(m.named_buffers()):
            if not p.is_floating_point() or "proxy_points" in name:
                continue
            noise = torch.rand(p.shape, generator=g, dtype=F64).to(p.dtype)
            if name.endswith(("running_var", "moving_variance")):
                p.copy_(0.5 + noise)
            else:
                p.add_(0.3 * (noise - 0.5))
    return m


def randn(shape: tuple[int, ...], seed: int = 1, scale: float = 1.5, shift: float = 0.3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale + shift


def forward_backward(
    m: Callable[[Tensor], Tensor], x: Tensor, params: nn.Module
) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and the gradients of a fixed weighted sum (float64 weights) w.r.t. the input and parameters."""
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    (y.double() * w).sum().backward()
    grads = {"input": x.grad}
    grads.update({k: p.grad for k, p in params.named_parameters() if p.grad is not None})
    return y.detach(), grads


class _Perm(nn.Module):
    """torch.nn.LayerNorm over the channel dim of (N, C, *S): LayerNorm2d's torch twin."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.movedim(1, -1)).movedim(-1, 1)


class _Act(nn.Module):
    def __init__(self, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm, self.act = norm, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(x))


def _loaded(twin: nn.Module, nk: nn.Module) -> nn.Module:
    """``twin`` (a torch.nn module) holding ``nk``'s parameters and buffers."""
    inner = twin.ln if isinstance(twin, _Perm) else twin.norm if isinstance(twin, _Act) else twin
    inner.load_state_dict(nk.state_dict())
    return twin


# name: (normkit layer, its torch.nn twin built and loaded from a normkit layer, input shape)
TWINS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], nn.Module], tuple[int, ...]]] = {
    "bn1d-2D": (lambda: nkn.BatchNorm1d(6), lambda m: _loaded(nn.BatchNorm1d(6), m), (16, 6)),
    "bn1d-3D": (lambda: nkn.BatchNorm1d(6), lambda m: _loaded(nn.BatchNorm1d(6), m), (8, 6, 7)),
    "bn2d": (lambda: nkn.BatchNorm2d(6), lambda m: _loaded(nn.BatchNorm2d(6), m), (4, 6, 5, 5)),
    "bn3d": (lambda: nkn.BatchNorm3d(4), lambda m: _loaded(nn.BatchNorm3d(4), m), (2, 4, 3, 3, 3)),
    "syncbn": (lambda: nkn.SyncBatchNorm(6), lambda m: _loaded(nn.BatchNorm2d(6), m), (4, 6, 5, 5)),
    "in2d-tracked": (
        lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        lambda m: _loaded(nn.InstanceNorm2d(6, affine=True, track_running_stats=True), m),
        (4, 6, 5, 5),
    ),
    "gn": (lambda: nkn.GroupNorm(3, 6), lambda m: _loaded(nn.GroupNorm(3, 6), m), (4, 6, 5, 5)),
    "ln": (lambda: nkn.LayerNorm(7), lambda m: _loaded(nn.LayerNorm(7), m), (4, 5, 7)),
    "ln2d": (lambda: nkn.LayerNorm2d(6), lambda m: _loaded(_Perm(6), m), (4, 6, 5, 5)),
    "bnact-relu": (
        lambda: nkn.BatchNormAct2d(6, activation="relu"),
        lambda m: _loaded(_Act(nn.BatchNorm2d(6), nn.ReLU()), m),
        (4, 6, 5, 5),
    ),
    "gnact-silu": (
        lambda: nkn.GroupNormAct2d(6, num_groups=2, activation="silu"),
        lambda m: _loaded(_Act(nn.GroupNorm(2, 6), nn.SiLU()), m),
        (4, 6, 5, 5),
    ),
}
TWIN_IDS = list(TWINS)


def _pre_layer(shape: tuple[int, ...]) -> nn.Module:
    """What runs before the norm in the model: a conv (cast to half by autocast) or a linear layer."""
    torch.manual_seed(3)
    if len(shape) <= 3:
        return nn.Linear(shape[-1], shape[-1])
    conv = {4: nn.Conv2d, 5: nn.Conv3d}[len(shape)]
    return conv(shape[1], shape[1], 1)


def _twin_pair(name: str, train: bool) -> tuple[nn.Module, nn.Module, Tensor]:
    make, make_twin, shape = TWINS[name]
    nk = perturb(make())
    tw = make_twin(nk)
    return nk.train(train), tw.train(train), randn(shape).float()


# ---- 1. autocast around pre-layer -> norm -> relu ----------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", TWIN_IDS)
def test_autocast_model_matches_torch(name: str, dtype: torch.dtype, train: bool) -> None:
    """pre-layer -> norm -> ReLU under CPU autocast: output and gradient dtypes as torch.nn's, float32
    buffers, and every output, gradient and running statistic at least as accurate (vs the float64 model)
    as torch.nn's twin in the same autocast setting."""
    nk, tw, x = _twin_pair(name, train)
    pre = _pre_layer(x.shape)
    res = {}
    for lab, norm in (("nk", nk), ("tc", tw), ("ref", copy.deepcopy(nk))):
        model = nn.Sequential(copy.deepcopy(pre), norm, nn.ReLU()).train(train)
        xin = x
        if lab == "ref":
            model, xin = model.double(), x.double()
        with torch.autocast("cpu", dtype=dtype, enabled=lab != "ref"):
            mid = model[1](model[0](xin))
            y, grads = forward_backward(model, xin, model)
        bufs = [b for b in model[1].buffers() if b.is_floating_point()]
        res[lab] = (mid, y, grads, bufs)
    (nmid, ny, ng, nb), (tmid, ty, tg, tb), (_, ry, rg, rb) = res["nk"], res["tc"], res["ref"]
    assert nmid.dtype == tmid.dtype == dtype  # the norm's output keeps the autocast dtype, as torch's does
    assert ny.dtype == ty.dtype
    assert len(ng) == len(tg)
    for (k, g), gt in zip(ng.items(), tg.values()):
        assert g.dtype == gt.dtype == torch.float32, k
    assert [b.dtype for b in nb] == [b.dtype for b in tb] == [torch.float32] * len(nb)
    floor = FLOOR[dtype]
    assert rel_err(ny, ry) <= 1.5 * rel_err(ty, ry) + floor
    for (k, g), gt in zip(ng.items(), tg.values()):
        assert rel_err(g, rg[k]) <= 1.5 * rel_err(gt, rg[k]) + floor, k
    for b, bt, br in zip(nb, tb, rb):
        assert rel_err(b, br) <= 1.5 * rel_err(bt, br) + 1e-6
        torch.testing.assert_close(b, bt, rtol=1e-5, atol=1e-6)


def _bn_f64(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    rm: Tensor | None,
    rv: Tensor | None,
    train: bool,
    eps: float,
) -> Tensor:
    return Fn.batch_norm(
        x.double(),
        None if rm is None else rm.double().clone(),
        None if rv is None else rv.double().clone(),
        None if w is None else w.double(),
        None if b is None else b.double(),
        training=train,
        eps=eps,
    )


def _proxy_f64(
    y: Tensor,
    w: Tensor,
    b: Tensor,
    pb: Tensor,
    pw: Tensor,
    act: Callable[[Tensor], Tensor],
    eps: float,
    n: int = 200,
) -> Tensor:
    """Proxy Norm's activation in float64, from its definition (Labatie et al. 2021)."""
    i = torch.arange(n, dtype=F64)
    u = math.sqrt(2.0) * torch.erfinv(2.0 * (i + 0.5) / n - 1.0)
    w, b, pb, pw = (t.double() for t in (w, b, pb, pw))
    zp = act(w[:, None] * ((1.0 + pw)[:, None] * u[None, :] + pb[:, None]) + b[:, None])
    m = zp.mean(1)
    v = (zp - m[:, None]).square().mean(1)
    view = (1, -1) + (1,) * (y.dim() - 2)
    return (act(w.view(view) * y.double() + b.view(view)) - m.view(view)) / torch.sqrt(v.view(view) + eps)


def _ghost_f64(m: nkn.GhostBatchNorm2d):
    def f(x: Tensor) -> Tensor:
        if not m.training:
            return _bn_f64(x, m.weight, m.bias, m.running_mean, m.running_var, False, m.eps)
        chunks = x.split(m.ghost_batch_size)
        return torch.cat([_bn_f64(c, m.weight, m.bias, None, None, True, m.eps) for c in chunks])

    return f


# normkit layers without a torch twin: (layer, float64 closed form on the layer's current parameters, shape)
ORACLES = {
    "ghost-bn": (lambda: nkn.GhostBatchNorm2d(6, ghost_batch_size=2), _ghost_f64, (4, 6, 5, 5)),
    "frozen-bn": (
        lambda: nkn.FrozenBatchNorm2d(6),
        lambda m: lambda x: _bn_f64(x, m.weight, m.bias, m.running_mean, m.running_var, False, m.eps),
        (4, 6, 5, 5),
    ),
    "mean-only-bn": (
        lambda: nkn.MeanOnlyBatchNorm(6),
        lambda m: (
            lambda x: (
                x.double()
                - (
                    x.double().mean((0, 2, 3), keepdim=True)
                    if m.training
                    else m.running_mean.double().view(1, -1, 1, 1)
                )
                + m.bias.double().view(1, -1, 1, 1)
            )
        ),
        (4, 6, 5, 5),
    ),
    "keras-bn": (
        lambda: nkn.BatchNormalization(6),
        lambda m: (
            lambda x: _bn_f64(
                x.movedim(-1, 1), m.gamma, m.beta, m.moving_mean, m.moving_variance, m.training, m.epsilon
            ).movedim(1, -1)
        ),
        (4, 5, 5, 6),
    ),
    "proxy-norm-act-gelu": (
        lambda: nkn.ProxyNormAct(6, activation="gelu"),
        lambda m: (
            lambda x: _proxy_f64(x, m.weight, m.bias, m.proxy_bias, m.proxy_weight, Fn.gelu, m.proxy_eps)
        ),
        (4, 6, 5, 5),
    ),
    "ln+pn": (
        lambda: normkit.create_norm_layer("ln+pn", 6),
        lambda m: (
            lambda x: _proxy_f64(
                Fn.group_norm(x.double(), 1, eps=m.eps),
                m.weight,
                m.bias,
                m.proxy_bias,
                m.proxy_weight,
                torch.relu,
                m.proxy_eps,
            )
        ),
        (4, 6, 5, 5),
    ),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(ORACLES))
def test_autocast_half_input_float32_layer_against_float64(
    name: str, dtype: torch.dtype, train: bool
) -> None:
    """The norm as autocast feeds it (a half input, float32 parameters, autocast on): output in the input's
    dtype, float32 parameter gradients and buffers, and values within the dtype's rounding of a float64
    closed form. (The twins' test above covers the whole pre-layer -> norm -> relu chain.)"""
    make, oracle, shape = ORACLES[name]
    m = perturb(make()).train(train)
    ref = copy.deepcopy(m).double().train(train)
    h = randn(shape).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y, g = forward_backward(m, h, m)
    yr, gr = forward_backward(oracle(ref), h.double(), ref)
    assert y.dtype == dtype and g["input"].dtype == dtype
    assert all(v.dtype == torch.float32 for k, v in g.items() if k != "input")
    # (Proxy Norm's quadrature points are float64 by design)
    assert all(
        b.dtype == torch.float32
        for k, b in m.named_buffers()
        if b.is_floating_point() and k != "proxy_points"
    )
    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    assert rel_err(y, yr) <= tol
    for k, v in g.items():
        assert rel_err(v, gr[k]) <= 2.5 * tol, k


# ---- 2. whole-model casts ---------------------------------------------------------------------------

STATS_LAYERS = {
    "bn2d": lambda: nkn.BatchNorm2d(6),
    "in2d-tracked": lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "syncbn": lambda: nkn.SyncBatchNorm(6),
    "ghost-bn": lambda: nkn.GhostBatchNorm2d(6, ghost_batch_size=2),
    "renorm": lambda: nkn.BatchRenorm2d(6),
    "bnact": lambda: nkn.BatchNormAct2d(6, activation="relu"),
    "frozen": lambda: nkn.FrozenBatchNorm2d(6),
    "mean-only": lambda: nkn.MeanOnlyBatchNorm(6),
    "keras": lambda: nkn.BatchNormalization(6, axis=1),
    "ln+pn": lambda: normkit.create_norm_layer("ln+pn", 6),
}
CASTS = [
    pytest.param(lambda m: m.to(torch.bfloat16), torch.bfloat16, id="to-bf16"),
    pytest.param(lambda m: m.half(), torch.float16, id="half"),
    pytest.param(lambda m: m.double(), torch.float64, id="double"),
]


@pytest.mark.parametrize(("cast", "dtype"), CASTS)
@pytest.mark.parametrize("name", list(STATS_LAYERS))
def test_whole_model_cast_buffers_and_state_dict_round_trip(name: str, cast, dtype: torch.dtype) -> None:
    """model.to(bf16) / .half() / .double(): floating parameters and buffers take the dtype, the counters stay
    int64, Proxy Norm's quadrature points stay float64 (recomputed); a float32 checkpoint loads strictly into
    the cast model (values = the cast) and the cast model's checkpoint loads back into a float32 model; a
    training step then runs in the new dtype and keeps the buffers finite."""
    src = perturb(STATS_LAYERS[name]())
    src(randn((4, 6, 5, 5)).float())  # a step in float32: non-trivial statistics
    sd32 = src.state_dict()
    m = cast(perturb(STATS_LAYERS[name]()))
    for k, t in list(m.named_parameters()) + list(m.named_buffers()):
        if k == "proxy_points":
            assert t.dtype == F64
            u = torch.sqrt(torch.tensor(2.0, dtype=F64)) * torch.erfinv(
                2.0 * (torch.arange(200, dtype=F64) + 0.5) / 200 - 1.0
            )
            torch.testing.assert_close(t, u)
        elif t.is_floating_point():
            assert t.dtype == dtype, k
        else:
            assert t.dtype == torch.int64, k
    m.load_state_dict(sd32, strict=True)
    for k, v in m.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == dtype and torch.equal(v, sd32[k].to(dtype)), k
        else:
            assert torch.equal(v, sd32[k]), k
    y = m(randn((4, 6, 5, 5), seed=2).to(dtype))
    assert y.dtype == dtype
    assert all(torch.isfinite(b).all() for b in m.buffers() if b.is_floating_point())
    back = STATS_LAYERS[name]()
    back.load_state_dict(m.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert v.dtype == sd32[k].dtype, k
        torch.testing.assert_close(v, m.state_dict()[k].to(v.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum-0.1", "momentum-None"])
@pytest.mark.parametrize("dtype", [*HALF, pytest.param(F64, id="fp64")])
def test_cast_model_training_running_stats_track_torch(dtype: torch.dtype, momentum: float | None) -> None:
    """A whole-cast model (BN in bf16 / fp16 / fp64) over ten training steps: running statistics within a
    couple of the dtype's ulps of torch.nn's in the same dtype, and no less accurate than torch's against the
    float64 running average of the same (rounded) batches."""
    nk, tc = nkn.BatchNorm2d(8, momentum=momentum).to(dtype), nn.BatchNorm2d(8, momentum=momentum).to(dtype)
    rm, rv = torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64)
    for step in range(10):
        x = randn((8, 8, 4, 4), seed=10 + step, scale=3.0, shift=2.0).to(dtype)
        nk(x)
        tc(x)
        f = momentum if momentum is not None else 1.0 / (step + 1)
        rm = (1 - f) * rm + f * x.double().mean((0, 2, 3))
        rv = (1 - f) * rv + f * x.double().var((0, 2, 3), unbiased=True)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(nk.running_mean, tc.running_mean, rtol=8 * eps, atol=8 * eps)
    torch.testing.assert_close(nk.running_var, tc.running_var, rtol=8 * eps, atol=8 * eps)
    assert nk.num_batches_tracked.item() == tc.num_batches_tracked.item() == 10
    for got, want, ref in ((nk.running_mean, tc.running_mean, rm), (nk.running_var, tc.running_var, rv)):
        assert rel_err(got, ref) <= 1.5 * rel_err(want, ref) + 2 * eps


# ---- 3. mixed dtypes -----------------------------------------------------------------------------------

MIXED_LAYERS = {
    "bn2d": lambda: nkn.BatchNorm2d(6),
    "in2d": lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "gn": lambda: nkn.GroupNorm(3, 6),
    "ln2d": lambda: nkn.LayerNorm2d(6),
    "ghost-bn": lambda: nkn.GhostBatchNorm2d(6, ghost_batch_size=2),
    "renorm": lambda: nkn.BatchRenorm2d(6),
    "frozen": lambda: nkn.FrozenBatchNorm2d(6),
    "mean-only": lambda: nkn.MeanOnlyBatchNorm(6),
    "bnact": lambda: nkn.BatchNormAct2d(6, activation="relu"),
    "gnact": lambda: nkn.GroupNormAct2d(6, num_groups=2, activation="silu"),
    "ln+pn": lambda: normkit.create_norm_layer("ln+pn", 6),
    "pna-gelu": lambda: nkn.ProxyNormAct(6, activation="gelu"),
}
BAD_MIXES = [
    pytest.param(F64, torch.float32, id="x-fp64-layer-fp32"),
    pytest.param(torch.float32, torch.bfloat16, id="x-fp32-layer-bf16"),
    pytest.param(torch.float16, torch.bfloat16, id="x-fp16-layer-bf16"),
    pytest.param(torch.bfloat16, F64, id="x-bf16-layer-fp64"),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("x_dtype", "layer_dtype"), BAD_MIXES)
@pytest.mark.parametrize("name", list(MIXED_LAYERS))
def test_mismatched_dtypes_are_a_type_error_naming_both(name, x_dtype, layer_dtype, train) -> None:
    """A float64 input into a float32 layer (torch: 'mixed dtype (CPU)'), a float32 input into a bf16
    layer, ...: a TypeError naming both dtypes, and the buffers untouched."""
    m = MIXED_LAYERS[name]().to(layer_dtype).train(train)
    before = {k: v.clone() for k, v in m.named_buffers()}
    with pytest.raises(TypeError) as info:
        m(randn((4, 6, 5, 5)).to(x_dtype))
    assert str(x_dtype) in str(info.value) and str(layer_dtype) in str(info.value)
    for k, v in m.named_buffers():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("x_dtype", "layer_dtype"), BAD_MIXES[:2])
def test_keras_batch_normalization_mismatched_dtypes_are_a_type_error(x_dtype, layer_dtype) -> None:
    m = nkn.BatchNormalization(6).to(layer_dtype)
    with pytest.raises(TypeError, match=str(layer_dtype)):
        m(randn((4, 5, 5, 6)).to(x_dtype))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "name", ["bn1d-3D", "bn2d", "bn3d", "in2d-tracked", "gn", "ln", "ln2d", "gnact-silu"]
)
def test_half_input_float32_layer_without_autocast_matches_torch(
    name: str, dtype: torch.dtype, train: bool
) -> None:
    """A half input into a float32 layer (torch.nn accepts it): output in the input's dtype, float32 parameter
    gradients and buffers, at least as accurate as torch.nn's twin against float64."""
    nk, tw, x = _twin_pair(name, train)
    ref = copy.deepcopy(nk).double()
    h = x.to(dtype)
    y, g = forward_backward(nk, h, nk)
    yt, gt = forward_backward(tw, h, tw)
    yr, gr = forward_backward(ref, h.double(), ref)
    assert y.dtype == yt.dtype == dtype
    floor = FLOOR[dtype]
    assert rel_err(y, yr) <= 1.5 * rel_err(yt, yr) + floor
    for (k, v), vt in zip(g.items(), gt.values()):
        assert v.dtype == vt.dtype, k
        assert rel_err(v, gr[k]) <= 1.5 * rel_err(vt, gr[k]) + floor, k
    for b, bt in zip(
        (b for b in nk.buffers() if b.is_floating_point()), (b for b in tw.buffers() if b.is_floating_point())
    ):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, bt, rtol=1e-5, atol=1e-6)


# ---- 4. non-finite batches and GradScaler -----------------------------------------------------------------

RUNNING = ["bn2d", "in2d-tracked", "syncbn", "ghost-bn", "renorm", "bnact", "mean-only", "keras"]


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")], ids=["inf", "nan", "-inf"])
@pytest.mark.parametrize("params", ["fp32", "half"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", RUNNING)
def test_non_finite_half_batch_never_reaches_the_running_stats(name, dtype, params, bad) -> None:
    """A bf16 / fp16 training batch holding an inf or NaN (autocast's float32 buffers, or a whole-cast half
    model): the running statistics and num_batches_tracked keep their values, the skip is counted."""
    m = perturb(STATS_LAYERS[name]())
    if params == "half":
        m = m.to(dtype)
    before = {k: v.clone() for k, v in m.named_buffers()}
    x = randn((4, 6, 5, 5)).to(dtype)
    x[1, 2, 3, 4] = bad
    with torch.autocast("cpu", dtype=dtype, enabled=params == "fp32"):
        m(x)
    for k, v in m.named_buffers():
        if k == "num_skipped_updates":
            assert v.item() == before[k].item() + 1
        else:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", HALF)
def test_grad_scaler_loop_matches_torch_apart_from_the_documented_skip(dtype: torch.dtype) -> None:
    """conv -> BN -> relu -> linear, SGD, fp16 / bf16 autocast and torch.amp.GradScaler("cpu") for eight
    steps, one batch with an inf and one whose conv output overflows float16. torch.nn writes those
    batches' NaN / inf into its running statistics (restored here, normkit's documented behaviour);
    everything else -- loss scale, parameters, running statistics, counters -- follows torch.nn."""

    def make(bn):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            bn(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )

    a, t = make(nkn.BatchNorm2d), make(nn.BatchNorm2d)
    t.load_state_dict(a.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (a, t)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**16) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    skipped = 0
    for step in range(8):
        x = torch.randn(8, 3, 6, 6, generator=g) * 2 + 1
        target = torch.randint(0, 4, (8,), generator=g)
        if step == 3:
            x[0, 0, 0, 0] = float("inf")
        if step == 5:
            x = x * 3e4
        saved = {k: v.clone() for k, v in t[1].named_buffers()}
        for m, opt, scaler in zip((a, t), opts, scalers):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = Fn.cross_entropy(m(x), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if not all(torch.isfinite(v).all() for v in t[1].buffers() if v.is_floating_point()):
            skipped += 1
            with torch.no_grad():
                for k, v in t[1].named_buffers():
                    v.copy_(saved[k])
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert all(torch.isfinite(v).all() for v in a[1].buffers() if v.is_floating_point())
        torch.testing.assert_close(a[1].running_mean, t[1].running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[1].running_var, t[1].running_var, rtol=1e-4, atol=1e-5)
        assert a[1].num_batches_tracked.item() == t[1].num_batches_tracked.item()
        for p, q in zip(a.parameters(), t.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert skipped >= 1 and a[1].num_skipped_updates.item() == skipped


# ---- 5. extreme values per dtype ---------------------------------------------------------------------------

EXTREMES = [
    pytest.param(torch.bfloat16, 1e3, 4.0, id="bf16-mean-1e3"),
    pytest.param(torch.bfloat16, 1e5, 500.0, id="bf16-mean-1e5"),
    pytest.param(torch.bfloat16, 0.0, 1e30, id="bf16-huge"),
    pytest.param(torch.bfloat16, 0.0, 1e-30, id="bf16-tiny"),
    pytest.param(torch.float16, 1e3, 0.5, id="fp16-mean-1e3"),
    pytest.param(torch.float16, 6.2e4, 200.0, id="fp16-near-6e4"),
    pytest.param(torch.float16, 0.0, 1e-6, id="fp16-subnormal"),
]


@pytest.mark.parametrize("params", ["fp32", "half"])
@pytest.mark.parametrize(("dtype", "shift", "scale"), EXTREMES)
@pytest.mark.parametrize("name", ["bn2d", "gn", "ln", "in2d-tracked"])
def test_extreme_half_inputs_at_least_as_accurate_as_torch(name, dtype, shift, scale, params) -> None:
    """Large offsets, near-overflow and tiny half inputs in training: output, gradients and running statistics
    no less accurate (vs float64) than torch.nn's in the same dtype setting, and never non-finite where
    torch's are finite."""
    nk, tw, _ = _twin_pair(name, True)
    shape = TWINS[name][2]
    x = randn(shape, seed=5, scale=scale, shift=shift).clamp(-65000, 65000).to(dtype)
    ref = copy.deepcopy(nk).double()
    if params == "half":
        nk, tw = nk.to(dtype), tw.to(dtype)
    y, g = forward_backward(nk, x, nk)
    yt, gt = forward_backward(tw, x, tw)
    yr, gr = forward_backward(ref, x.double(), ref)
    floor = FLOOR[dtype]
    pairs = [(y, yt, yr)] + [(v, vt, gr[k]) for (k, v), vt in zip(g.items(), gt.values())]
    pairs += [
        (b, bt, br)
        for b, bt, br in zip(nk.buffers(), tw.buffers(), ref.buffers())
        if b.is_floating_point() and torch.isfinite(bt).all()
    ]
    for got, want, oracle in pairs:
        assert torch.isfinite(got).all() or not torch.isfinite(want).all()
        if torch.isfinite(want).all():
            assert rel_err(got, oracle) <= 1.5 * rel_err(want, oracle) + floor


# ---- 6. layouts in half precision ----------------------------------------------------------------------


def _layouts(x: Tensor) -> dict[str, Tensor]:
    out = {}
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        out["channels_last_3d"] = x.contiguous(memory_format=torch.channels_last_3d)
    out["transposed"] = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.zeros((2 * x.shape[0], *x.shape[1:]), dtype=x.dtype)
    big[::2] = x
    out["strided-batch"] = big[::2]
    return out


LAYOUT_LAYERS = {
    "bn2d": (lambda: nkn.BatchNorm2d(6), lambda m: _loaded(nn.BatchNorm2d(6), m), (4, 6, 5, 7)),
    "bn3d": (lambda: nkn.BatchNorm3d(4), lambda m: _loaded(nn.BatchNorm3d(4), m), (2, 4, 3, 4, 5)),
    "gn-5d": (lambda: nkn.GroupNorm(2, 4), lambda m: _loaded(nn.GroupNorm(2, 4), m), (2, 4, 3, 4, 5)),
    "in2d": (
        lambda: nkn.InstanceNorm2d(6, affine=True),
        lambda m: _loaded(nn.InstanceNorm2d(6, affine=True), m),
        (4, 6, 5, 7),
    ),
    "ln2d": (lambda: nkn.LayerNorm2d(6), lambda m: _loaded(_Perm(6), m), (4, 6, 5, 7)),
    "gnact": (
        lambda: nkn.GroupNormAct2d(6, num_groups=2, activation="silu"),
        lambda m: _loaded(_Act(nn.GroupNorm(2, 6), nn.SiLU()), m),
        (4, 6, 5, 7),
    ),
}


@pytest.mark.parametrize("params", ["fp32", "half"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(LAYOUT_LAYERS))
def test_half_inputs_in_every_layout(name, dtype, train, params) -> None:
    """channels_last / channels_last_3d / transposed / strided half inputs: the values of the contiguous
    input's result (to the dtype's rounding), no less accurate than torch.nn's twin, and for batch statistics
    the output and input gradient in the input's layout (docs/differences.md, Output layout)."""
    make, make_twin, shape = LAYOUT_LAYERS[name]
    nk = perturb(make()).train(train)
    tw = make_twin(nk).train(train)
    ref = copy.deepcopy(nk).double()
    if params == "half":
        nk, tw = nk.to(dtype), tw.to(dtype)
    base = randn(shape).to(dtype)
    yr, gr = forward_backward(ref, base.double(), ref)
    floor = FLOOR[dtype]
    for lname, x in _layouts(base).items():
        y, g = _fb_copy(nk, x)
        yt, gt = _fb_copy(tw, x)
        assert rel_err(y, yr) <= 1.5 * rel_err(yt, yr) + floor, lname
        for (k, v), vt in zip(g.items(), gt.values()):
            assert rel_err(v, gr[k]) <= 1.5 * rel_err(vt, gr[k]) + floor, (lname, k)
        batch_stats = train or not name.startswith("bn")
        if batch_stats and lname != "strided-batch":
            assert y.stride() == x.stride(), lname
            assert g["input"].stride() == x.stride(), lname


def _fb_copy(m: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    mm = copy.deepcopy(m)
    return forward_backward(mm, x, mm)


# ---- defects found by the audit (fixed) --------------------------------------------------------------

PROXY_HALF = [
    pytest.param(lambda: nkn.ProxyNormAct(6, activation="gelu"), Fn.gelu, None, "contiguous", id="pna-gelu"),
    pytest.param(
        lambda: nkn.ProxyNormAct(6, activation="relu"), torch.relu, None, "contiguous", id="pna-relu"
    ),
    pytest.param(
        lambda: normkit.create_norm_layer("ln+pn", 6), torch.relu, 1, "transposed", id="ln+pn-transposed"
    ),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("make", "act", "groups", "layout"), PROXY_HALF)
def test_proxy_norm_half_parameters_gradients_rounded_once(make, act, groups, layout, dtype) -> None:
    """The weight / bias gradients of a Proxy Norm layer cast whole to half are as accurate (vs the float64
    definition) as the float64 gradient rounded once to half."""
    torch.manual_seed(0)
    m = perturb(make())
    eps_gn = getattr(m, "eps", None)
    x = randn((4, 6, 5, 5)).to(dtype)
    if layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    half = copy.deepcopy(m).to(dtype)
    ref = copy.deepcopy(half).double()

    def oracle(xx: Tensor) -> Tensor:
        y = xx.double() if groups is None else Fn.group_norm(xx.double(), groups, eps=eps_gn)
        return _proxy_f64(y, ref.weight, ref.bias, ref.proxy_bias, ref.proxy_weight, act, ref.proxy_eps)

    _, g = forward_backward(half, x, half)
    _, gr = forward_backward(oracle, x, ref)
    for k in ("weight", "bias"):
        once = gr[k].to(dtype)  # the best a half gradient can be
        assert rel_err(g[k], gr[k]) <= 2 * rel_err(once, gr[k]) + FLOOR[dtype] / 2, k


@pytest.mark.parametrize("name", ["bn2d", "syncbn", "in2d-tracked", "bnact"])
def test_fp16_model_updates_running_var_from_a_large_but_finite_batch(name: str) -> None:
    """model.half(), activations with std ~300 (unbiased variance ~9e4 > float16 max): the running variance
    takes 0.9 * 1 + 0.1 * var (~9e3, representable) as torch.nn's BatchNorm does, and nothing is skipped."""
    m = STATS_LAYERS[name]().half()
    x = randn((8, 6, 6, 6), seed=3, scale=300.0, shift=0.0).half()
    assert torch.isfinite(x).all()
    m(x)
    if name == "in2d-tracked":
        var = x.double().var((2, 3), unbiased=True).mean(0)
    else:
        var = x.double().var((0, 2, 3), unbiased=True)
    want = (0.9 + 0.1 * var).half()
    assert m.num_skipped_updates.item() == 0
    torch.testing.assert_close(m.running_var, want, rtol=2e-3, atol=0)


def test_fp16_running_stats_are_rounded_once_like_torch() -> None:
    """One training step of a float16 BatchNorm2d: the stored running mean / variance equal the float16
    rounding of the exact update (torch.nn: all but ~0.01% of values), not a double rounding (~27% off by
    an ulp)."""
    C = 256
    x = (
        randn((8, C, 4, 4), seed=4, scale=1.0, shift=0.0)
        * torch.linspace(0.5, 200, C, dtype=F64).view(1, C, 1, 1)
    ).half()
    m = nkn.BatchNorm2d(C).half()
    m(x)
    want_mean = (0.1 * x.double().mean((0, 2, 3))).half()
    want_var = (0.9 + 0.1 * x.double().var((0, 2, 3), unbiased=True)).half()
    wrong = int((m.running_mean != want_mean).sum() + (m.running_var != want_var).sum())
    assert wrong <= 2 * C // 100, f"{wrong} of {2 * C} buffer values not correctly rounded"


@pytest.mark.parametrize("case", ["large-batch-variance", "cumulative-average-after-many-steps"])
def test_fp16_ghost_batch_norm_never_writes_inf_into_running_var(case: str) -> None:
    """model.half(): a finite batch never makes running_var non-finite. Case 1: per-chunk variance ~9e4
    (> float16 max): the per-chunk EMA is representable (torch.nn's BN on the two chunks stores ~1.6e4).
    Case 2: momentum=None with num_batches_tracked = 1000 and running_var ~100: start * running_var
    overflows float16 though the cumulative average (~100) does not."""
    if case == "large-batch-variance":
        g = nkn.GhostBatchNorm2d(4, ghost_batch_size=4).half()
        x = randn((8, 4, 6, 6), seed=6, scale=300.0, shift=0.0).half()
        t = nn.BatchNorm2d(4).half()
        t(x[:4])
        t(x[4:])
        g(x)
        assert torch.isfinite(g.running_var).all()
        torch.testing.assert_close(g.running_var, t.running_var, rtol=2e-3, atol=0)
    else:
        g = nkn.GhostBatchNorm2d(4, ghost_batch_size=4, momentum=None).half()
        with torch.no_grad():
            g.num_batches_tracked.fill_(1000)
            g.running_var.fill_(100.0)
        x = randn((8, 4, 4, 4), seed=6, scale=10.0, shift=0.0).half()
        g(x)
        assert torch.isfinite(g.running_var).all()
        chunk_vars = torch.stack([c.double().var((0, 2, 3), unbiased=True) for c in x.split(4)])
        want = (1000 * 100.0 + chunk_vars.sum(0)) / 1002
        torch.testing.assert_close(g.running_var.double(), want, rtol=2e-3, atol=0)
