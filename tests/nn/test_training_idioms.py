"""normkit's layers inside everyday CNN training code: init and param-group idioms, training-loop
features (gradient accumulation, checkpointing, no_grad forwards, frozen affines, partly frozen BN,
attributes flipped after construction, resets), EMA / SWA, copies and serialization, batch
independence and determinism.

The oracle is the same code run on the torch.nn twin model with the same weights (outputs,
gradients, buffers), a float64 computation written here, or the layer's documented closed form;
never normkit against itself, except where a layer has no torch twin and the idiom must leave it
as it was (a deep copy, a pickle) or the definition is about itself (batch independence,
determinism).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.checkpoint import checkpoint

import normkit
import normkit.nn as nkn
from tests.tolerances import Tol
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample, run

F64 = torch.float64
TOL: Tol = {"rtol": 1e-4, "atol": 1e-5}
C = 6
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


# --- the twin models ---------------------------------------------------------------------------------


def _cnn(lib) -> nn.Sequential:
    """A small CNN written against ``lib`` (torch.nn or normkit.nn), with every norm a CNN uses."""
    C = 6
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        lib.BatchNorm2d(C),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        lib.BatchNorm2d(C),  # the "last BN of the block": zero-initialised below
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        lib.GroupNorm(2, C),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(C, 5),
        lib.BatchNorm1d(5),
        nn.ReLU(),
        lib.LayerNorm(5),
        nn.Linear(5, 3),
    )


def _twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The twin models in float64: over several training steps a float32 run's rounding decides a ReLU
    or two near 0 differently with 1 thread and with 2 (torch's and normkit's alike, 3e-5 apart from
    float64 in turn), which is not what these idioms are about."""
    torch.manual_seed(seed)
    ref = _cnn(nn).double()
    torch.manual_seed(seed)
    ours = _cnn(nkn).double()
    return ref, ours


def _batches(n: int = 4, batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 6, 6, generator=g, dtype=torch.float64) * 1.7 + 0.4 for _ in range(n)]


def _assert_same_state(ref: nn.Module, ours: nn.Module, grads: bool = True) -> None:
    """state_dicts (keys, values; integer buffers exactly) and gradients of the two models equal."""
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    for k in sr:
        if sr[k].is_floating_point():
            torch.testing.assert_close(so[k], sr[k], **TOL, msg=lambda s, k=k: f"{k}: {s}")
        else:
            assert torch.equal(so[k], sr[k]), f"{k}: {so[k]} != torch's {sr[k]}"
    if grads:
        for (k, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), k
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda s, k=k: f"{k}.grad: {s}")


# --- 1. init and param-group idioms --------------------------------------------------------------------


