"""normkit.nn as a drop-in for torch.nn: the ecosystem code that checks types, rebuilds statistics,
fuses, catches errors, scripts, builds on the meta device, casts and loads checkpoints.

The oracle is torch.nn (the same procedure on a torch.nn layer) or a float64 computation written
here; never normkit itself.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
import normkit.functional as NF
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample, by_name

F64 = torch.float64
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
TOL: Tol = {"rtol": 1e-5, "atol": 1e-5}
EXACT: Tol = {"rtol": 0.0, "atol": 0.0}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(m: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial parameters and running statistics (and a step counter > 0)."""
    g = _gen(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                t.fill_(3)
            elif t.is_floating_point() and not name.endswith("proxy_points"):
                t.add_(0.4 * torch.randn(t.shape, generator=g))
    return m


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed)) * 1.5 + 0.3


# --- isinstance ---------------------------------------------------------------------------------

ISINSTANCE = [
    (lambda: nkn.BatchNorm1d(4), (nn.BatchNorm1d, _BatchNorm), (nn.BatchNorm2d, nn.BatchNorm3d)),
    (lambda: nkn.BatchNorm2d(4), (nn.BatchNorm2d, _BatchNorm), (nn.BatchNorm1d, nn.BatchNorm3d)),
    (lambda: nkn.BatchNorm3d(4), (nn.BatchNorm3d, _BatchNorm), (nn.BatchNorm1d, nn.BatchNorm2d)),
    (lambda: nkn.GroupNorm(2, 4), (nn.GroupNorm,), (nn.LayerNorm, _BatchNorm)),
    (lambda: nkn.LayerNorm(4), (nn.LayerNorm,), (nn.GroupNorm,)),
    (lambda: nkn.LayerNorm2d(4), (nn.LayerNorm,), (nn.GroupNorm,)),
    (lambda: nkn.LayerNorm2d(4, over="chw"), (nn.LayerNorm,), (nn.GroupNorm,)),
    (lambda: nkn.InstanceNorm1d(4), (nn.InstanceNorm1d,), (nn.InstanceNorm2d, _BatchNorm)),
    (lambda: nkn.InstanceNorm2d(4), (nn.InstanceNorm2d,), (nn.InstanceNorm1d, _BatchNorm)),
    (lambda: nkn.InstanceNorm3d(4), (nn.InstanceNorm3d,), (nn.InstanceNorm2d, _BatchNorm)),
    (lambda: nkn.BatchNormAct2d(4, activation="relu"), (nn.BatchNorm2d, _BatchNorm, nkn.BatchNorm2d), ()),
    (lambda: nkn.GroupNormAct2d(4, num_groups=2), (nn.GroupNorm, nkn.GroupNorm), ()),
    (lambda: nkn.LayerNormAct2d(4), (nn.LayerNorm, nkn.LayerNorm2d), ()),
    (lambda: normkit.create_norm_act_layer("bn", 4, "relu"), (nn.BatchNorm2d, _BatchNorm), ()),
    (lambda: normkit.create_norm_act_layer("gn:2", 4, "relu"), (nn.GroupNorm,), ()),
]


@pytest.mark.parametrize(
    "build, bases, not_bases",
    ISINSTANCE,
    ids=[f"{type(b()).__name__}-{i}" for i, (b, _, _) in enumerate(ISINSTANCE)],
)
def test_isinstance_of_the_torch_base(build, bases, not_bases):
    m = build()
    for base in bases:
        assert isinstance(m, base), f"{type(m).__name__} is not a {base.__name__}"
    for base in not_bases:
        assert not isinstance(m, base), f"{type(m).__name__} is a {base.__name__}"


# --- torch.optim.swa_utils.update_bn --------------------------------------------------------------


