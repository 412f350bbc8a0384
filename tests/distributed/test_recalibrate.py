"""normkit.recalibrate_bn (precise BN) against population statistics computed directly in float64.

The oracle replays the forward pass with torch.nn.functional ops (batch statistics per batch, as
in training), collects what each BN layer sees, and takes the mean and the unbiased variance of
all of it at once. One process here; two processes on the world-2 results (see conftest.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import normkit
import normkit.nn as nkn
from normkit import NormError
from tests.distributed._spawn import run_world
from tests.distributed._workers import recal_batches, recal_net
from tests.distributed.conftest import RECAL

F64 = torch.float64
TOL = dict(  # normkit pools fp32-accurate per-batch moments of float64 inputs: far tighter in practice
    rtol=1e-5, atol=1e-6
)


def population(
    values: list[Tensor], dims: tuple[int, ...] = (0, 2, 3), unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and variance over every value of every tensor (per channel, dim 1), float64, two-pass."""
    flat = torch.cat([v.to(F64).movedim(1, -1).reshape(-1, v.shape[1]) for v in values])
    mean = flat.mean(0)
    var = ((flat - mean) ** 2).sum(0) / (flat.shape[0] - (1 if unbiased else 0))
    return mean, var


def _bn(x: Tensor, layer: nn.Module) -> Tensor:
    return TF.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)


