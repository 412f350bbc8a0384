"""NormMonitor and train_eval_gap: what they record equals direct computations, and the model is left as it
was."""

from __future__ import annotations

import copy
import sys

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