def _cnn(bn: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        bn(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        bn(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )


def test_swa_update_bn_recomputes_running_statistics():
    ours, ref = _cnn(nkn.BatchNorm2d), _cnn(nn.BatchNorm2d)
    ours.load_state_dict(ref.state_dict())
    for m in (ours, ref):  # stale statistics that update_bn must discard
        for layer in m:
            if isinstance(layer, _BatchNorm):
                _randomize(layer, seed=5)
    g = _gen(1)
    loader = [torch.randn(5, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(4)]

    # float64 oracle: record what each torch.nn BN layer sees during update_bn
    seen: dict[int, list[torch.Tensor]] = {1: [], 4: []}
    hooks = [
        ref[i].register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach().double()))
        for i in seen
    ]
    torch.optim.swa_utils.update_bn(loader, ref)
    for h in hooks:
        h.remove()
    torch.optim.swa_utils.update_bn(loader, ours)

    for i in (1, 4):
        bn, tbn = ours[i], ref[i]
        assert bn.momentum == tbn.momentum == 0.1  # restored by update_bn
        assert int(bn.num_batches_tracked) == int(tbn.num_batches_tracked) == len(loader)
        # the oracle: the mean over the whole dataset (equal batches) and the cumulative average of
        # the unbiased per-batch variances (what momentum=None gives)
        xs = seen[i]
        want_mean = torch.cat(xs).mean((0, 2, 3))
        want_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)
        # and the same as torch.nn's BN after the same procedure
        torch.testing.assert_close(bn.running_mean, tbn.running_mean, **TOL)
        torch.testing.assert_close(bn.running_var, tbn.running_var, **TOL)
        assert int(bn.num_skipped_updates) == 0
    ours.eval()
    ref.eval()
    with torch.no_grad():
        x = loader[0]
        torch.testing.assert_close(ours(x), ref(x), **TOL)


# --- torch.nn.utils.fusion.fuse_conv_bn_eval ------------------------------------------------------


@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv-bias", "conv-nobias"])
def test_fuse_conv_bn_eval_matches_bn_of_conv(conv_bias: bool):
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, bias=conv_bias).eval()
    bn = _randomize(nkn.BatchNorm2d(6), seed=7).eval()
    fused = fuse_conv_bn_eval(conv, bn)
    assert isinstance(fused, nn.Conv2d)
    x = _x((2, 3, 8, 8), seed=2)
    with torch.no_grad():
        want = bn(conv(x))
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- errors catchable as torch's ------------------------------------------------------------------

WRONG_CHANNELS = [
    pytest.param(lambda: nkn.BatchNorm2d(7), (2, 5, 4, 4), ("7", "5"), id="BatchNorm2d"),
    pytest.param(lambda: nkn.GroupNorm(7, 7), (2, 5, 4, 4), ("7", "5"), id="GroupNorm"),
    pytest.param(lambda: nkn.BatchNorm1d(7), (2, 5), ("7", "5"), id="BatchNorm1d"),
    pytest.param(
        lambda: nkn.InstanceNorm2d(7, affine=True), (2, 5, 4, 4), ("7", "5"), id="InstanceNorm2d-affine"
    ),
    pytest.param(lambda: nkn.LayerNorm(7), (2, 3, 5), ("7", "5"), id="LayerNorm"),
]


@pytest.mark.parametrize("build, shape, sizes", WRONG_CHANNELS)
def test_wrong_channel_count_is_a_runtime_error_and_a_value_error(build, shape, sizes):
    m = build()
    x = torch.randn(shape)
    caught: BaseException | None = None
    try:
        m(x)
    except RuntimeError as e:  # what code written around torch.nn catches
        caught = e
    assert caught is not None, "no RuntimeError raised"
    assert isinstance(caught, ValueError)
    assert isinstance(caught, normkit.NormError)
    msg = str(caught)
    for size in sizes:
        assert size in msg, f"{size!r} not named in {msg!r}"


# --- forward signature ------------------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_every_layer_takes_the_input_positionally(sample: Sample):
    a, b = sample.module(True), sample.module(True)
    x = sample.input()
    with torch.no_grad():
        y = a(x)
        assert y.shape == x.shape
        torch.testing.assert_close(b.forward(x), y, **EXACT)


CORE = [
    "BatchNorm1d-2d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "GroupNorm",
    "LayerNorm",
    "LayerNorm2d-c",
    "LayerNorm2d-chw",
    "ProxyNormAct-gelu",
]