class Net(nn.Module):
    """BN on the input, conv, Ghost BN, ReLU, a BN called twice (full and subsampled), conv, Frozen BN,
    InstanceNorm with running statistics, conv, torch BN; float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn0 = nkn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.ghost = nkn.GhostBatchNorm2d(4, ghost_batch_size=2)
        self.twice = nkn.BatchNorm2d(4, unbiased_running_var=False)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.frozen = nkn.FrozenBatchNorm2d(4)
        self.inorm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.conv3 = nn.Conv2d(4, 5, 1)
        self.bn3 = nn.BatchNorm2d(5)
        self.double()
        with torch.no_grad():
            for m in (self.bn0, self.ghost, self.twice, self.bn3):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.fill_(7.0)
                m.running_var.fill_(7.0)
                m.num_batches_tracked.fill_(5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.ghost(self.conv1(self.bn0(x))))
        h = self.twice(h) + self.twice(h[:, :, ::2, ::2]).mean()
        h = self.inorm(self.frozen(self.conv2(h)))
        return self.bn3(self.conv3(h))


def replay(net: Net, batches: list[Tensor]) -> dict[str, list[Tensor]]:
    """What each recalibrated layer sees, computed with torch.nn.functional (batch statistics, train mode)."""
    seen: dict[str, list[Tensor]] = {"bn0": [], "ghost": [], "twice": [], "bn3": []}
    with torch.no_grad():
        for x in batches:
            seen["bn0"].append(x)
            h = net.conv1(_bn(x, net.bn0))
            seen["ghost"].append(h)
            h = torch.relu(torch.cat([_bn(c, net.ghost) for c in h.split(2)]))
            sub = h[:, :, ::2, ::2]
            seen["twice"] += [h, sub]
            h = _bn(h, net.twice) + _bn(sub, net.twice).mean()
            h = net.conv2(h)
            h = (h - net.frozen.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
                net.frozen.running_var.view(1, -1, 1, 1) + 1e-5
            )
            h = TF.instance_norm(h, eps=net.inorm.eps)
            seen["bn3"].append(net.conv3(h))
    return seen


def _batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 4, 4, generator=g, dtype=F64) * 2 + 1 for n in (4, 1, 6, 3, 5)]


def test_population_statistics_of_every_layer_one_process() -> None:
    net = Net().eval()
    net.ghost.train()  # a mixed train/eval state: restored exactly
    batches = _batches()
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    momenta = {name: m.momentum for name, m in net.named_modules() if hasattr(m, "momentum")}
    seen = replay(net, batches)

    out = normkit.recalibrate_bn(net, batches, progress=False)

    assert out is net
    for name in ("bn0", "ghost", "twice", "bn3"):
        layer = getattr(net, name)
        mean, var = population(seen[name], unbiased=name != "twice")  # 'twice' stores the biased variance
        torch.testing.assert_close(
            layer.running_mean, mean, **TOL, msg=lambda m, name=name: f"{name} mean: {m}"
        )
        torch.testing.assert_close(layer.running_var, var, **TOL, msg=lambda m, name=name: f"{name} var: {m}")
        assert int(layer.num_batches_tracked) == 5  # kept (Batch Renorm's warm-up reads it)
    for k, v in net.state_dict().items():  # every other buffer is as before: Frozen BN, InstanceNorm, affine
        if not any(k.startswith(n + ".running_") for n in ("bn0", "ghost", "twice", "bn3")):
            assert torch.equal(v, buffers[k]), k
    assert not net.training and net.ghost.training and not net.bn3.training
    assert {name: m.momentum for name, m in net.named_modules() if hasattr(m, "momentum")} == momenta


def test_it_is_the_population_variance_not_the_mean_of_batch_variances() -> None:
    """swa_utils.update_bn averages the per-batch variances (it misses the variance of the batch means)."""
    g = torch.Generator().manual_seed(2)
    batches = [  # the batch means differ
        torch.randn(8, 2, generator=g, dtype=F64) + 3.0 * i for i in range(4)
    ]
    ours, theirs = nn.Sequential(nkn.BatchNorm1d(2, dtype=F64)), nn.Sequential(nkn.BatchNorm1d(2, dtype=F64))
    normkit.recalibrate_bn(ours, batches, progress=False)
    torch.optim.swa_utils.update_bn(batches, theirs)
    mean, var = population(batches, dims=(0,))
    torch.testing.assert_close(ours[0].running_var, var, **TOL)
    torch.testing.assert_close(ours[0].running_mean, mean, **TOL)
    assert (theirs[0].running_var < 0.5 * var).all()  # what the issue reported


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nkn.BatchNorm1d(3, dtype=F64)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = (torch.arange(x.shape[-1]) < lengths[:, None])[:, None, :]  # (N, 1, L)
        return self.bn(x, mask=mask)


def test_masked_inputs_count_their_valid_values_only() -> None:
    g = torch.Generator().manual_seed(3)
    batches = []
    for n, L in ((3, 5), (2, 7), (4, 4)):
        x = torch.randn(n, 3, L, generator=g, dtype=F64) * 2 + 1
        lengths = torch.randint(1, L + 1, (n,), generator=g)
        x = torch.where(torch.arange(L) < lengths[:, None, None], x, torch.full_like(x, 1e6))  # padding: huge
        batches.append({"x": x, "lengths": lengths})
    net = _Masked()
    normkit.recalibrate_bn(net, batches, progress=False)
    valid = torch.cat(
        [b["x"].movedim(1, -1)[torch.arange(b["x"].shape[-1]) < b["lengths"][:, None]] for b in batches]
    )
    torch.testing.assert_close(net.bn.running_mean, valid.mean(0), **TOL)
    torch.testing.assert_close(net.bn.running_var, valid.var(0), **TOL)


def test_limits_loader_forms_keras_layer_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    batches = _batches()
    pairs = [(x, torch.zeros(len(x))) for x in batches]
    net = nn.Sequential(nkn.BatchNorm2d(3, dtype=F64))
    normkit.recalibrate_bn(net, pairs, num_batches=2, progress=True)
    mean, var = population(batches[:2])
    torch.testing.assert_close(net[0].running_mean, mean, **TOL)
    torch.testing.assert_close(net[0].running_var, var, **TOL)
    assert "recalibrate_bn" in capsys.readouterr().err  # the rich bar, on stderr

    keras = nkn.BatchNormalization(3, dtype=F64)  # channels last, biased moving variance
    normkit.recalibrate_bn(keras, [x.movedim(1, -1) for x in batches], progress=False)
    mean, var = population(batches, unbiased=False)
    torch.testing.assert_close(keras.moving_mean, mean, **TOL)
    torch.testing.assert_close(keras.moving_variance, var, **TOL)


def test_unused_layers_warn_and_non_finite_values_are_never_stored() -> None:
    net = nn.ModuleDict({"used": nkn.BatchNorm1d(2), "unused": nkn.BatchNorm1d(2)})
    net.forward = lambda x: net["used"](x)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match=r"1 BN layer\(s\) saw no values in 2 batch\(es\).*unused"):
        normkit.recalibrate_bn(net, [torch.randn(4, 2), torch.randn(4, 2)], progress=False)
    assert torch.equal(net["unused"].running_var, torch.ones(2))

    bn = nkn.BatchNorm1d(2)
    good, bad = torch.randn(4, 2), torch.randn(4, 2)
    bad[0, 1] = float("inf")
    with pytest.warns(
        UserWarning, match=r"'BatchNorm1d' \(BatchNorm1d\): 1 of 2 input batch\(es\) left out, for channel 1;"
    ):
        normkit.recalibrate_bn(bn, [good, bad], progress=False)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    mean, var = _finite_oracle([good, bad])  # channel 1: the finite batch only
    torch.testing.assert_close(bn.running_mean, mean.float(), **TOL)
    torch.testing.assert_close(bn.running_var, var.float(), **TOL)


# --- non-finite batches ------------------------------------------------------------------------------


def _finite_oracle(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per channel: mean and unbiased variance over the batches in which that channel is all finite."""
    means, variances = [], []
    for c in range(batches[0].shape[1]):
        kept = [x[:, c : c + 1] for x in batches if torch.isfinite(x[:, c]).all()]
        mean, var = population(kept, dims=(0,))
        means.append(mean[0])
        variances.append(var[0])
    return torch.stack(means), torch.stack(variances)


