"""normkit.nn.SyncBatchNorm on real gloo worlds of 2 and 3 processes, against single-process BN on the
concatenated batch.

The oracle is ``tests.reference`` (float64 two-pass BN, independent of normkit) with autograd
through it for ``dx``, ``dweight`` and ``dbias``, on the global batch every rank's slice was
cut from. Each world runs once (see ``conftest.py``); a hang fails the world after its timeout.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit
from tests.distributed._workers import (
    build_sync_bn,
    global_grad,
    global_input,
    global_mask,
    init_state,
    make_net,
)
from tests.distributed.conftest import SUBGROUP, TRAIN, error_cases, sync_cases
from tests.reference import ref_batch_norm
from tests.reference_family import ref_masked_channel_stats, ref_masked_norm

F64 = torch.float64
TOL = {
    F64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


def _world(request: pytest.FixtureRequest, world: int) -> list[dict[str, Any]]:
    return request.getfixturevalue(f"world{world}")


def oracle(case: dict[str, Any]) -> dict[str, Any]:
    """Single-process float64 BN on the concatenated batch: output, dx, dweight, dbias, running statistics."""
    dtype = case.get("dtype", F64)
    x = global_input(case).to(dtype).to(F64).requires_grad_(True)  # the values the ranks saw
    dy = global_grad(case).to(dtype).to(F64)
    C = case["tail"][0]
    state = init_state(case, C)
    affine, track = case.get("affine", True), case.get("track", True)
    w = state["weight"].clone().requires_grad_(True) if affine else None
    b = state["bias"].clone().requires_grad_(True) if affine else None
    rm, rv = (state["running_mean"], state["running_var"]) if track else (None, None)
    nbt = torch.tensor(case.get("nbt") or 0) if track else None
    momentum, eps = case.get("momentum", 0.1), case.get("eps", 1e-5)
    unbiased = case.get("unbiased", True)
    mask = global_mask(case)
    if mask is None:
        ref = ref_batch_norm(
            x,
            rm,
            rv,
            w,
            b,
            training=True,
            momentum=momentum,
            eps=eps,
            num_batches_tracked=nbt,
            unbiased_running_var=unbiased,
        )
        y, rm1, rv1, nbt1 = ref.output, ref.running_mean, ref.running_var, ref.num_batches_tracked
    else:
        view = (1, C, 1)
        y = ref_masked_norm(
            x, mask, (0, 2), None if w is None else w.view(view), None if b is None else b.view(view), eps
        )
        mean, var, n = ref_masked_channel_stats(x.detach(), mask)
        ok = n >= 2
        stored = var * n / (n - 1) if unbiased else var
        f = momentum
        rm1 = torch.where(ok, (1 - f) * rm + f * mean, rm)
        rv1 = torch.where(ok, (1 - f) * rv + f * stored, rv)
        nbt1 = nbt + 1
    y.backward(dy)
    if case.get("skips_update"):  # statistics that overflow the buffers are never stored (BN's rule)
        rm1, rv1, nbt1 = rm, rv, nbt
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": None if w is None else w.grad,
        "dbias": None if b is None else b.grad,
        "running_mean": rm1,
        "running_var": rv1,
        "num_batches_tracked": nbt1,
    }


def _close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(got.to(F64), want.to(F64), **TOL[dtype], msg=lambda m: f"{what}: {m}")


CASES = [pytest.param(w, k, id=f"world{w}-{k}") for w in (2, 3) for k in sync_cases(w)]


@pytest.mark.parametrize(("world", "key"), CASES)
def test_sync_bn_equals_bn_on_the_concatenated_batch(
    request: pytest.FixtureRequest, world: int, key: str
) -> None:
    case = sync_cases(world)[key]
    ranks = [r[f"sync/{key}"] for r in _world(request, world)]
    want = oracle(case)
    dtype = case.get("dtype", F64)
    _close(torch.cat([r["y"] for r in ranks]), want["y"], dtype, "output")
    _close(torch.cat([r["dx"] for r in ranks]), want["dx"], dtype, "dx")
    for k in ("dweight", "dbias"):  # per-process sums; DDP's all-reduce adds them
        if want[k] is None:
            assert all(r[k] is None for r in ranks)
        else:
            _close(sum(r[k] for r in ranks), want[k], dtype, k)
    for r in ranks:
        assert r["y_dtype"] == dtype
        for k in ("running_mean", "running_var"):
            if want[k] is None:
                assert r[k] is None
            else:
                _close(r[k], want[k], F64 if dtype == F64 else torch.float32, k)
        if want["num_batches_tracked"] is not None:
            assert int(r["num_batches_tracked"]) == int(want["num_batches_tracked"])
        # one all_gather per forward (the first forward also compares the channel count across the
        # group: one more, small), one all_reduce per backward
        assert r["forward_collectives"] == {"all_gather": 2}
        assert r["later_forward_collectives"] == {"all_gather": 1}
        assert r["collectives"] == {"all_gather": 2, "all_reduce": 1}
    if case.get("channels_last") and len(case["tail"]) == 3:
        assert all(r["y_channels_last"] and r["dx_channels_last"] for r in ranks if r["y"].numel())
    if dtype == F64:  # every rank holds bit-identical statistics
        for r in ranks[1:]:
            assert (
                torch.equal(r["running_mean"], ranks[0]["running_mean"])
                if r["running_mean"] is not None
                else True
            )
            assert (
                torch.equal(r["running_var"], ranks[0]["running_var"])
                if r["running_var"] is not None
                else True
            )


ERRORS = [pytest.param(w, k, id=f"world{w}-{k}") for w in (2, 3) for k in error_cases(w)]


@pytest.mark.parametrize(("world", "key"), ERRORS)
def test_every_rank_raises_the_same_clear_error(request: pytest.FixtureRequest, world: int, key: str) -> None:
    case = error_cases(world)[key]
    got = [r[f"error/{key}"] for r in _world(request, world)]
    assert all(g["type"] is not None for g in got), got  # no rank went on (and none hung: the world finished)
    assert all(g["buffers_unchanged"] for g in got)
    bad = case.get("bad_rank")
    if bad is None:  # the global count is 1: the same message everywhere
        assert len({g["message"] for g in got}) == 1
        msg = got[0]["message"]
        assert got[0]["type"] == "NormError"
        assert "expected more than 1 value per channel" in msg and "got 1" in msg
        assert str(case["splits"]) in msg  # the per-process counts, for the user to see
        return
    own = got[bad]
    want_type = "TypeError" if case["bad"] == "integer" else "NormError"
    assert own["type"] == want_type
    assert {"channels": "channels", "integer": "floating-point", "rank1": "(N, C, ...)"}[case["bad"]] in own[
        "message"
    ]
    others = [g for i, g in enumerate(got) if i != bad]
    assert len({g["message"] for g in others}) == 1
    assert others[0]["type"] == "NormError" and f"process(es) [{bad}]" in others[0]["message"]


def test_functional_form_returns_the_statistics_and_writes_no_argument(world2: list[dict[str, Any]]) -> None:
    case = sync_cases(2)["uneven-4d-channels-last"]
    want = oracle({**case, "channels_last": False})
    ranks = [r["functional"] for r in world2]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), want["y"], **TOL[F64])
    for r in ranks:
        assert r["arguments_unchanged"]
        torch.testing.assert_close(r["running_mean"], want["running_mean"], **TOL[F64])
        torch.testing.assert_close(r["running_var"], want["running_var"], **TOL[F64])
        assert int(r["num_batches_tracked"]) == 1


def test_eval_mode_and_a_one_process_group_issue_no_collective(world2: list[dict[str, Any]]) -> None:
    from tests.distributed.conftest import EVAL

    for rank, r in enumerate(world2):
        e = r["eval"]
        assert e["eval_collectives"] == 0 and e["solo_collectives"] == 0
        sl = slice(sum(EVAL["splits"][:rank]), sum(EVAL["splits"][: rank + 1]))
        x = global_input(EVAL)[sl]
        state = init_state(EVAL, 3)
        # eval: the affine map from the running statistics
        ref = ref_batch_norm(x, state["running_mean"], state["running_var"], state["weight"], state["bias"])
        torch.testing.assert_close(e["eval_y"], ref.output, rtol=1e-9, atol=1e-10)
        # alone in its group: BN on its own batch
        ref = ref_batch_norm(
            x, state["running_mean"], state["running_var"], state["weight"], state["bias"], training=True
        )
        torch.testing.assert_close(e["solo_y"], ref.output, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(e["solo_rv"], ref.running_var, rtol=1e-9, atol=1e-10)


def test_process_group_argument_synchronises_its_members_only(world3: list[dict[str, Any]]) -> None:
    members, splits = SUBGROUP["members"], SUBGROUP["splits"]
    full = global_input(SUBGROUP)
    bounds = [sum(splits[:r]) for r in range(len(splits) + 1)]
    parts = {r: full[bounds[r] : bounds[r + 1]] for r in range(len(splits))}
    state = init_state(SUBGROUP, 3)

    def ref(x: Tensor) -> Any:
        return ref_batch_norm(
            x, state["running_mean"], state["running_var"], state["weight"], state["bias"], training=True
        )

    joint = ref(torch.cat([parts[r] for r in members]))
    start = 0
    for r in members:
        n = splits[r]
        got = world3[r]["subgroup"]
        torch.testing.assert_close(got["y"], joint.output[start : start + n], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got["running_var"], joint.running_var, rtol=1e-9, atol=1e-10)
        start += n
    alone = next(r for r in range(3) if r not in members)
    solo = ref(parts[alone])
    torch.testing.assert_close(world3[alone]["subgroup"]["y"], solo.output, rtol=1e-9, atol=1e-10)
    assert world3[alone]["subgroup"]["collectives"] == {}


@pytest.mark.parametrize("world", [2, 3])
def test_three_ddp_steps_with_sync_bn_equal_single_process_training(
    request: pytest.FixtureRequest, world: int
) -> None:
    """A net converted with normkit.convert_sync_batchnorm under DDP on CPU (gloo), uneven shards
    (world 3 has an empty rank): the parameters and running statistics after 3 SGD steps equal
    single-process training on the concatenated batches."""
    case = TRAIN[world]
    ranks = [r["train_steps"] for r in _world(request, world)]
    torch.manual_seed(case["seed"])
    net = make_net(case)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        c = {**case, "seed": case["seed"] + 10 * step}
        x, target = global_input(c), global_grad(c)[:, 0, 0, :3]
        loss = ((net(x) - target) ** 2).sum() / sum(c["splits"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = net.state_dict()
    for r in ranks:
        assert "SyncBatchNorm" in r["kinds"] and "BatchNorm2d" not in r["kinds"]
        assert list(r["params"]) == list(want)
        for k, v in want.items():
            torch.testing.assert_close(
                r["params"][k], v, rtol=1e-8, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}"
            )


def test_the_oracle_is_not_the_per_process_statistics() -> None:
    """Guard against a vacuous comparison: with uneven splits, per-process BN differs from the global one."""
    case = sync_cases(2)["uneven-4d-channels-last"]
    x = global_input(case)
    local = ref_batch_norm(x[:5], None, None, training=True).output
    glob = ref_batch_norm(x, None, None, training=True).output[:5]
    assert (local - glob).abs().max() > 1e-3


# --- single process: no process group -------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 5, 5), (2, 3, 2, 3, 3)])
def test_without_a_process_group_it_is_batch_norm(shape: tuple[int, ...], train: bool) -> None:
    case = dict(tail=shape[1:], splits=[shape[0]], seed=3)
    layer = build_sync_bn(case).train(train)
    x = global_input(case).requires_grad_(True)
    y = layer(x)
    state = init_state(case, shape[1])
    xr = x.detach().clone().requires_grad_(True)
    w, b = state["weight"].clone().requires_grad_(True), state["bias"].clone().requires_grad_(True)
    ref = ref_batch_norm(
        xr,
        state["running_mean"],
        state["running_var"],
        w,
        b,
        training=train,
        num_batches_tracked=torch.tensor(0),
    )
    dy = global_grad(case)
    y.backward(dy)
    ref.output.backward(dy)
    torch.testing.assert_close(y, ref.output, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-9, atol=1e-10)
    assert int(layer.num_batches_tracked) == (1 if train else 0)


def test_constructor_state_dict_and_errors() -> None:
    layer = normkit.nn.SyncBatchNorm(4, 1e-3, 0.2, process_group=None)
    assert (layer.eps, layer.momentum, layer.process_group) == (1e-3, 0.2, None)
    bn = nn.BatchNorm2d(4, 1e-3, 0.2)
    bn(torch.randn(5, 4, 3, 3))
    assert list(layer.state_dict()) == list(bn.state_dict())
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x))
    with pytest.raises(normkit.NormError, match="momentum must be"):
        normkit.nn.SyncBatchNorm(4, momentum=2.0)
    with pytest.raises(normkit.NormError, match=r"expected 4 channels"):
        normkit.nn.SyncBatchNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(normkit.NormError, match=r"expected at least 2D input"):
        normkit.nn.SyncBatchNorm(4)(torch.randn(4))
    x6 = torch.randn(2, 4, 2, 1, 2, 1)  # any rank from 2, as torch's (5D was the most before)
    torch.testing.assert_close(normkit.nn.SyncBatchNorm(4)(x6), nn.SyncBatchNorm(4)(x6))
    with pytest.raises(normkit.NormError, match="more than 1 value per channel"):
        normkit.nn.SyncBatchNorm(4)(torch.randn(1, 4))
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(layer, torch.nn.SyncBatchNorm)  # DDP refuses those on CPU


def test_swa_update_bn_and_fuse_find_it() -> None:
    """isinstance tools reach SyncBatchNorm (it is a torch.nn _BatchNorm)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, sbn = nn.Conv2d(2, 3, 3).double().eval(), normkit.nn.SyncBatchNorm(3, dtype=F64).eval()
    with torch.no_grad():
        sbn.running_mean.uniform_(-1, 1)
        sbn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 2, 5, 5, dtype=F64)
    torch.testing.assert_close(fuse_conv_bn_eval(conv, sbn)(x), sbn(conv(x)))
    net = nn.Sequential(normkit.nn.SyncBatchNorm(2))
    torch.optim.swa_utils.update_bn([torch.randn(8, 2) + 3.0], net)
    assert net[0].running_mean.min() > 2.0


