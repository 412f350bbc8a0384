"""NormMonitor and train_eval_gap: what they record equals direct computations, and the model is left as it
was."""

from __future__ import annotations

import copy
import math
import sys
import warnings

import pytest
import torch
from torch import nn

import normkit
from normkit.diagnostics import power_decomposition
from tests.reference import ref_batch_norm
from tests.surgery.models import randomize_norms

F64 = torch.float64


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_norms(
        nn.Sequential(
            nn.Conv2d(3, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 1),
            normkit.nn.GroupNorm(2, 8),
            nn.Conv2d(8, 4, 1),
            normkit.nn.LayerNorm2d(4),
        )
    )


def test_hooks_are_removed_on_exit_and_nothing_else_changes():
    net = _bn_net()
    with normkit.NormMonitor(net) as mon:
        assert len(mon.handles) == 6 and net[1]._forward_hooks and net[1]._forward_pre_hooks
        net(torch.randn(4, 3, 6, 6))
    assert mon.handles == [] and not net[1]._forward_hooks and not net[1]._forward_pre_hooks
    assert not net[4]._forward_hooks and not net[6]._forward_hooks
    assert set(mon.to_dict()) == {"1", "4", "6"}


def test_train_eval_gap_record_equals_the_direct_computation():
    net = _bn_net().train()
    x = torch.randn(5, 3, 6, 6) * 2 + 1
    bn = net[1]
    rm, rv = bn.running_mean.clone().double(), bn.running_var.clone().double()  # before the call updates them
    with normkit.NormMonitor(net) as mon:
        net(x)
    last = mon.records["1"].last
    with torch.no_grad():
        h = net[0](x).double()  # the BN's input
    mean_b, var_b = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)

    def v(t):
        return t.view(1, -1, 1, 1)

    diff = (h - v(mean_b)) / (v(var_b) + bn.eps).sqrt() - (h - v(rm)) / (v(rv) + bn.eps).sqrt()
    assert last["gap"] == pytest.approx(float(diff.pow(2).mean().sqrt()), rel=1e-6)
    assert last["mean_shift"] == pytest.approx(
        float(((mean_b - rm) / (rv + bn.eps).sqrt()).pow(2).mean().sqrt()), rel=1e-6
    )
    assert last["uses"] == "batch" and last["mode"] == "train" and last["values_per_stat"] == 5 * 4 * 4
    assert mon.records["4"].last["values_per_stat"] == 4 * 4 * 4 and mon.records["4"].last["uses"] == "sample"
    assert mon.records["6"].last["values_per_stat"] == 4 and "gap" not in mon.records["6"].last
    # Drift: the running statistics moved by one momentum step since the start.
    drift = mon.drift()["1"]
    assert drift["mean_shift"] == pytest.approx(
        float(((bn.running_mean.double() - rm) / (rv + bn.eps).sqrt()).pow(2).mean().sqrt()), rel=1e-6
    )


def test_eval_mode_uses_the_running_statistics_and_reports_their_ema_size():
    net = _bn_net()
    net[1].num_batches_tracked.fill_(1000)
    net.eval()
    with normkit.NormMonitor(net) as mon:
        net(torch.randn(3, 3, 6, 6))
    last = mon.records["1"].last
    assert last["uses"] == "running" and last["values_per_stat"] is None
    assert last["ema_batches"] == pytest.approx(19.0, rel=1e-6)
    assert "EMA ~19.0 batches" in mon.table(print_=False)


def test_power_and_dead_channels():
    net = _bn_net().train()
    with torch.no_grad():
        net[1].weight[0] = 0.0
        net[1].bias[0] = 0.0  # channel 0 is 0 everywhere
        net[1].weight[2] = 0.0
        net[1].bias[2] = 1.5  # channel 2 is the constant 1.5
        net[1].bias[1] = 0.0  # BN in train: the batch mean of channel 1 is exactly its bias, 0
    x = torch.randn(8, 3, 6, 6)
    with normkit.NormMonitor(net) as mon:
        net(x)
    last = mon.records["1"].last
    assert last["dead"] == [0] and last["collapsed"] == [2]
    h = net[0](x)
    y = net[1](h)
    for key, t in (("power_in", h), ("power_out", y)):
        d = power_decomposition(t)
        assert last[key]["total"] == pytest.approx(d.total, rel=1e-12)
        assert sum(last[key][k] for k in ("P_mean", "P_varmean", "P_varstd", "P_meanstd")) == pytest.approx(
            1.0
        )
    # In training, BN's output channel means are its biases: P_mean = mean_c beta_c^2 / total.
    beta = net[1].bias.detach().double()
    assert last["power_out"]["P_mean"] * last["power_out"]["total"] == pytest.approx(
        float(beta.pow(2).mean()), rel=1e-5
    )