def _init_fn(m: nn.Module) -> None:
    """torchvision's ResNet init, as users copy it into their models."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)


def _param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-5, no_weight_decay_list=()):
    """timm.optim.param_groups_weight_decay, re-implemented (names rather than tensors, to compare)."""
    no_weight_decay_list = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list:
            no_decay.append(name)
        else:
            decay.append(name)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _norm_base_exclusion(model: nn.Module) -> list[str]:
    return [
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if isinstance(m, _NormBase)
        for pn, _ in m.named_parameters(recurse=False)
    ]


class _Block(nn.Module):
    """A ResNet basic block written against ``lib``."""

    def __init__(self, lib, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), lib.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), lib.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def _resnet(lib) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1, bias=False),
        lib.BatchNorm2d(C),
        nn.ReLU(),
        _Block(lib, C),
        _Block(lib, C),
        nn.Conv2d(C, C, 1),
        lib.GroupNorm(2, C),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(C, 5),
        lib.LayerNorm(5),
    )


def test_seeded_build_init_fn_and_param_groups_match_torch():
    torch.manual_seed(0)
    ref = _resnet(nn)
    torch.manual_seed(0)
    ours = _resnet(nkn)
    # the same seed gives the same weights: normkit's layers draw nothing from the global RNG
    _assert_same_state(ref, ours, grads=False)
    for m in (ref, ours):
        torch.manual_seed(1)
        m.apply(_init_fn)
        for block in m.modules():  # zero-init the last BN gamma of each residual block
            if isinstance(block, _Block):
                nn.init.zeros_(block.bn2.weight)
    _assert_same_state(ref, ours, grads=False)
    shapes = [[(k, p.shape) for k, p in m.named_parameters()] for m in (ref, ours)]
    assert shapes[0] == shapes[1]
    assert _param_groups_weight_decay(ref) == _param_groups_weight_decay(ours)
    assert _norm_base_exclusion(ref) == _norm_base_exclusion(ours)
    for pattern in ("bn", "norm", ".bias"):
        assert [k for k, _ in ours.named_parameters() if pattern in k] == [
            k for k, _ in ref.named_parameters() if pattern in k
        ]
    # training steps from the zero gammas equal torch's, run in float64 (torch's float32 run is off by
    # up to 1e-4 relative here: a block whose bn2 gamma is still tiny)
    ref = ref.double()
    opt_r, opt_o = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours))
    for x in _batches(3):
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad()
            m.train()(x.to(next(m.parameters()).dtype)).square().mean().backward()
            opt.step()
    _assert_same_state(ref.float(), ours, grads=False)
    for (k, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad.float(), **TOL, msg=lambda s, k=k: f"{k}.grad: {s}")


def test_buffers_are_torchs_plus_only_non_persistent_extras_and_checkpoints_load_both_ways():
    ref, ours = _twins()
    ref_buffers = [k for k, _ in ref.named_buffers()]
    our_buffers = [k for k, _ in ours.named_buffers()]
    extras = [k for k in our_buffers if k not in ref_buffers]
    assert [k for k in our_buffers if k in ref_buffers] == ref_buffers
    assert extras and all(k.endswith("num_skipped_updates") for k in extras)
    assert not set(extras) & set(ours.state_dict())  # not persistent
    for x in _batches(2):
        for m in (ref, ours):
            m.train()(x)
    fresh_ours, fresh_ref = _twins(seed=5)
    assert str(fresh_ours.load_state_dict(ref.state_dict(), strict=True)) == "<All keys matched successfully>"
    assert str(fresh_ref.load_state_dict(ours.state_dict(), strict=True)) == "<All keys matched successfully>"
    _assert_same_state(ref, fresh_ours, grads=False)
    _assert_same_state(ours, fresh_ref, grads=False)


# --- 2. training-loop features -------------------------------------------------------------------------


def _step_plain(m: nn.Module, x: torch.Tensor) -> None:
    m(x).square().mean().backward()


def _idiom_grad_accumulation(m: nn.Module, xs: list[torch.Tensor]) -> None:
    m.train()
    for x in xs:
        (m(x).square().mean() / len(xs)).backward()


def _idiom_checkpoint(reentrant: bool) -> Callable[[nn.Module, list[torch.Tensor]], None]:
    def idiom(m: nn.Module, xs: list[torch.Tensor]) -> None:
        m.train()
        for x in xs[:2]:
            h = checkpoint(m[:3], x.clone().requires_grad_(), use_reentrant=reentrant)
            h = checkpoint(m[3:6], h, use_reentrant=reentrant)
            m[6:](h).square().mean().backward()

    return idiom


def _idiom_no_grad_train_forward(m: nn.Module, xs: list[torch.Tensor]) -> None:
    m.train()
    with torch.no_grad():
        for x in xs:
            m(x)
    _step_plain(m, xs[0])


def _idiom_inference_mode_train_forward(m: nn.Module, xs: list[torch.Tensor]) -> None:
    m.train()
    with torch.inference_mode():
        for x in xs:
            m(x)


def _idiom_frozen_affine(m: nn.Module, xs: list[torch.Tensor]) -> None:
    for mod in m.modules():
        if isinstance(mod, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            mod.requires_grad_(False)
    m.train()
    x = xs[0].clone().requires_grad_()
    m(x).square().mean().backward()
    m.input_grad = x.grad  # type: ignore[assignment]


def _idiom_partly_eval(m: nn.Module, xs: list[torch.Tensor]) -> None:
    m.train()
    for mod in m.modules():  # freeze BN for fine-tuning
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    for x in xs[:2]:
        _step_plain(m, x)


def _idiom_flip(attr: str, value) -> Callable[[nn.Module, list[torch.Tensor]], None]:
    def idiom(m: nn.Module, xs: list[torch.Tensor]) -> None:
        for mod in m.modules():
            if isinstance(mod, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) and hasattr(mod, attr):
                setattr(mod, attr, value)
        m.train()
        for x in xs:
            _step_plain(m, x)
        m.eval()
        m.eval_out = m(xs[0]).detach()  # type: ignore[assignment]

    return idiom


def _idiom_resets(m: nn.Module, xs: list[torch.Tensor]) -> None:
    m.train()
    for x in xs:
        m(x)
    m[1].reset_running_stats()
    m[4].reset_parameters()
    m[7].reset_parameters()
    m[12].reset_parameters()
    _step_plain(m, xs[0])


def _idiom_sgd_with_clipping(m: nn.Module, xs: list[torch.Tensor]) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    m.train()
    norms = []
    for x in xs:
        opt.zero_grad()
        _step_plain(m, x)
        norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05))
        opt.step()
    m.clip_norms = torch.stack(norms)  # type: ignore[assignment]


IDIOMS = {
    "grad-accumulation": _idiom_grad_accumulation,
    "checkpoint-non-reentrant": _idiom_checkpoint(False),
    "checkpoint-reentrant": _idiom_checkpoint(True),
    "no_grad-train-forward": _idiom_no_grad_train_forward,
    "inference_mode-train-forward": _idiom_inference_mode_train_forward,
    "frozen-affine": _idiom_frozen_affine,
    "bn-eval-in-train-model": _idiom_partly_eval,
    "momentum-flipped": _idiom_flip("momentum", 0.5),
    "momentum-None-flipped": _idiom_flip("momentum", None),
    "eps-flipped": _idiom_flip("eps", 0.3),
    "reset_running_stats-reset_parameters": _idiom_resets,
    "sgd-clip_grad_norm": _idiom_sgd_with_clipping,
}


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_training_loop_idiom_matches_torch(idiom: str):
    ref, ours = _twins()
    xs = _batches()
    for m in (ref, ours):
        IDIOMS[idiom](m, xs)
    _assert_same_state(ref, ours)
    for extra in ("input_grad", "eval_out", "clip_norms"):
        if hasattr(ref, extra):
            torch.testing.assert_close(getattr(ours, extra), getattr(ref, extra), **TOL)


_FLIPPABLE: dict[str, Callable[..., nn.Module]] = {
    "BatchNorm2d": lambda **k: nkn.BatchNorm2d(C, **k),
    "InstanceNorm2d-tracked": lambda **k: nkn.InstanceNorm2d(C, affine=True, track_running_stats=True, **k),
    "GroupNorm": lambda **k: nkn.GroupNorm(3, C, **k),
    "LayerNorm2d": lambda **k: nkn.LayerNorm2d(C, **k),
    "LayerNorm2d-chw": lambda **k: nkn.LayerNorm2d(C, over="chw", **k),
    "BatchRenorm2d": lambda **k: nkn.BatchRenorm2d(C, **k),
    "GhostBatchNorm2d": lambda **k: nkn.GhostBatchNorm2d(C, ghost_batch_size=2, **k),
    "FrozenBatchNorm2d": lambda **k: nkn.FrozenBatchNorm2d(C, **k),
    "BatchNormAct2d": lambda **k: nkn.BatchNormAct2d(C, activation="relu", **k),
    "GroupNormAct2d": lambda **k: nkn.GroupNormAct2d(C, num_groups=2, **k),
    "SyncBatchNorm": lambda **k: nkn.SyncBatchNorm(C, **k),
    "ln+pn": lambda **k: normkit.create_norm_layer("ln+pn", C, **k),
    "MeanOnlyBatchNorm": lambda **k: nkn.MeanOnlyBatchNorm(C, **k),
    "StdConv2d": lambda **k: nkn.StdConv2d(C, C, 3, padding=1, **k),
    "ScaledStdConv2d": lambda **k: nkn.ScaledStdConv2d(C, C, 3, padding=1, **k),
    "brn-act": lambda **k: normkit.create_norm_act_layer("brn", C, "silu", **k),
    "gbn-act": lambda **k: normkit.create_norm_act_layer("gbn:2", C, "silu", **k),
}
_NO_MOMENTUM = ("GroupNorm", "GroupNormAct2d", "LayerNorm2d", "LayerNorm2d-chw", "ln+pn")
_FLIPS = [
    pytest.param(name, attr, value, id=f"{name}-{attr}={value}")
    for name in _FLIPPABLE
    for attr, value in (("eps", 0.5), ("momentum", 0.7), ("momentum", None))
    if not (attr == "eps" and name == "MeanOnlyBatchNorm")
    and not (attr == "momentum" and name in _NO_MOMENTUM)
    and not (attr == "momentum" and name.startswith(("StdConv", "ScaledStdConv")))
]


@pytest.mark.parametrize(("name", "attr", "value"), _FLIPS)
def test_attribute_flipped_after_construction_equals_building_with_it(name: str, attr: str, value):
    """``m.eps = ...`` / ``m.momentum = ...`` on a built layer acts as the constructor argument does
    (torch.nn's layers read both at every forward)."""
    build = _FLIPPABLE[name]
    torch.manual_seed(0)
    want = build(**{attr: value})
    torch.manual_seed(0)
    got = build()
    got.load_state_dict(want.state_dict())
    setattr(got, attr, value)
    x = torch.randn(4, C, 5, 5, generator=torch.Generator().manual_seed(3)) * 2 + 1
    for train in (True, True, False):
        torch.testing.assert_close(got.train(train)(x), want.train(train)(x), rtol=0, atol=0)
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_proxy_norm_act_eps_flipped_after_construction_equals_building_with_it():
    x = torch.randn(4, C, 5, 5, generator=torch.Generator().manual_seed(3))
    want, got = nkn.ProxyNormAct(C, eps=0.5), nkn.ProxyNormAct(C)
    got.eps = 0.5
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)