def test_registry_spec() -> None:
    assert type(normkit.create_norm_layer("syncbn", 8, momentum=0.2)) is normkit.nn.SyncBatchNorm
    assert normkit.get_norm_layer("syncbn") is normkit.nn.SyncBatchNorm
    assert "syncbn" in normkit.available_norms()


def test_compile_sees_plain_bn_without_a_process_group() -> None:
    torch._dynamo.reset()
    for train in (True, False):
        layer, ref = normkit.nn.SyncBatchNorm(3).train(train), nn.BatchNorm2d(3).train(train)
        x = torch.randn(4, 3, 5, 5)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        assert torch._dynamo.explain(normkit.nn.SyncBatchNorm(3).train(train))(x).graph_break_count == 0
    torch._dynamo.reset()


def test_processes_that_disagree_on_sizes_all_raise_a_clear_error(world2: list[dict[str, Any]]) -> None:
    """Channel counts (functional form), buffer sets (sync_bn_buffers) or BN layers (recalibrate_bn)
    that differ between processes: gloo would abort every process (std::terminate) or leave the
    others waiting; instead every process raises a NormError that gives the sizes."""
    r0, r1 = (r["mismatch"] for r in world2)
    for key, words in {
        "functional_channels": ["same channel count", "[3, 5]"],
        "module_channels": ["SyncBatchNorm: expected the same channel count", "[3, 5]"],
        "buffers_sizes": ["same normalization buffers", "[7, 9]"],
        "buffers_none_on_1": ["same normalization buffers", "[7, 0]"],
        "recalibrate_sizes": ["same BN layers", "between 3 and 4"],
    }.items():
        for r in (r0, r1):
            assert r[key]["type"] == "NormError", (key, r[key])
            assert all(w in r[key]["message"] for w in words), (key, r[key]["message"])
    # a process that cannot tell its channel count, or got a bad eps, raises its own error; the others name it
    own_errors = {"functional_no_channels": "cannot tell the channel count", "functional_eps": "eps"}
    for key, own in own_errors.items():
        assert r1[key]["type"] == "NormError" and own in r1[key]["message"], r1[key]
        assert r0[key]["type"] == "NormError" and "process(es) [1]" in r0[key]["message"], r0[key]
    assert r0["after"] == (4, 3, 5) and r1["after"] == (4, 3, 5)
