"""NormMonitor and train_eval_gap on layers called with a mask (``layer(x, mask)``, True = valid): every
number is over the valid values the layer normalizes with, checked against float64 computations by boolean
indexing. (They pooled over the padding too: BN1d with 27 of 40 positions valid reported 40 values per
statistic and a train/eval gap of 15.5 instead of 0.37.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import normkit
from tests.surgery.models import randomize_norms

F64 = torch.float64
TERMS = ("P_mean", "P_varmean", "P_varstd", "P_meanstd")


class Masked(nn.Module):
    """Calls its layer with the mask as a model does: by keyword, positionally, or both by keyword."""

    def __init__(self, layer: nn.Module, how: str = "kw", before: nn.Module | None = None) -> None:
        super().__init__()
        self.before = before if before is not None else nn.Identity()
        self.layer = layer
        self.how = how

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.before(x)
        if self.how == "pos":
            return self.layer(h, mask)
        if self.how == "input-kw":
            return self.layer(input=h, mask=mask)
        return self.layer(h, mask=mask)


def _pad(x: Tensor, mask: Tensor, fill: float = 50.0) -> Tensor:
    """``x`` with its padded positions set to garbage (``fill`` plus noise, so never constant)."""
    garbage = fill + torch.rand(x.shape) if math.isfinite(fill) else torch.full(x.shape, fill)
    return torch.where(mask.expand(x.shape), x, garbage)


def _lengths_mask(n_len: list[int], length: int, extra_dims: int = 0) -> Tensor:
    """``(N, 1, L)`` (``extra_dims`` more trailing 1s): position l of sample n valid when l < n_len[n]."""
    m = torch.arange(length)[None, :] < torch.tensor(n_len)[:, None]
    return m[:, None, :].reshape(len(n_len), 1, length, *([1] * extra_dims))


def _image_mask(hw: list[tuple[int, int]], h: int, w: int) -> Tensor:
    """``(N, 1, H, W)``: sample n's valid image is its top-left ``hw[n]`` corner (padded images)."""
    m = torch.zeros(len(hw), 1, h, w, dtype=torch.bool)
    for n, (hn, wn) in enumerate(hw):
        m[n, 0, :hn, :wn] = True
    return m


def _cases() -> dict[str, tuple[nn.Module, Tensor, Tensor, str, int]]:
    """id -> (layer, input, mask, how the model passes it, the channel dim)."""
    torch.manual_seed(0)
    n = normkit.nn
    out: dict[str, tuple[nn.Module, Tensor, Tensor, str, int]] = {}
    m = _lengths_mask([10, 6, 3, 8], 10)  # 27 of 40 positions valid
    out["bn1d"] = (n.BatchNorm1d(3), _pad(torch.randn(4, 3, 10) * 2 + 1, m), m, "kw", 1)
    out["bn1d-eval"] = (n.BatchNorm1d(3).eval(), _pad(torch.randn(4, 3, 10) * 2 + 1, m), m, "kw", 1)
    m = _image_mask([(5, 6), (3, 4), (4, 2)], 5, 6)
    x = _pad(torch.randn(3, 3, 5, 6) * 1.5 - 2, m, float("nan"))  # NaN padding: must not reach a number
    out["bn2d-spatial"] = (n.BatchNorm2d(3), x, m, "pos", 1)
    m = _lengths_mask([7, 2, 5], 7)
    out["gn"] = (n.GroupNorm(2, 4), _pad(torch.randn(3, 4, 7) + 0.5, m), m, "pos", 1)
    m = torch.rand(3, 6, 5) > 0.3  # (N, T, C): rows with fewer valid features, some none
    m[0, 0] = True
    m[1, 2] = False
    m[2, 4, 1:] = False  # one valid value
    out["ln"] = (n.LayerNorm(5), _pad(torch.randn(3, 6, 5) * 3, m), m, "kw", 2)
    m = _lengths_mask([8, 5, 2], 8)
    out["in"] = (n.InstanceNorm1d(3, affine=True), _pad(torch.randn(3, 3, 8), m), m, "input-kw", 1)
    for layer, *_ in out.values():
        randomize_norms(layer)
        with torch.no_grad():  # a few channels' outputs dead (0) or collapsed (constant) on the valid values
            if isinstance(layer, nn.LayerNorm):
                layer.weight[1] = layer.bias[1] = layer.weight[3] = 0.0
                layer.bias[3] = 1.5
            elif getattr(layer, "weight", None) is not None:
                layer.weight[0] = layer.bias[0] = layer.weight[2] = 0.0
                layer.bias[2] = 1.5
    return out