@pytest.mark.parametrize("name", CORE)
def test_core_layers_take_torch_keyword_name_input(name: str):
    sample = by_name(name)
    a, b = sample.module(True), sample.module(True)
    x = sample.input()
    with torch.no_grad():
        torch.testing.assert_close(b(input=x), a(x), **EXACT)


POSITIONAL_MASK = [
    "BatchNorm1d-3d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm2d-affine-tracked",
    "GroupNorm",
    "LayerNorm",
    "LayerNorm-2dims",
]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", POSITIONAL_MASK)
def test_mask_is_the_second_positional_argument(name: str, train: bool):
    sample = by_name(name)
    x = sample.input()
    plain, none, keyword, positional = (sample.module(train) for _ in range(4))
    mask = torch.rand(x.shape, generator=_gen(4)) < 0.8
    with torch.no_grad():
        y = plain(x)
        torch.testing.assert_close(none(x, None), y, **EXACT)
        y_kw = keyword(x, mask=mask)
        torch.testing.assert_close(positional(x, mask), y_kw, **EXACT)
        if train:  # the mask changes the statistics, so it really was used
            assert not torch.allclose(y_kw, y)
    for m in (none, positional):
        ref = plain if m is none else keyword
        for (k, a), b in zip(m.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, **EXACT, msg=lambda s, k=k: f"buffer {k}: {s}")


def _sample(name: str, build, shape: tuple[int, ...]) -> Sample:
    return Sample(name, build, shape)


_IN_CMA = _sample(
    "in-cma",
    lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=None),
    (4, 6, 5, 5),
)
# (id, sample, marks in train, marks in eval)
_SCRIPTED = [
    ("BatchNorm2d", by_name("BatchNorm2d"), (), ()),
    ("BatchNorm2d-cl", by_name("BatchNorm2d-cl"), (), ()),
    ("BatchNorm2d-cma", _sample("bn-cma", lambda: nkn.BatchNorm2d(6, momentum=None), (4, 6, 5, 5)), (), ()),
    ("GroupNorm", by_name("GroupNorm"), (), ()),
    ("LayerNorm", by_name("LayerNorm"), (), ()),
    ("LayerNorm-2dims", by_name("LayerNorm-2dims"), (), ()),
    ("InstanceNorm2d", by_name("InstanceNorm2d"), (), ()),
    ("InstanceNorm2d-affine-tracked", by_name("InstanceNorm2d-affine-tracked"), (), ()),
    ("InstanceNorm2d-affine-tracked-cma", _IN_CMA, (), ()),
    ("LayerNorm2d-c", by_name("LayerNorm2d-c"), (), ()),
    ("LayerNorm2d-chw", by_name("LayerNorm2d-chw"), (), ()),
]
SCRIPTED = [
    pytest.param(sample, train, id=f"{name}-{'train' if train else 'eval'}", marks=marks)
    for name, sample, train_marks, eval_marks in _SCRIPTED
    for train, marks in ((True, train_marks), (False, eval_marks))
]


@pytest.mark.parametrize("sample, train", SCRIPTED)
def test_torch_jit_script_equals_eager(sample: Sample, train: bool):
    eager, m = sample.module(train), sample.module(train)
    x = sample.input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.13
        warnings.simplefilter("ignore", FutureWarning)  # ... and warns so in 2.14
        scripted = torch.jit.script(m)
        with torch.no_grad():
            got = scripted(x)
            got2 = scripted(x)  # a second step: the running statistics moved the same way
    with torch.no_grad():
        want = eager(x)
        want2 = eager(x)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got2, want2, **TOL)
    for (k, a), b in zip(eager.named_buffers(), scripted.buffers()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda s, k=k: f"buffer {k}: {s}")


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_torch_jit_script_runs_as_eager_or_is_one_clear_error(sample: Sample):
    """Every layer either scripts and computes what eager does, or (TorchScript cannot compile it) the
    error names the layer and what to use instead, also inside a model: not TorchScript's own about
    an annotation deep in normkit ("Unknown type annotation: 'int'")."""
    x = sample.input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for m in (sample.module(False), nn.Sequential(nn.Identity(), sample.module(False))):
            try:
                scripted = torch.jit.script(m)
            except normkit.NormError as e:
                assert "cannot be compiled by torch.jit.script" in str(e) and "torch.jit.trace" in str(e)
                assert type(sample.module(False)).__name__ in str(e)
                continue
            with torch.no_grad():
                torch.testing.assert_close(scripted(x), sample.module(False)(x), **TOL)