def test_a_non_finite_batch_is_left_out_of_its_channels_only() -> None:
    """One NaN among 64 values used to make the whole channel keep its old statistics, silently."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(16, 3, generator=g, dtype=F64) * 3 + 1 for _ in range(4)]
    batches[1][0, 0] = float("nan")
    batches[2][5, 2] = float("-inf")
    batches[3][:, 0] = float("nan")
    bn = nkn.BatchNorm1d(3, dtype=F64)
    bn.num_skipped_updates.fill_(2)  # (a count from training: added to)
    with pytest.warns(UserWarning) as record:
        normkit.recalibrate_bn(nn.Sequential(bn), batches, progress=False)

    mean, var = _finite_oracle(batches)
    torch.testing.assert_close(bn.running_mean, mean, **TOL)
    torch.testing.assert_close(bn.running_var, var, **TOL)
    assert int(bn.num_skipped_updates) == 2 + 3  # batches 1, 2 and 3 each left something out
    assert int(bn.num_batches_tracked) == 0
    (message,) = [str(w.message) for w in record]
    assert "'0' (BatchNorm1d): 3 of 4 input batch(es) left out, for channels 0, 2;" in message
    assert "saw no finite value" not in message


def test_channels_or_layers_without_a_finite_value_keep_their_statistics_and_are_named() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 2, generator=g, dtype=F64) for _ in range(3)]
    for x in batches:
        x[0, 1] = float("nan")  # channel 1: never finite
    bn = nkn.BatchNorm1d(2, dtype=F64)
    with torch.no_grad():
        bn.running_mean.fill_(7.0)
        bn.running_var.fill_(7.0)
    with pytest.warns(
        UserWarning, match=r"3 of 3 input batch\(es\) left out, for channel 1 \(channel 1 saw no "
    ):
        normkit.recalibrate_bn(bn, batches, progress=False)
    mean, var = population([x[:, :1] for x in batches], dims=(0,))
    torch.testing.assert_close(bn.running_mean, torch.cat([mean, mean.new_tensor([7.0])]), **TOL)
    torch.testing.assert_close(bn.running_var, torch.cat([var, var.new_tensor([7.0])]), **TOL)
    assert int(bn.num_skipped_updates) == 3

    # A NaN before a layer that mixes channels spoils every channel after it, for that batch only.
    torch.manual_seed(0)
    net = nn.Sequential(
        nkn.BatchNorm1d(2, dtype=F64), nn.Linear(2, 3, dtype=F64), nkn.BatchNorm1d(3, dtype=F64)
    )
    batches[1][:, 1] = torch.randn(8, generator=g, dtype=F64)  # channel 1 finite in batch 1 only
    with pytest.warns(UserWarning) as record:
        normkit.recalibrate_bn(net, batches, progress=False)
    seen = [net[1](_bn(x, net[0])) for x in batches]
    mean, var = _finite_oracle(seen)
    torch.testing.assert_close(net[2].running_mean, mean, **TOL)
    torch.testing.assert_close(net[2].running_var, var, **TOL)
    (message,) = [str(w.message) for w in record]
    assert "'2' (BatchNorm1d): 2 of 3 input batch(es) left out, for all 3 channels;" in message

    every = nkn.BatchNorm1d(2)  # nothing finite at all: the layer is named once, as such
    with pytest.warns(
        UserWarning, match=r"1 of 1 input batch\(es\) left out, for all 2 channels \(all 2 channels "
    ):
        normkit.recalibrate_bn(every, [torch.full((4, 2), float("nan"))], progress=False)
    assert torch.equal(every.running_mean, torch.zeros(2)) and torch.equal(every.running_var, torch.ones(2))


# --- frozen layers -----------------------------------------------------------------------------------


def test_frozen_layers_are_left_alone_norm_act_ones_too() -> None:
    """freeze_bn's FrozenBatchNormAct2d / FrozenSyncBatchNormAct are frozen as FrozenBatchNorm2d is: kept."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nkn.BatchNormAct2d(4, activation="relu"),
        nn.Conv2d(4, 4, 1),
        nkn.SyncBatchNormAct(4, activation="silu"),
        nn.Conv2d(4, 4, 1),
        nkn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 1),
        nkn.BatchNorm2d(5),
    ).double()
    for i in (1, 3, 5):  # the first three norms
        net[i] = normkit.surgery.freeze_bn(net[i])
    assert [type(net[i]).__name__ for i in (1, 3, 5)] == [
        "FrozenBatchNormAct2d",
        "FrozenSyncBatchNormAct",
        "FrozenBatchNorm2d",
    ]
    with torch.no_grad():
        for i in (1, 3, 5):
            net[i].running_mean.uniform_(-1, 1)
            net[i].running_var.uniform_(0.5, 2)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("7.")}
    batches = _batches()

    normkit.recalibrate_bn(net.train(), batches, progress=False)

    for k, v in net.state_dict().items():
        if not k.startswith("7."):
            assert torch.equal(v, frozen[k]), k
    assert not net[1].training and not net[3].training
    with torch.no_grad():
        seen = [net[:7](x) for x in batches]  # the frozen layers normalize with their kept statistics
    mean, var = population(seen)
    torch.testing.assert_close(net[7].running_mean, mean, **TOL)
    torch.testing.assert_close(net[7].running_var, var, **TOL)