def _sets(layer: nn.Module, m: Tensor) -> list[Tensor]:
    """The mask of every set one mean / variance of ``layer`` pools over (written out per layer)."""
    n = normkit.nn
    if isinstance(layer, n.BatchNorm1d | n.BatchNorm2d):
        return [m[:, c] for c in range(m.shape[1])]
    if isinstance(layer, n.GroupNorm):
        cg = layer.num_channels // layer.num_groups
        return [m[i, g * cg : (g + 1) * cg] for i in range(m.shape[0]) for g in range(layer.num_groups)]
    if isinstance(layer, n.LayerNorm):
        return [m[i, t] for i in range(m.shape[0]) for t in range(m.shape[1])]
    assert isinstance(layer, n.InstanceNorm1d)
    return [m[i, c] for i in range(m.shape[0]) for c in range(m.shape[1])]


def _power_by_hand(t: Tensor, m: Tensor, cd: int) -> dict[str, float]:
    """The power decomposition over the valid values: per (sample, channel) mean and biased std over its
    valid positions; per channel the moments over samples weighted by their valid counts (so the four
    terms add up to the channel's mean square over its valid values); then the mean over channels."""
    t, m = t.double().movedim(cd, 1), m.movedim(cd, 1)
    per_channel: list[list[float]] = []
    for c in range(t.shape[1]):
        vals = [t[i, c][m[i, c]] for i in range(t.shape[0])]
        vals = [v for v in vals if v.numel()]
        if not vals:
            continue
        w = torch.tensor([v.numel() for v in vals], dtype=F64)
        w = w / w.sum()
        mu = torch.stack([v.mean() for v in vals])
        sig = torch.stack([v.var(unbiased=False) if v.numel() > 1 else v.new_zeros(()) for v in vals]).sqrt()
        e_mu, e_sig = (w * mu).sum(), (w * sig).sum()
        total = torch.cat(vals).pow(2).mean()
        per_channel.append(
            [
                float(e_mu**2),
                float((w * (mu - e_mu) ** 2).sum()),
                float((w * (sig - e_sig) ** 2).sum()),
                float(e_sig**2),
                float(total),
            ]
        )
    means = torch.tensor(per_channel, dtype=F64).mean(0)
    total = float(means[4])
    return {k: float(means[i]) / total for i, k in enumerate(TERMS)} | {"total": total}


def _dead_collapsed_by_hand(y: Tensor, m: Tensor, cd: int) -> tuple[list[int], list[int]]:
    dead, collapsed = [], []
    for c in range(y.shape[cd]):
        v = y.double().select(cd, c)[m.select(cd, c)]
        rms, std = v.pow(2).mean().sqrt(), v.var(unbiased=False).sqrt()
        if rms == 0:
            dead.append(c)
        elif std <= 1e-3 * rms:
            collapsed.append(c)
    return dead, collapsed