def test_bn_network_trained_at_batch_2_shows_its_gap_in_one_table():
    from normkit.lab.data import load_digits
    from normkit.lab.models import CNN4

    ds = load_digits()
    gaps = {}
    for batch in (2, 32):
        torch.manual_seed(0)
        net = CNN4("bn", head=True)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(40):
            i = torch.randint(0, len(ds.x_train), (batch,))
            loss = nn.functional.cross_entropy(net(ds.x_train[i]), ds.y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if batch == 2:
            with normkit.NormMonitor(net) as mon:
                net(ds.x_train[:2])
            text = mon.table(print_=False)
            lines = text.splitlines()
            assert "train/eval gap" in lines[2] and "values/stat" in lines[2]
            head = next(line for line in lines if "head.1.layer" in line)
            assert " 2 " in head  # the head's BN pools over 2 values: the batch
            assert mon.records["head.1.layer"].last["gap"] > 0.3
            assert all(f"features.{i}" in text for i in (1, 3, 6, 8))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        gaps[batch] = normkit.train_eval_gap(net, ds.x_test[:64])
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items()) and net.training
    assert gaps[2].layers["head.1.layer"] > 1.5 * gaps[32].layers["head.1.layer"]
    assert gaps[2].output > gaps[32].output


def test_train_eval_gap_equals_direct_batch_norm_and_restores_the_model():
    torch.manual_seed(0)
    net = randomize_norms(
        nn.Sequential(
            nn.Linear(4, 8),
            nn.BatchNorm1d(8),
            nn.Dropout(0.5),
            nn.ReLU(),
            nn.Linear(8, 6),
            normkit.nn.BatchNorm1d(6),
        )
    )
    net.eval()
    net[0].train()  # an odd flag, to be restored as it was
    x = torch.randn(16, 4)
    state = copy.deepcopy(net.state_dict())
    gap = normkit.train_eval_gap(net, x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert net[0].training and not net[1].training and not net.training and not net[2].training
    bn = net[1]
    with torch.no_grad():
        h = net[0](x)
        y_b = ref_batch_norm(
            h, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True, eps=bn.eps
        ).output
        y_r = ref_batch_norm(
            h, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
        ).output
    assert gap.layers["1"] == pytest.approx(float((y_b - y_r).norm() / y_r.norm()), rel=1e-5)
    # The whole model with BN in train mode (dropout still off) against eval, on a copy.
    train_copy = copy.deepcopy(net).eval()
    train_copy[1].train()
    train_copy[5].train()
    with torch.no_grad():
        want = float((train_copy(x).double() - net.eval()(x).double()).norm() / net(x).double().norm())
    assert gap.output == pytest.approx(want, rel=1e-5)
    assert set(gap.propagated) == {"1", "5"} and gap.propagated["1"] == pytest.approx(
        gap.layers["1"], rel=1e-6
    )
    assert "<model output>" in str(gap)


def test_errors_and_optional_dependencies(tmp_path, monkeypatch):
    with pytest.raises(normkit.NormError, match="no norm layer"):
        normkit.NormMonitor(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(normkit.NormError, match=r"layer '1' \(LazyBatchNorm2d\).*forward pass"):
        normkit.NormMonitor(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()))  # not "no norm layer"
    with pytest.raises(TypeError, match="scripted modules .* not supported"):
        normkit.NormMonitor(torch.jit.script(_bn_net()))
    with pytest.raises(TypeError, match="where must be"):
        normkit.NormMonitor(_bn_net(), where=5)
    with pytest.raises(normkit.NormError, match="no BN layer with running statistics"):
        normkit.train_eval_gap(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), torch.randn(2, 3, 4, 4))
    net = _bn_net()
    with normkit.NormMonitor(net, where="1") as mon:
        net(torch.randn(2, 3, 5, 5))
    assert list(mon.records) == ["1"]
    for name in ("rich", "rich.console", "rich.table"):
        monkeypatch.setitem(sys.modules, name, None)  # rich missing: a plain-text table
    text = mon.table(print_=False)
    assert text.splitlines()[0].split()[:3] == ["layer", "kind", "mode"]
    pytest.importorskip("matplotlib", reason="matplotlib (normkit[lab]) draws the plot")
    out = mon.plot(tmp_path / "norms.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_called_with_input_keyword_is_recorded():
    # torch.nn's argument name: bn(input=x) passes no positional args to a plain forward hook
    bn = nn.BatchNorm2d(4)
    with normkit.NormMonitor(bn) as monitor:
        bn(input=torch.randn(3, 4, 5, 2))
    rec = monitor.to_dict()["<root>"]
    assert rec["calls"] == 1
    assert rec["last"]["values_per_stat"] == 3 * 5 * 2  # N * H * W


def test_empty_batch_is_a_call_without_statistics():
    net = _bn_net()
    with normkit.NormMonitor(net) as monitor:
        net(torch.randn(0, 3, 7, 7))
    d = monitor.to_dict()
    assert [d[n]["calls"] for n in ("1", "4", "6")] == [1, 1, 1]
    last = d["1"]["last"]
    assert last["shape"] == (0, 6, 5, 5) and last["values_per_stat"] == 0
    assert "gap" not in last and "power_in" not in last
    assert "not called" not in monitor.table(print_=False)


def test_non_finite_activations_are_reported_not_cleaned():
    net = _bn_net()
    x = torch.randn(2, 3, 7, 7)
    x[0, 0, 3, 3] = float("nan")
    with normkit.NormMonitor(net) as monitor:
        net(x)
    last = monitor.to_dict()["1"]["last"]
    assert all(v != v for v in (last["power_in"]["P_mean"], last["power_out"]["P_mean"], last["gap"]))
    assert "nan" in monitor.table(print_=False)

    lin = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    xb = torch.randn(16, 4)
    xb[0, 0] = float("nan")
    gap = normkit.train_eval_gap(lin, xb)
    assert gap.layers["1"] != gap.layers["1"] and gap.output != gap.output  # NaN, not inf


# dynamo itself reads .grad of the non-leaf conv output when it resumes after the hook's graph break
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_model_is_monitored_with_the_eager_names_and_numbers():
    # torch does not recompile for hooks added after compilation: without a reset nothing was recorded
    net = _bn_net()
    x = torch.randn(2, 3, 7, 7)
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # compiled before the monitor exists
    eager = copy.deepcopy(net)
    with normkit.NormMonitor(eager) as ref:
        eager(x)
    with normkit.NormMonitor(compiled) as monitor:
        compiled(x)
    got, want = monitor.to_dict(), ref.to_dict()
    assert sorted(got) == sorted(want) == ["1", "4", "6"]
    for name in want:
        assert got[name]["calls"] == 1
        assert got[name]["last"]["uses"] == want[name]["last"]["uses"]
        assert got[name]["last"]["values_per_stat"] == want[name]["last"]["values_per_stat"]
    assert got["1"]["last"]["gap"] == pytest.approx(want["1"]["last"]["gap"], rel=1e-5)
    compiled(x)  # hooks gone after exit
    assert got["1"]["calls"] == monitor.to_dict()["1"]["calls"] == 1
    gap = normkit.train_eval_gap(compiled, x)
    assert sorted(gap.layers) == ["1"]


# --- every norm layer: LayerNorm over trailing dims, and the rest of torch.nn / normkit.nn ------------


def _power_by_hand(t: torch.Tensor, channel_dim: int) -> dict[str, float]:
    """The four power fractions of ``t`` with channels along ``channel_dim`` (every other non-batch dim a
    position), written out with torch: per (sample, channel) mean and biased std over the positions."""
    t = t.detach().double().movedim(channel_dim, 1)
    t = t.reshape(t.shape[0], t.shape[1], -1)
    mu, sig = t.mean(2), t.var(2, unbiased=False).sqrt()
    total = float(t.pow(2).mean())
    terms = {
        "P_mean": mu.mean(0).pow(2).mean(),
        "P_varmean": mu.var(0, unbiased=False).mean(),
        "P_varstd": sig.var(0, unbiased=False).mean(),
        "P_meanstd": sig.mean(0).pow(2).mean(),
    }
    return {k: float(v) / total for k, v in terms.items()} | {"total": total}


_LAYER_NORMS = {
    # id: (layer, the model's input, what runs before the layer)
    "torch-ln-last-dim": (lambda: nn.LayerNorm(16), (4, 10, 8), lambda: nn.Linear(8, 16)),
    "normkit-ln-last-dim": (lambda: normkit.nn.LayerNorm(16), (4, 10, 8), lambda: nn.Linear(8, 16)),
    "torch-ln-chw": (lambda: nn.LayerNorm([8, 4, 4]), (4, 3, 4, 4), lambda: nn.Conv2d(3, 8, 1)),
    "normkit-ln-hw": (lambda: normkit.nn.LayerNorm([4, 4]), (4, 3, 4, 4), lambda: nn.Conv2d(3, 8, 1)),
    "torch-rmsnorm": (lambda: nn.RMSNorm(16), (4, 10, 8), lambda: nn.Linear(8, 16)),
}


@pytest.mark.parametrize("case", list(_LAYER_NORMS))
def test_layer_norm_over_trailing_dims_is_watched_with_its_statistics(case):
    # they were silently missing from the table (a model with only them raised "no norm layer to watch")
    make_ln, in_shape, make_before = _LAYER_NORMS[case]
    torch.manual_seed(0)
    ln = make_ln()
    net = nn.Sequential(make_before(), ln, nn.ReLU())
    shape = tuple(ln.normalized_shape)
    # the channels are along the first normalized dim (a feature of (N, T, C), a channel of (N, C, H, W)):
    # with its affine, channel 1 is 0 everywhere (dead) and channel 2 the constant 1.5 (collapsed)
    with torch.no_grad():
        ln.weight.normal_()
        ln.weight[1] = 0.0
        ln.weight[2] = 0.0
        if getattr(ln, "bias", None) is not None:
            ln.bias.normal_()
            ln.bias[1] = 0.0
            ln.bias[2] = 1.5
    x_model = torch.randn(in_shape) * 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot watch" warning either
        mon = normkit.NormMonitor(net)
    with mon:
        net(x_model)
    assert list(mon.to_dict()) == ["1"]
    with torch.no_grad():  # the oracle: the layer's input and output, computed here
        x = net[0](x_model)
        y = ln(x)
    cd = x.dim() - len(shape)
    rec = mon.to_dict()["1"]
    last = rec["last"]
    assert rec["kind"] == ("rms" if isinstance(ln, nn.RMSNorm) else "ln_last") and rec["calls"] == 1
    assert last["uses"] == "sample" and last["channel_dim"] == cd and last["shape"] == tuple(x.shape)
    assert last["values_per_stat"] == math.prod(shape)  # each mean / variance pools over normalized_shape
    assert "gap" not in last and rec["drift"] is None
    per_channel = y.detach().double().movedim(cd, 0).flatten(1)  # (C, everything else)
    std, rms = per_channel.std(1, unbiased=False), per_channel.pow(2).mean(1).sqrt()
    dead = [c for c in range(len(rms)) if rms[c] == 0]
    collapsed = [c for c in range(len(rms)) if rms[c] > 0 and std[c] <= 1e-3 * rms[c]]
    if isinstance(ln, nn.RMSNorm):  # no bias: both weight-0 channels are 0 everywhere
        assert dead == [1, 2] and collapsed == []
    else:
        assert dead == [1] and collapsed == [2]
    assert last["dead"] == dead and last["collapsed"] == collapsed
    for key, t in (("power_in", x), ("power_out", y)):
        want = _power_by_hand(t, cd)
        assert last[key]["total"] == pytest.approx(want["total"], rel=1e-12)
        for k in ("P_mean", "P_varmean", "P_varstd", "P_meanstd"):
            assert last[key][k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    (row,) = [line for line in mon.table(print_=False).splitlines() if f" {rec['kind']} " in line]
    channels = x.shape[cd]
    assert f" {len(dead)}/{channels} " in row and f" {len(collapsed)}/{channels} " in row


def test_layer_norm_in_a_mixed_model_and_alone_and_unbatched():
    # the audit's mixed model: the LayerNorm ('3') was missing next to the BN ('1')
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.LayerNorm(16))
    with normkit.NormMonitor(net) as mon:
        net(torch.randn(4, 8))
    assert list(mon.to_dict()) == ["1", "3"]
    assert mon.records["3"].last["values_per_stat"] == 16 and mon.records["3"].last["channel_dim"] == 1
    assert "gap" in mon.records["1"].last
    # a model whose only norm is a LayerNorm, called on an unbatched input: a batch of one
    ln = normkit.nn.LayerNorm([8, 4, 4])
    x = torch.randn(8, 4, 4)
    with normkit.NormMonitor(ln) as mon:
        y = ln(x)
    last = mon.to_dict()["<root>"]["last"]
    assert last["channel_dim"] == 0 and last["values_per_stat"] == 128 and last["shape"] == (8, 4, 4)
    assert last["power_out"]["total"] == pytest.approx(_power_by_hand(y[None], 1)["total"], rel=1e-12)
    assert last["power_out"]["P_mean"] == pytest.approx(_power_by_hand(y[None], 1)["P_mean"], rel=1e-9)


def _every_norm() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """One layer of every norm class of torch.nn and normkit.nn, with an input it takes."""
    import inspect

    n = normkit.nn
    x1, x2, x3 = torch.randn(4, 8, 5), torch.randn(4, 8, 5, 5), torch.randn(4, 8, 3, 3, 3)
    make: dict[str, tuple[nn.Module, torch.Tensor]] = {
        "torch.BatchNorm1d": (nn.BatchNorm1d(8), x1),
        "torch.BatchNorm2d": (nn.BatchNorm2d(8), x2),
        "torch.BatchNorm3d": (nn.BatchNorm3d(8), x3),
        "torch.SyncBatchNorm": (nn.SyncBatchNorm(8).eval(), x2),  # (train mode needs a process group)
        "torch.InstanceNorm1d": (nn.InstanceNorm1d(8), x1),
        "torch.InstanceNorm2d": (nn.InstanceNorm2d(8, affine=True), x2),
        "torch.InstanceNorm3d": (nn.InstanceNorm3d(8, track_running_stats=True), x3),
        "torch.GroupNorm": (nn.GroupNorm(2, 8), x2),
        "torch.LayerNorm": (nn.LayerNorm([5, 5]), x2),
        "torch.RMSNorm": (nn.RMSNorm(5), x1),
        "torch.LocalResponseNorm": (nn.LocalResponseNorm(3), x2),
        "torch.CrossMapLRN2d": (nn.CrossMapLRN2d(3), x2),
        "torch.LazyBatchNorm1d": (nn.LazyBatchNorm1d(), x1),
        "torch.LazyBatchNorm2d": (nn.LazyBatchNorm2d(), x2),
        "torch.LazyBatchNorm3d": (nn.LazyBatchNorm3d(), x3),
        "torch.LazyInstanceNorm1d": (nn.LazyInstanceNorm1d(), x1),
        "torch.LazyInstanceNorm2d": (nn.LazyInstanceNorm2d(), x2),
        "torch.LazyInstanceNorm3d": (nn.LazyInstanceNorm3d(), x3),
    }
    for d, x in ((1, x1), (2, x2), (3, x3)):
        for cls in ("BatchNorm", "BatchRenorm", "FrozenBatchNorm", "GhostBatchNorm", "InstanceNorm"):
            make[f"normkit.{cls}{d}d"] = (getattr(n, f"{cls}{d}d")(8), x)
        for cls in ("BatchNormAct", "BatchRenormAct", "GhostBatchNormAct", "InstanceNormAct"):
            make[f"normkit.{cls}{d}d"] = (getattr(n, f"{cls}{d}d")(8), x)
    make |= {
        "normkit.BatchNormalization": (n.BatchNormalization(8, axis=1), x2),
        "normkit.GroupNorm": (n.GroupNorm(2, 8), x2),
        "normkit.GroupNormAct2d": (n.GroupNormAct2d(8, 2), x2),
        "normkit.GroupNormProxyAct2d": (n.GroupNormProxyAct2d(8, 2), x2),
        "normkit.LayerNorm": (n.LayerNorm(5), x2),
        "normkit.LayerNorm2d": (n.LayerNorm2d(8), x2),
        "normkit.LayerNormAct2d": (n.LayerNormAct2d(8), x2),
        "normkit.MeanOnlyBatchNorm": (n.MeanOnlyBatchNorm(8), x2),
        "normkit.ProxyNormAct": (n.ProxyNormAct(8), x2),
        "normkit.SyncBatchNorm": (n.SyncBatchNorm(8).eval(), x2),
        "normkit.SyncBatchNormAct": (n.SyncBatchNormAct(8).eval(), x2),
    }
    # every class is here: a new norm class must be added (and watched, or named as not watched)
    weight_norms = ("StdConv", "ScaledStdConv")  # normalize weights, not activations: not norm layers here
    nk = {
        f"normkit.{c}"
        for c in n.__all__
        if inspect.isclass(getattr(n, c))
        and issubclass(getattr(n, c), nn.Module)
        and not c.startswith(weight_norms)
    }
    import torch.nn.modules.batchnorm as tbn
    import torch.nn.modules.instancenorm as tin
    import torch.nn.modules.normalization as tno

    tn = {f"torch.{c}" for mod in (tbn, tin, tno) for c in mod.__all__}
    assert {k for k in make if k.startswith("normkit.")} == nk
    assert {k for k in make if k.startswith("torch.")} == tn
    return make


def test_every_norm_of_torch_nn_and_normkit_nn_is_watched_or_named():
    cannot = {"normkit.ProxyNormAct"}  # an activation after a norm: it normalizes nothing itself
    for key, (layer, x) in _every_norm().items():
        if key.startswith("torch.Lazy"):
            layer(x)  # (a lazy layer gets its shape from a first batch; NormMonitor says so before)
        if key in cannot:
            with pytest.raises(
                normkit.NormError, match=r"no norm layer to watch; it cannot watch '<root>' \(Pro"
            ):
                normkit.NormMonitor(layer)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mon = normkit.NormMonitor(layer)
        with mon, torch.no_grad():
            layer(x)
        rec = mon.to_dict()["<root>"]
        last = rec["last"]
        assert rec["calls"] == 1 and last["uses"] in ("batch", "running", "sample"), key
        assert (last["values_per_stat"] is None) == (last["uses"] == "running"), key
        assert "power_out" in last and len(last["dead"]) <= x.shape[last["channel_dim"]], key
        if last["uses"] == "running" and key not in ("normkit.MeanOnlyBatchNorm",):
            assert "gap" in last, key  # batch vs running statistics
    # in a model: what it cannot watch is named in a warning (and in .unwatched), next to what it watches

    class ScaledBN(nn.BatchNorm2d):  # its own forward: what it computes is unknown
        def forward(self, input):
            return 2 * super().forward(input)

    net = nn.Sequential(
        nn.Conv2d(3, 8, 1), normkit.nn.GroupNorm(1, 8, affine=False), normkit.nn.ProxyNormAct(8)
    )
    net.append(ScaledBN(8))
    with pytest.warns(
        UserWarning, match=r"not watching 2 norm layer\(s\): '2' \(ProxyNormAct: .*'3' \(ScaledBN: "
    ):
        mon = normkit.NormMonitor(net)
    assert list(mon.layers) == ["1"] and list(mon.unwatched) == ["2", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normkit.NormMonitor(net, where="1")  # left out by where=: no warning


def test_keras_and_mean_only_batch_norm_report_against_direct_statistics():
    torch.manual_seed(0)
    keras = normkit.nn.BatchNormalization(6)  # channels last, Keras's momentum and epsilon
    with torch.no_grad():
        keras.moving_mean.normal_()
        keras.moving_variance.uniform_(0.5, 2.0)
    x = torch.randn(5, 3, 4, 6) * 1.5 + 0.5
    rm, rv = keras.moving_mean.double().clone(), keras.moving_variance.double().clone()
    with normkit.NormMonitor(keras) as mon:
        keras(x)
    last = mon.to_dict()["<root>"]["last"]
    h = x.double().reshape(-1, 6)
    mean_b, var_b = h.mean(0), h.var(0, unbiased=False)
    eps = keras.epsilon
    diff = (h - mean_b) / (var_b + eps).sqrt() - (h - rm) / (rv + eps).sqrt()
    assert last["uses"] == "batch" and last["channel_dim"] == 3 and last["values_per_stat"] == 5 * 3 * 4
    assert last["gap"] == pytest.approx(float(diff.pow(2).mean().sqrt()), rel=1e-6)
    keras.trainable = False  # Keras: inference mode even in training
    with normkit.NormMonitor(keras) as mon:
        keras(x)
    assert mon.to_dict()["<root>"]["last"]["uses"] == "running"

    mobn = normkit.nn.MeanOnlyBatchNorm(4)
    with normkit.NormMonitor(mobn) as mon:
        mobn(torch.randn(3, 4, 5))
        mobn.eval()
        mobn(torch.randn(3, 4, 5))
    hist = mon.to_dict()["<root>"]["history"]
    assert [(h["uses"], h["values_per_stat"]) for h in hist] == [("batch", 15), ("running", None)]
    assert hist[1]["ema_batches"] == pytest.approx(1.0)  # one update of the running mean so far