# --- meta device --------------------------------------------------------------------------------


def _meta_build(sample: Sample) -> nn.Module:
    with torch.device("meta"):
        m = sample.build()
    assert all(t.device.type == "meta" for t in list(m.parameters()) + list(m.buffers()))
    return m.to_empty(device="cpu")


def _skipped(m: nn.Module) -> int:
    t = getattr(m, "num_skipped_updates", None)
    return 0 if t is None else int(t)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_meta_build_to_empty_load_state_dict_equals_reference(sample: Sample, train: bool):
    ref = sample.module(train)
    m = _meta_build(sample)
    m.load_state_dict(ref.state_dict())
    m.train(train)
    assert _skipped(m) == 0
    for (k, a), b in zip(ref.named_buffers(), m.buffers()):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, **EXACT, msg=lambda s, k=k: f"buffer {k}: {s}")
    x = sample.input()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(m(x), ref(x), **EXACT)
    for (k, a), b in zip(ref.named_buffers(), m.buffers()):
        torch.testing.assert_close(b, a, **EXACT, msg=lambda s, k=k: f"buffer {k} after two steps: {s}")
    assert _skipped(m) == 0


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_meta_build_to_empty_reset_parameters_equals_a_fresh_layer(sample: Sample, train: bool):
    m = _meta_build(sample)
    if not hasattr(m, "reset_parameters"):
        pytest.skip("no reset_parameters")
    torch.manual_seed(0)  # (a conv's reset_parameters draws its kernel: the same draws as the fresh build's)
    m.reset_parameters()
    torch.manual_seed(0)
    fresh = sample.build()
    m.train(train)
    fresh.train(train)
    assert _skipped(m) == 0
    for (k, a), b in zip(fresh.state_dict().items(), m.state_dict().values()):
        torch.testing.assert_close(b, a, **EXACT, msg=lambda s, k=k: f"{k}: {s}")
    x = sample.input()
    with torch.no_grad():
        torch.testing.assert_close(m(x), fresh(x), **EXACT)


def _same_buffers(got: nn.Module, want: nn.Module, when: str) -> None:
    """Every buffer (non-persistent ones too: ``num_skipped_updates``, ``proxy_points``) equal, on the CPU."""
    got_buffers, want_buffers = dict(got.named_buffers()), dict(want.named_buffers())
    assert list(got_buffers) == list(want_buffers)
    for k, a in want_buffers.items():
        assert got_buffers[k].device == a.device, f"buffer {k} {when}"
        torch.testing.assert_close(got_buffers[k], a, **EXACT, msg=lambda s, k=k: f"buffer {k} {when}: {s}")


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_meta_build_assign_load_then_to_cpu_equals_a_layer_built_on_the_cpu(sample: Sample, train: bool):
    """The fast-load pattern: build on the meta device, ``load_state_dict(sd, assign=True)``, then
    ``.to("cpu")``. The buffers the state_dict does not hold (``num_skipped_updates``, Proxy Norm's
    ``proxy_points``) were left on the meta device: ``.to`` raised "Cannot copy out of meta tensor"
    (torch.nn's BN, which has none, moves), Proxy Norm's forward failed."""
    ref = sample.module(train)
    with torch.device("meta"):
        m = sample.build()
    m.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    m = m.to("cpu").train(train)
    _same_buffers(m, ref, "after the load")
    x = sample.input()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(m(x), ref(x), **EXACT)
    _same_buffers(m, ref, "after two steps")