def test_bad_arguments() -> None:
    bn = nkn.BatchNorm1d(2)
    with pytest.raises(NormError, match="num_batches must be None or an int >= 1, got 0"):
        normkit.recalibrate_bn(bn, [torch.randn(3, 2)], num_batches=0)
    with pytest.raises(TypeError, match="wrap a single batch in a list"):
        normkit.recalibrate_bn(bn, torch.randn(3, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.recalibrate_bn(None, [])  # type: ignore[arg-type]
    x = torch.randn(4, 3, 6, 6)
    for lazy, name in (
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()), r"'1' \(LazyBatchNorm2d\)"),
        (nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)), r"'0' \(LazyConv2d\)"),
    ):
        with pytest.raises(NormError, match=f"layer {name}.*run one forward pass"):
            normkit.recalibrate_bn(lazy, [x], progress=False)
        assert any(getattr(m, "has_uninitialized_params", lambda: False)() for m in lazy)  # untouched
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match="scripted modules .* not supported"):
        normkit.recalibrate_bn(scripted, [x], progress=False)
    with pytest.raises(NormError, match="expected batches that are a Tensor"):
        normkit.recalibrate_bn(bn, [3], progress=False)
    assert bn.training  # restored after the failure


# --- two processes -----------------------------------------------------------------------------------