@pytest.mark.parametrize("case", list(_cases()))
def test_monitor_statistics_are_over_the_valid_values_only(case):
    layer, x, mask, how, cd = _cases()[case]
    model = Masked(layer, how)
    bn = isinstance(layer, nn.modules.batchnorm._BatchNorm)
    if bn:
        rm, rv = layer.running_mean.double().clone(), layer.running_var.double().clone()
    with normkit.NormMonitor(model) as mon:
        y = model(x, mask)
    last = mon.to_dict()["layer"]["last"]
    x64, y64, m = x.double(), y.detach().double(), mask.expand(x.shape)
    assert torch.isfinite(y64[m]).all()

    counts = [int(s.sum()) for s in _sets(layer, m)]
    if last["uses"] == "running":
        assert last["values_per_stat"] is None
    else:  # the valid values of the statistic with fewest (sets without any left out)
        assert last["values_per_stat"] == min(c for c in counts if c > 0) < x[0].numel()
    if bn:  # the train/eval gap between the batch's statistics over the valid values and the running ones
        sq, shift, ratio = [], [], []
        for c in range(x.shape[1]):
            v = x64[:, c][m[:, c]]
            mb, vb = v.mean(), v.var(unbiased=False)
            xb = (v - mb) / (vb + layer.eps).sqrt()
            xr = (v - rm[c]) / (rv[c] + layer.eps).sqrt()
            sq.append((xb - xr).pow(2).mean())
            shift.append((mb - rm[c]) / (rv[c] + layer.eps).sqrt())
            ratio.append(0.5 * torch.log((vb + layer.eps) / (rv[c] + layer.eps)))

        def rms(values: list[Tensor]) -> float:
            return float(torch.stack(values).pow(2).mean().sqrt())

        assert last["gap"] == pytest.approx(float(torch.stack(sq).mean().sqrt()), rel=1e-9)  # (sq: squares)
        assert last["mean_shift"] == pytest.approx(rms(shift), rel=1e-9)
        assert last["log_std_ratio"] == pytest.approx(rms(ratio), rel=1e-9)
    else:
        assert "gap" not in last
    assert (last["dead"], last["collapsed"]) == _dead_collapsed_by_hand(y64, m, cd)
    for key, t in (("power_in", x64), ("power_out", y64)):
        want = _power_by_hand(t, m, cd)
        assert last[key]["total"] == pytest.approx(want["total"], rel=1e-12)
        for k in TERMS:
            assert last[key][k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (key, k)
        assert sum(last[key][k] for k in TERMS) == pytest.approx(1.0, rel=1e-12)


def test_monitor_with_an_all_valid_mask_records_what_it_records_without_one():
    torch.manual_seed(1)
    layer = randomize_norms(normkit.nn.BatchNorm2d(4))
    x = torch.randn(3, 4, 5, 5)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    with normkit.NormMonitor(a) as plain:
        a(x)
    with normkit.NormMonitor(b) as masked:
        b(x, torch.ones(3, 1, 5, 5, dtype=torch.bool))
    want, got = plain.to_dict()["<root>"]["last"], masked.to_dict()["<root>"]["last"]
    assert got["values_per_stat"] == want["values_per_stat"] == 3 * 5 * 5
    for k in ("gap", "mean_shift", "log_std_ratio"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)
    # (the output: the layer's masked path and its fused kernel agree to fp32 rounding)
    for key, rel in (("power_in", 1e-9), ("power_out", 1e-5)):
        for k in (*TERMS, "total"):
            assert got[key][k] == pytest.approx(want[key][k], rel=rel, abs=1e-12)


def test_monitor_with_nothing_valid_is_a_call_without_statistics():
    layer = normkit.nn.BatchNorm1d(3)
    with normkit.NormMonitor(layer) as mon:
        layer(torch.randn(2, 3, 4), mask=torch.zeros(2, 1, 4, dtype=torch.bool))
    last = mon.to_dict()["<root>"]["last"]
    assert last["values_per_stat"] == 0 and "gap" not in last and "power_in" not in last


def test_monitor_reads_an_unbatched_instance_norm_input_as_a_batch_of_one():
    # (C, L) into InstanceNorm1d: the layer's channels are dim 0 (the monitor took L for the channels, one
    # value per statistic, and failed on a mask)
    torch.manual_seed(4)
    layer = normkit.nn.InstanceNorm1d(3)
    x, mask = torch.randn(3, 8), torch.arange(8)[None, :] < 5  # (1, L): the first 5 positions valid
    x = _pad(x, mask)
    with normkit.NormMonitor(layer) as mon:
        layer(x)
        layer(x, mask[None])  # (1, 1, L), broadcast as the layer does
    first, second = mon.to_dict()["<root>"]["history"]
    assert first["channel_dim"] == second["channel_dim"] == 0
    assert first["values_per_stat"] == 8 and second["values_per_stat"] == 5
    assert second["power_in"]["total"] == pytest.approx(float(x[:, :5].double().pow(2).mean()), rel=1e-12)


# --- train_eval_gap ----------------------------------------------------------------------------------


def _gap_cases() -> dict[str, tuple[Masked, Tensor, Tensor]]:
    torch.manual_seed(2)
    m1 = _lengths_mask([10, 6, 3, 8], 10)
    bn1d = Masked(normkit.nn.BatchNorm1d(3), "kw", nn.Conv1d(3, 3, 1))
    m2 = _image_mask([(5, 6), (2, 3), (4, 4)], 5, 6)
    bn2d = Masked(normkit.nn.BatchNorm2d(3), "pos", nn.Conv2d(3, 3, 1))
    return {
        "bn1d": (bn1d, _pad(torch.randn(4, 3, 10) * 2 + 1, m1), m1),
        "bn2d-spatial": (bn2d, _pad(torch.randn(3, 3, 5, 6) - 1, m2), m2),
    }


@pytest.mark.parametrize("case", list(_gap_cases()))
def test_train_eval_gap_runs_the_layer_with_its_mask_and_compares_valid_positions(case):
    model, x, mask = _gap_cases()[case]
    randomize_norms(model)  # (a non-zero bias: the padded positions' output would weigh in the ratio)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    gap = normkit.train_eval_gap(model, (x, mask))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()) and not model.training
    bn = model.layer
    with torch.no_grad():
        h = model.before(x).double()
    m = mask.expand(h.shape)
    rm, rv, w, b = (t.detach().double() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    num = den = 0.0
    shift, ratio = [], []
    for c in range(h.shape[1]):
        v = h[:, c][m[:, c]]  # channel c's valid values
        mb, vb = v.mean(), v.var(unbiased=False)
        y_batch = (v - mb) / (vb + bn.eps).sqrt() * w[c] + b[c]
        y_running = (v - rm[c]) / (rv[c] + bn.eps).sqrt() * w[c] + b[c]
        num += float((y_batch - y_running).pow(2).sum())
        den += float(y_running.pow(2).sum())
        shift.append((mb - rm[c]) / (rv[c] + bn.eps).sqrt())
        ratio.append(0.5 * torch.log((vb + bn.eps) / (rv[c] + bn.eps)))
    assert gap.layers["layer"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
    assert gap.propagated["layer"] == pytest.approx(math.sqrt(num / den), rel=1e-5)  # the only BN
    assert gap.stats["layer"]["mean_shift"] == pytest.approx(
        float(torch.stack(shift).pow(2).mean().sqrt()), rel=1e-5
    )
    assert gap.stats["layer"]["log_std_ratio"] == pytest.approx(
        float(torch.stack(ratio).pow(2).mean().sqrt()), rel=1e-5
    )


def test_train_eval_gap_on_a_batch_the_model_refuses_names_the_batch_layer_and_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(
        normkit.NormError,
        match=r"the model failed on the batch of shape \(2, 5, 8, 8\) in eval mode in layer '0' \(Conv2d\): "
        r"RuntimeError: .*expected input\[2, 5, 8, 8\] to have 3 channels, but got 5",
    ):
        normkit.train_eval_gap(net, torch.randn(2, 5, 8, 8))
    # a batch of one: eval mode takes it, BN in train mode cannot (one value per channel)
    lin = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.raises(
        normkit.NormError, match=r"\(1, 4\) with its BN layers in train mode in layer '1' \(BatchNorm1d\)"
    ):
        normkit.train_eval_gap(lin, torch.randn(1, 4))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items()) and net.training
    assert lin.training and not lin[1].num_batches_tracked