def test_meta_build_assign_load_counts_skipped_updates_as_a_cpu_built_layer():
    """The skip counter a meta-built, assign-loaded BN keeps (inside a model, as users load them) is
    a real one: a NaN batch counts as in a BN built on the CPU, and torch.nn's BN loads the same way."""

    def build(bn: type[nn.Module]) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), bn(4), nn.ReLU())

    sd = _randomize(build(nn.BatchNorm2d)).state_dict()
    ref = build(nkn.BatchNorm2d)
    ref.load_state_dict(sd)
    for bn in (nn.BatchNorm2d, nkn.BatchNorm2d):  # (torch.nn's: the pattern itself works)
        with torch.device("meta"):
            m = build(bn)
        m.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
        m.to("cpu")
    x = _x((4, 3, 6, 6))
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        m(x), ref(x)
    assert int(ref[1].num_skipped_updates) == 1
    _same_buffers(m, ref, "after a NaN batch")


# --- dtype casts of Proxy Norm ----------------------------------------------------------------------

PROXY = [
    pytest.param(lambda: normkit.create_norm_layer("ln+pn", 6), id="ln+pn"),
    pytest.param(lambda: normkit.create_norm_layer("gn:2+pn", 6, activation="silu"), id="gn:2+pn"),
    pytest.param(lambda: nkn.ProxyNormAct(6, activation="gelu"), id="ProxyNormAct"),
    pytest.param(lambda: nkn.GroupNormProxyAct2d(6, num_groups=3), id="GroupNormProxyAct2d"),
]


@pytest.mark.parametrize("build", PROXY)
def test_casts_keep_the_proxy_points_exact(build):
    want = NF.proxy_points(200, dtype=F64)
    casts = (lambda m: m.half(), lambda m: m.to(F64), lambda m: m.to(torch.bfloat16), lambda m: m.float())
    for cast in casts:
        m = cast(build())
        assert m.proxy_points.dtype == F64
        torch.testing.assert_close(m.proxy_points, want, **EXACT)
    m = build().half().float().to(F64)
    torch.testing.assert_close(m.proxy_points, want, **EXACT)


def test_half_ln_pn_output_is_within_fp16_tolerance_of_float32():
    m32 = _randomize(normkit.create_norm_layer("ln+pn", 6), seed=9)
    m16 = copy.deepcopy(m32).half()
    assert all(p.dtype == torch.float16 for p in m16.parameters())
    x16 = _x((4, 6, 5, 5), seed=3).half()
    with torch.no_grad():
        y16 = m16(x16)
        y32 = m32(x16.float())
    assert y16.dtype == torch.float16
    assert bool(torch.isfinite(y16).all())
    # fp16 output (values up to ~7, ulp 4e-3 there) and fp16-rounded parameters
    torch.testing.assert_close(y16.float(), y32, rtol=1e-3, atol=1e-2)


# --- state_dict compatibility with torch.nn -----------------------------------------------------------

COMPAT = [
    pytest.param(lambda: nkn.BatchNorm2d(6), lambda: nn.BatchNorm2d(6), (4, 6, 5, 5), id="BatchNorm2d"),
    pytest.param(lambda: nkn.GroupNorm(3, 6), lambda: nn.GroupNorm(3, 6), (4, 6, 5, 5), id="GroupNorm"),
    pytest.param(lambda: nkn.LayerNorm(5), lambda: nn.LayerNorm(5), (4, 6, 5), id="LayerNorm"),
    pytest.param(
        lambda: nkn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        (4, 6, 5, 5),
        id="InstanceNorm2d",
    ),
]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("direction", ["torch->normkit", "normkit->torch"])
@pytest.mark.parametrize("ours_f, torch_f, shape", COMPAT)
def test_state_dict_loads_strictly_both_ways(ours_f, torch_f, shape, direction: str, train: bool):
    ours, theirs = ours_f(), torch_f()
    src, dst = (theirs, ours) if direction == "torch->normkit" else (ours, theirs)
    _randomize(src, seed=11)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(dst.state_dict()) == list(src.state_dict())
    ours.train(train)
    theirs.train(train)
    x = _x(shape, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        if k == "num_batches_tracked" and isinstance(theirs, nn.InstanceNorm2d) and train:
            # torch's InstanceNorm never advances its counter; normkit counts the update (documented,
            # tests/nn/test_instance_norm.py), which its momentum=None needs
            assert int(b) == int(a) + 1
            continue
        torch.testing.assert_close(b, a, **TOL, msg=lambda s, k=k: f"{k}: {s}")
    assert _skipped(ours) == 0