# --- gradient checkpointing: the number of running-statistics updates --------------------------------


@pytest.mark.parametrize(
    ("dtype", "updates"),
    [
        pytest.param(torch.float32, 2, id="float32"),
        pytest.param(torch.float64, 2, id="float64"),
        # the half-precision path writes its buffers after its last saved tensor: torch's early stop
        # ends the recomputation first, so the statistics update once, as without the checkpoint
        # (docs/differences.md, "Gradient checkpointing")
        pytest.param(torch.bfloat16, 1, id="bfloat16"),
        pytest.param(torch.float16, 1, id="float16"),
    ],
)
def test_bn_ending_a_checkpointed_segment_updates_its_statistics_as_documented(dtype, updates):
    """torch.nn's BN ending a ``use_reentrant=False`` segment updates twice (its recomputation reaches
    the buffer write); normkit's does in float32 / float64, and once in half precision. Oracle: torch.nn's
    BN, checkpointed (two updates) or not (one)."""
    x = torch.randn(4, C, 5, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = nn.BatchNorm2d(C, dtype=dtype).train()
    y = checkpoint(ref, x.clone().requires_grad_(), use_reentrant=False) if updates == 2 else ref(x)
    y.float().square().sum().backward()
    ours = nkn.BatchNorm2d(C, dtype=dtype).train()
    checkpoint(ours, x.clone().requires_grad_(), use_reentrant=False).float().square().sum().backward()
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == updates
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-2, atol=1e-2)