def _two_process_oracle(case: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Replay of recal_net over both ranks' batches, step by step (SyncBN normalizes each step's pair
    jointly)."""
    net = recal_net(case)
    batches = recal_batches(case)
    steps = len(batches) // 2
    seen: dict[int, list[Tensor]] = {0: [], 2: [], 5: []}
    with torch.no_grad():
        for s in range(steps):
            xs = [batches[2 * s], batches[2 * s + 1]]
            seen[0] += xs
            h1 = [net[1](_bn(x, net[0])) for x in xs]
            seen[2] += h1
            joint = torch.cat(h1)
            mu = joint.mean((0, 2, 3), keepdim=True)
            var = ((joint - mu) ** 2).mean((0, 2, 3), keepdim=True)
            sync = net[2]
            h2 = [
                torch.relu(
                    (h - mu) / torch.sqrt(var + sync.eps) * sync.weight.view(1, -1, 1, 1)
                    + sync.bias.view(1, -1, 1, 1)
                )
                for h in h1
            ]
            seen[5] += [net[4](h) for h in h2]
    return {str(i): population(v) for i, v in seen.items()}


@pytest.mark.parametrize("key", ["recalibrate", "recalibrate_extra"])
def test_two_processes_pool_their_statistics(world2: list[dict[str, Any]], key: str) -> None:
    want = _two_process_oracle(RECAL[2])
    for r in world2:
        got = r[key]
        for i, (mean, var) in want.items():
            torch.testing.assert_close(got["buffers"][f"{i}.running_mean"], mean, **TOL)
            torch.testing.assert_close(got["buffers"][f"{i}.running_var"], var, **TOL)
            assert int(got["buffers"][f"{i}.num_batches_tracked"]) == 0
        # 3 SyncBN forwards + the layer's channel-count check on its first forward + 1 pooling all_gather;
        # 4 lockstep all_reduces (3 go, 1 stop)
        assert got["collectives"] == {"all_gather": 5, "all_reduce": 4}
    for k, v in world2[0][key]["buffers"].items():
        assert torch.equal(world2[1][key]["buffers"][k], v), k
    if key == "recalibrate_extra":  # rank 1 had one more batch: stopped with rank 0, no hang, same result
        assert world2[1][key]["batches_seen"] == world2[0][key]["batches_seen"] + 1
        for k, v in world2[0]["recalibrate"]["buffers"].items():
            assert torch.equal(world2[0][key]["buffers"][k], v), k


def _nan_batches() -> list[Tensor]:
    """Rank 0 gets the even batches, rank 1 the odd ones: channel 2 is NaN in all of rank 0's, and one
    value of channel 0 is NaN in one batch of rank 1."""
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(n, 3, generator=g, dtype=F64) * 2 + 1 for n in (5, 3, 4, 6, 2, 4)]
    for x in batches[0::2]:
        x[1, 2] = float("nan")
    batches[3][2, 0] = float("inf")
    return batches


def nan_worker(rank: int, world: int, payload: Any) -> dict[str, Any]:
    """recalibrate_bn on this rank's share of :func:`_nan_batches` (run in a spawned gloo world)."""
    bn = nkn.BatchNorm1d(3, dtype=F64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        normkit.recalibrate_bn(nn.Sequential(bn), _nan_batches()[rank::world], progress=False)
    return {
        "mean": bn.running_mean.clone(),
        "var": bn.running_var.clone(),
        "skipped": int(bn.num_skipped_updates),
        "warnings": [str(w.message) for w in record],
    }


def test_two_processes_pool_the_left_out_batches_alike() -> None:
    """Counts and drops are pooled as the statistics are: every rank stores and reports the same."""
    ranks = run_world(nan_worker, 2, timeout=90)
    mean, var = _finite_oracle(_nan_batches())
    for r in ranks:
        torch.testing.assert_close(r["mean"], mean, **TOL)
        torch.testing.assert_close(r["var"], var, **TOL)
        assert r["skipped"] == 4  # rank 0's three batches and rank 1's one
        (message,) = r["warnings"]
        assert "'0' (BatchNorm1d): 4 of 6 input batch(es) left out, for channels 0, 2;" in message
    assert ranks[0]["warnings"] == ranks[1]["warnings"]
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"]) and torch.equal(ranks[0]["var"], ranks[1]["var"])
