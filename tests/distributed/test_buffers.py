"""normkit.sync_bn_buffers on gloo worlds of 2 and 3: every rank ends with the same buffers, the expected
ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normkit
from normkit import NormError
from tests.distributed._workers import buffer_net


def _keys(net: nn.Module) -> list[str]:
    return [k for k in net.state_dict() if "running" in k or "num_batches" in k or "moving" in k]


def _expected_average(world: int) -> dict[str, torch.Tensor]:
    """Written out channel by channel: equal-weight mixture of the finite ranks' (mean, var); counters:
    max."""
    nets = [buffer_net(r).state_dict() for r in range(world)]
    out: dict[str, torch.Tensor] = {}
    for k in _keys(buffer_net(0)):
        if "num_batches" in k:
            out[k] = torch.tensor(max(int(n[k]) for n in nets))
            continue
        if k.endswith(("running_var", "moving_variance")):
            continue
        var_key = k.replace("running_mean", "running_var").replace("moving_mean", "moving_variance")
        mean, var = [], []
        for c in range(nets[0][k].numel()):
            ok = [
                r
                for r in range(world)
                if math.isfinite(float(nets[r][k][c])) and math.isfinite(float(nets[r][var_key][c]))
            ]
            m = sum(float(nets[r][k][c]) for r in ok) / len(ok)
            v = sum(float(nets[r][var_key][c]) + (float(nets[r][k][c]) - m) ** 2 for r in ok) / len(ok)
            mean.append(m)
            var.append(v)
        out[k], out[var_key] = torch.tensor(mean), torch.tensor(var)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_average_and_broadcast_leave_identical_expected_buffers(
    request: pytest.FixtureRequest, world: int
) -> None:
    ranks = [r["buffers"] for r in request.getfixturevalue(f"world{world}")]
    want = _expected_average(world)
    src = buffer_net(world - 1).state_dict()
    for r in ranks:
        assert r["average_collectives"] == 2 and r["broadcast_collectives"] == 2  # sizes, then values
        assert sorted(r["average"]) == sorted(want)  # Frozen BN, InstanceNorm (tracked), Keras BN included
        for k, v in want.items():
            got = r["average"][k]
            assert torch.isfinite(got).all(), k  # the NaN of rank 1 was not spread
            torch.testing.assert_close(
                got.to(v.dtype), v, rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
        for k in want:  # src's values exactly (its NaN channel included: broadcast copies)
            torch.testing.assert_close(r["broadcast"][k], src[k], rtol=0, atol=0, equal_nan=True)
    for r in ranks[1:]:  # bit-identical on every rank
        for mode in ("average", "broadcast"):
            for k, v in ranks[0][mode].items():
                torch.testing.assert_close(r[mode][k], v, rtol=0, atol=0, equal_nan=True)


def test_one_process_is_a_no_op_and_bad_arguments_raise() -> None:
    net = buffer_net(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert normkit.sync_bn_buffers(net, mode="broadcast") is net
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(NormError, match="mode must be 'average' or 'broadcast', got 'mean'"):
        normkit.sync_bn_buffers(net, mode="mean")  # type: ignore[arg-type]
    with pytest.raises(NormError, match="src must be a rank"):
        normkit.sync_bn_buffers(net, src=-1)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        normkit.sync_bn_buffers("net")  # type: ignore[arg-type]