def _renorm_block() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nkn.BatchRenorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )
    with torch.no_grad():  # running statistics far from the batch's: r and d are not 1 and 0
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.3, 1.5)
    return m.train()


def _assert_checkpointed_equals_plain(results: list) -> None:
    """``[(grads, buffers) plain, (grads, buffers) checkpointed]``: the same gradients, the same buffers."""
    (g_ref, b_ref), (g_ck, b_ck) = results
    for a, b in zip(g_ck, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(b_ck, b_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _renorm_head(m: nn.Sequential, x: torch.Tensor, ckpt: bool) -> torch.Tensor:
    h = checkpoint(m[:3], x, use_reentrant=False) if ckpt else m[:3](x)
    return m[3](h)


def _grads(m: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in m.parameters()]


def test_batch_renorm_checkpoint_with_a_no_grad_train_forward_before_the_backward():
    """A train-mode no_grad pass on the same batch (pseudo-labels, train accuracy) between a
    checkpointed forward and its backward: the gradients must be those of the un-checkpointed step
    (Batch Renorm's r and d are those its forward used), and the statistics are updated once per
    forward. Batch Renorm is the first layer of the checkpointed segment (as in a pre-activation block,
    BN -> ReLU -> conv, checkpointed per block); deeper
    in a segment the pairing depends on where the allocator puts the recomputed input (measured: wrong
    in some runs, right in others)."""
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    results = []
    for ckpt in (False, True):
        m = _renorm_block()
        h = m[0](x)
        y = m[3](checkpoint(m[1:3], h, use_reentrant=False) if ckpt else m[1:3](h))
        with torch.no_grad():
            m[1:3](h)
        y.square().mean().backward()
        results.append((_grads(m), [b.clone() for b in m.buffers()]))
    _assert_checkpointed_equals_plain(results)


def test_batch_renorm_checkpoint_with_many_forwards_before_one_backward():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 3, 6, 6, generator=g) * 2 + 1 for _ in range(17)]
    results = []
    for ckpt in (False, True):
        m = _renorm_block()
        sum(_renorm_head(m, x, ckpt).square().mean() for x in xs).backward()
        results.append((_grads(m), [b.clone() for b in m.buffers()]))
    (g_ref, b_ref), (g_ck, b_ck) = results
    assert b_ck[2].item() == b_ref[2].item() == len(xs)  # num_batches_tracked: one update per forward
    for a, b in zip(g_ck, g_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_batch_renorm_checkpoint_alternating_forward_backward_equals_plain():
    """The common arrangement (each checkpointed forward followed by its backward, with a no_grad
    pass *before* the forward) pairs correctly."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 6, 6, generator=g) * 2 + 1 for _ in range(3)]
    results = []
    for ckpt in (False, True):
        m = _renorm_block()
        for x in xs:
            with torch.no_grad():
                m(x * 3)
            _renorm_head(m, x, ckpt).square().mean().backward()
        results.append((_grads(m), [b.clone() for b in m.buffers()]))
    _assert_checkpointed_equals_plain(results)


# --- "freeze BN" by isinstance --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bn", "brn", "gbn:2"])
@pytest.mark.parametrize("with_act", [False, True], ids=["norm", "norm-act"])
def test_freeze_bn_by_isinstance_reaches_every_2d_batch_norm(spec: str, with_act: bool):
    """``for m in model.modules(): if isinstance(m, nn.BatchNorm2d): m.eval()`` (torchvision,
    detectron2, timm fine-tuning code) freezes the layer: its running statistics stay as they were."""
    layer = normkit.create_norm_act_layer(spec, 6, "relu") if with_act else normkit.create_norm_layer(spec, 6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), layer).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    before = [b.clone() for b in layer.buffers()]
    model(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 2)
    assert not layer.training
    for a, b in zip(layer.buffers(), before, strict=True):
        assert torch.equal(a, b)


# --- 3. EMA / SWA -----------------------------------------------------------------------------------------


def _ema_v1(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """timm's ModelEma: lerp the float entries of the state_dict, copy the integer ones."""
    with torch.no_grad():
        msd = model.state_dict()
        for k, ev in ema.state_dict().items():
            if ev.dtype.is_floating_point:
                ev.mul_(decay).add_(msd[k], alpha=1 - decay)
            else:
                ev.copy_(msd[k])


def _ema_v2(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """timm's ModelEmaV2: every state_dict value, integers included."""
    with torch.no_grad():
        for ev, mv in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            ev.copy_(decay * ev + (1.0 - decay) * mv)


@pytest.mark.parametrize(
    "how", ["averaged-model-ema-buffers", "averaged-model-swa", "model-ema-v1", "model-ema-v2"]
)
def test_ema_and_swa_match_torch(how: str):
    ref, ours = _twins()
    xs = _batches(5)
    avgs = []
    for m in (ref, ours):
        if how == "averaged-model-ema-buffers":
            avg = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        elif how == "averaged-model-swa":
            avg = AveragedModel(m)
        else:
            avg = copy.deepcopy(m).eval()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for x in xs:
            m.train()
            opt.zero_grad()
            _step_plain(m, x)
            opt.step()
            if isinstance(avg, AveragedModel):
                avg.update_parameters(m)
            else:
                (_ema_v1 if how == "model-ema-v1" else _ema_v2)(avg, m, 0.9)
        if how == "averaged-model-swa":
            update_bn([(x,) for x in xs], avg)
        avgs.append(avg.module if isinstance(avg, AveragedModel) else avg)
    _assert_same_state(avgs[0], avgs[1], grads=False)
    x = xs[0]
    torch.testing.assert_close(avgs[1].eval()(x), avgs[0].eval()(x), **TOL)


def _normkit_only_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1),
        nkn.BatchRenorm2d(C),
        nn.ReLU(),
        nkn.StdConv2d(C, C, 3, padding=1),
        normkit.create_norm_layer("ln+pn", C),
        nkn.ScaledStdConv2d(C, C, 3, padding=1),
        nkn.GhostBatchNorm2d(C, 2),
        nn.ReLU(),
        nkn.MeanOnlyBatchNorm(C),
        nkn.FrozenBatchNorm2d(C),
        nkn.BatchNormAct2d(C),
        nkn.InstanceNorm2d(C, affine=True, track_running_stats=True),
        nkn.LayerNorm2d(C),
        nkn.GroupNormAct2d(C, 2),
    )


def test_averaged_models_of_normkit_only_layers_keep_their_buffers():
    """AveragedModel (EMA over buffers, and SWA + update_bn) over the layers without a torch twin: the
    quadrature points stay exactly the freshly computed ones, buffers keep their dtypes and stay finite,
    and update_bn rebuilds each BN-family layer's statistics as the mean of the batch statistics."""
    m = _normkit_only_model().train()
    points = normkit.create_norm_layer("ln+pn", C).proxy_points.clone()
    dtypes = [b.dtype for b in m.buffers()]
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    swa = AveragedModel(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    xs = [x.float() for x in _batches(4, batch=4)]
    for x in xs:
        opt.zero_grad()
        _step_plain(m, x)
        opt.step()
        ema.update_parameters(m)
        swa.update_parameters(m)
    update_bn(xs, swa)
    for avg in (ema.module, swa.module):
        assert torch.equal(avg[4].proxy_points, points)
        assert [b.dtype for b in avg.buffers()] == dtypes
        assert all(b.isfinite().all() for b in avg.buffers() if b.is_floating_point())
        assert avg.eval()(xs[0]).isfinite().all()
    # update_bn: the first Batch Renorm layer's running mean is the mean of its inputs' batch means
    with torch.no_grad():
        means = torch.stack([swa.module[0](x).mean((0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(swa.module[1].running_mean, means, **TOL)


# --- 4. copies and serialization ----------------------------------------------------------------------


def _copies(m: nn.Module, x: torch.Tensor) -> Iterator[tuple[str, nn.Module]]:
    yield "deepcopy", copy.deepcopy(m)
    yield "pickle", pickle.loads(pickle.dumps(m))
    yield "share_memory", copy.deepcopy(m).share_memory()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    yield "torch.save", torch.load(buf, weights_only=False)
    if x.dim() == 4:
        yield "channels_last", copy.deepcopy(m).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_copies_train_on_as_the_original(sample: Sample, train: bool):
    """A copy (deepcopy, pickle, shared memory, torch.save/load, channels_last) continues exactly as the
    original: two more steps give the same outputs, gradients, state_dict and buffers."""
    x = sample.input()
    m = sample.module(train)
    run(m, x)  # one step first: copies of a layer with a history
    has_grads = any(p.requires_grad for p in m.parameters())
    for how, c in _copies(m, x):
        r = copy.deepcopy(m)
        for _ in range(2):
            if has_grads:
                (y1, g1), (y2, g2) = run(r, x), run(c, x)
                for k in g1:
                    assert torch.equal(g2[k], g1[k]), f"{how}: gradient {k}"
            else:
                y1, y2 = r(x), c(x)
            assert torch.equal(y2, y1), f"{how}: output"
        for (k, a), (k2, b) in zip(r.named_buffers(), c.named_buffers(), strict=True):
            assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), f"{how}: buffer {k}"


def _standardized_f64(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    w = w.detach().to(F64)
    mean = w.mean((1, 2, 3), keepdim=True)
    var = w.var((1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) / (var + eps).sqrt()


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_torch_parametrizations_on_std_conv(wrap: str):
    """torch's weight_norm / spectral_norm parametrizations on StdConv2d: the conv standardizes the
    parametrized weight (float64 closed form), gradients reach the parametrization, copies work."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    conv = nkn.StdConv2d(C, C, 3, padding=1)
    getattr(parametrizations, wrap)(conv)
    conv.eval()
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(1))
    y = conv(x)
    want = F.conv2d(x.to(F64), _standardized_f64(conv.weight), conv.bias.detach().to(F64), padding=1)
    torch.testing.assert_close(y.to(F64), want, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    torch.testing.assert_close(copy.deepcopy(conv)(x), y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("build", [nn.BatchNorm2d, nn.GroupNorm], ids=["BatchNorm2d", "GroupNorm"])
def test_weight_norm_on_a_norm_weight_matches_torch(build):
    from torch.nn.utils.parametrizations import weight_norm

    mk = {nn.BatchNorm2d: (nkn.BatchNorm2d, (C,)), nn.GroupNorm: (nkn.GroupNorm, (3, C))}[build]
    ref, ours = build(*mk[1]), mk[0](*mk[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        weight_norm(m, dim=0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, C, 5, 5, generator=torch.Generator().manual_seed(2))
    yr, yo = ref.train()(x), ours.train()(x)
    torch.testing.assert_close(yo, yr, **TOL)
    (yr * x).sum().backward()
    (yo * x).sum().backward()
    for (k, a), b in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.parametrize(
    "build",
    [
        lambda: nkn.BatchNorm2d(C),
        lambda: nkn.BatchRenorm2d(C),
        lambda: nkn.GhostBatchNorm2d(C, 2),
        lambda: nkn.SyncBatchNorm(C),
        lambda: nkn.FrozenBatchNorm2d(C),
    ],
    ids=["BatchNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "SyncBatchNorm", "FrozenBatchNorm2d"],
)
def test_fuse_conv_bn_eval_equals_conv_then_norm(build):
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, C, 3).eval(), build().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    # float64 closed form of BN(conv(x)) in eval
    z = F.conv2d(x.to(F64), conv.weight.detach().to(F64), conv.bias.detach().to(F64))
    shape = (1, -1, 1, 1)
    want = (z - bn.running_mean.to(F64).view(shape)) / (bn.running_var.to(F64).view(shape) + bn.eps).sqrt()
    want = want * bn.weight.detach().to(F64).view(shape) + bn.bias.detach().to(F64).view(shape)
    torch.testing.assert_close(fuse_conv_bn_eval(conv, bn)(x).to(F64), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn(conv(x)).to(F64), want, rtol=1e-5, atol=1e-5)


# --- 5. batch independence and determinism --------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_batch_independence_in_training_is_what_the_layer_says(sample: Sample):
    """Sample 0's training output does not depend on the rest of the batch for the batch-free layers
    (GN, LN, LayerNorm2d, IN, Proxy Norm, Frozen BN, standardized convs: bit for bit, and equal to the
    sample alone), and does for the batch norms."""
    x = sample.input()
    other = x.clone()
    other[1:] = other[1:] * 3 + 1
    y = sample.module(True)(x)
    y_other = sample.module(True)(other)
    if sample.batch_free:
        torch.testing.assert_close(y_other[:1], y[:1], rtol=0, atol=0)
        layout = torch.channels_last if sample.channels_last else torch.contiguous_format
        first = x[:1].clone(memory_format=layout)
        alone = sample.module(True)(first)
        torch.testing.assert_close(alone, y[:1], rtol=1e-5, atol=1e-5)
        xx = x.clone().requires_grad_()
        sample.module(True)(xx)[0].square().sum().backward()
        assert torch.equal(xx.grad[1:], torch.zeros_like(xx.grad[1:]))
    elif "tracked" not in sample.name:  # (tracked IN: the output is per sample, the statistics are not)
        assert not torch.allclose(y_other[:1], y[:1], rtol=1e-3, atol=1e-3)


def _run_all(sample: Sample, train: bool):
    y, g = run(sample.module(train), sample.input())
    return [y, *(g[k] for k in sorted(g))]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_determinism_repeat_deterministic_algorithms_and_thread_counts(sample: Sample, train: bool):
    """The same input twice gives bit-identical outputs and gradients; under
    ``torch.use_deterministic_algorithms(True)`` nothing raises or warns and the results are the same
    bits; with 1 thread instead of 2 they agree within float32 rounding."""
    base = _run_all(sample, train)
    for a, b in zip(_run_all(sample, train), base, strict=True):
        assert torch.equal(a, b)
    was = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            det = _run_all(sample, train)
        for a, b in zip(det, base, strict=True):
            assert torch.equal(a, b)
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(1)
        one = _run_all(sample, train)
        torch.set_num_threads(2)
        two = _run_all(sample, train)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * max(1.0, b.abs().max().item()))
