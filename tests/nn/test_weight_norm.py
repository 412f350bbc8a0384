"""weight_norm / remove_weight_norm (issue 6.5) against the WN formulas, torch's own weight_norm, and the
paper's data-dependent initialisation."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrizations as tparam

from normkit.nn import remove_weight_norm, weight_norm

F64 = torch.float64


def _randn(shape, dtype=torch.float32, seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)


def _ref_weight(g, v, dim):
    """w = g v / ||v||, the norm over every dim but ``dim`` (all dims for None), float64."""
    v = v.to(F64)
    if dim is None:
        return g.to(F64) * v / torch.sqrt((v * v).sum())
    dims = [d for d in range(v.dim()) if d != dim % v.dim()]
    return g.to(F64) * v / torch.sqrt((v * v).sum(dims, keepdim=True))


def _gv(m, name="weight"):
    p = m.parametrizations[name]
    return p.original0, p.original1


@pytest.mark.parametrize(
    "make,dim",
    [
        (lambda: nn.Linear(5, 3), 0),
        (lambda: nn.Conv2d(2, 4, 3), 0),
        (lambda: nn.Conv2d(2, 4, 3), 1),
        (lambda: nn.Conv1d(4, 6, 3, groups=2), 0),
        (lambda: nn.ConvTranspose2d(3, 2, 2), 1),
        (lambda: nn.Linear(5, 3), None),
    ],
)
def test_weight_is_g_v_over_norm_and_unchanged_at_registration(make, dim):
    torch.manual_seed(0)
    m = make()
    w0 = m.weight.detach().clone()
    weight_norm(m, dim=dim)
    g, v = _gv(m)
    torch.testing.assert_close(m.weight, w0, rtol=1e-6, atol=1e-7)  # right_inverse keeps the weight
    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 2.0, g.numel()).reshape(g.shape))
    torch.testing.assert_close(m.weight.double(), _ref_weight(g, v, dim), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_matches_torch_weight_norm_values_and_grads_and_checkpoints_load_both_ways(dim):
    """Against torch.nn.utils.parametrizations.weight_norm with the same ``dim`` (``-1`` is one norm over
    the whole weight there, as ``None``: the same here, so its checkpoints load)."""
    torch.manual_seed(1)
    ours = weight_norm(nn.Conv2d(3, 5, 3), dim=dim)
    ref = tparam.weight_norm(nn.Conv2d(3, 5, 3), dim=dim)
    assert _gv(ours)[0].shape == ref.parametrizations.weight.original0.shape
    ref.load_state_dict(ours.state_dict())  # ours -> torch's layout, strict
    x = _randn((2, 3, 6, 6), seed=2)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    dy = _randn((2, 5, 4, 4), seed=3)
    got = torch.autograd.grad(ours(x), list(_gv(ours)), dy)
    want = torch.autograd.grad(
        ref(x), [ref.parametrizations.weight.original0, ref.parametrizations.weight.original1], dy
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    back = weight_norm(nn.Conv2d(3, 5, 3), dim=dim)
    back.load_state_dict(ref.state_dict())  # torch's -> ours
    torch.testing.assert_close(back(x), ref(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(_gv(back)[1], ref.parametrizations.weight.original1)


def test_gradient_formulas_of_the_paper():
    # dL/dg = (dL/dw . v) / ||v||,  dL/dv = (g/||v||) dL/dw - (g dL/dg / ||v||^2) v,  <dL/dv, v> = 0.
    lin = weight_norm(nn.Linear(4, 3).double())
    g, v = _gv(lin)
    x = _randn((6, 4), F64, seed=4)
    dy = _randn((6, 3), F64, seed=5)
    dg, dv = torch.autograd.grad(lin(x), (g, v), dy)
    dw = dy.t() @ x  # dL/dw of a linear layer
    nv = v.detach().norm(dim=1, keepdim=True)
    want_dg = (dw * v.detach()).sum(1, keepdim=True) / nv
    want_dv = g.detach() / nv * dw - g.detach() * want_dg / nv**2 * v.detach()
    torch.testing.assert_close(dg, want_dg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv, want_dv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((dv * v.detach()).sum(1), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)


def test_gradcheck_fp64():
    lin = weight_norm(nn.Linear(3, 2).double())
    g, v = _gv(lin)
    x = _randn((4, 3), F64, seed=6).requires_grad_()
    wn = lin.parametrizations.weight[0]
    assert gradcheck(lambda x, g, v: TF.linear(x, wn(g, v), lin.bias), (x, g, v))


@pytest.mark.parametrize(
    "make,x_shape,out_axis",
    [
        (lambda: nn.Linear(6, 4), (512, 6), -1),
        (lambda: nn.Conv2d(3, 4, 3), (32, 3, 8, 8), 1),
        (lambda: nn.ConvTranspose1d(3, 4, 3), (64, 3, 10), 1),
    ],
)
def test_data_dependent_init_standardizes_preactivations(make, x_shape, out_axis):
    torch.manual_seed(7)
    m = make()
    x = _randn(x_shape, seed=8, offset=2.0, scale=3.0)
    weight_norm(m, dim=1 if isinstance(m, nn.ConvTranspose1d) else 0, init_batch=x)
    with torch.no_grad():
        t = m(x).double().movedim(out_axis, 0).reshape(4, -1)
    mean = t.mean(1)
    var = ((t - mean[:, None]) ** 2).mean(1)
    torch.testing.assert_close(mean, torch.zeros(4, dtype=F64), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones(4, dtype=F64), atol=1e-4, rtol=0)


def test_data_init_without_bias_sets_only_g_and_rejects_bad_setups():
    torch.manual_seed(9)
    x = _randn((256, 5), seed=10, offset=1.0)
    lin = weight_norm(nn.Linear(5, 3, bias=False), init_batch=x)
    with torch.no_grad():
        t = lin(x).double()
    torch.testing.assert_close(((t - t.mean(0)) ** 2).mean(0), torch.ones(3, dtype=F64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dim must index the output units .*dim=0 for Linear.*got dim=1"):
        weight_norm(nn.Linear(5, 3), dim=1, init_batch=x)
    with pytest.raises(TypeError, match="supports Linear, Conv\\*d and ConvTranspose\\*d, got Bilinear"):
        weight_norm(nn.Bilinear(2, 2, 3), init_batch=x)
    with pytest.raises(ValueError, match="groups=2"):
        weight_norm(nn.ConvTranspose1d(4, 4, 3, groups=2), dim=1, init_batch=torch.randn(2, 4, 5))


def test_remove_weight_norm_restores_a_plain_weight():
    torch.manual_seed(11)
    m = weight_norm(nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        _gv(m)[0].mul_(2.0)
    w = m.weight.detach().clone()
    remove_weight_norm(m)
    assert type(m) is nn.Conv2d and isinstance(m.weight, nn.Parameter)
    assert torch.equal(m.weight.detach(), w)
    assert sorted(m.state_dict()) == ["bias", "weight"]
    with pytest.raises(ValueError, match="has no weight norm"):
        remove_weight_norm(m)
    # The load hook is gone too: a plain checkpoint loads as a plain checkpoint.
    m.load_state_dict(nn.Conv2d(2, 3, 3).state_dict())


def test_deepcopy_pickle_and_torch_save_keep_the_parametrization():
    torch.manual_seed(12)
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)), nn.ReLU(), weight_norm(nn.Conv1d(3, 2, 1), dim=None))
    x = _randn((2, 4), seed=13)

    def run(mm):
        return mm[2](mm[1](mm[0](x)).unsqueeze(-1))

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for clone in (
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(buf, weights_only=False),
    ):
        assert torch.equal(run(clone), run(model))
        assert sorted(clone.state_dict()) == sorted(model.state_dict())
        g, v = _gv(clone[0])
        assert g is not _gv(model[0])[0]
        (dg,) = torch.autograd.grad(run(clone).sum(), g)  # still trains
        assert torch.isfinite(dg).all()
        clone2 = pickle.loads(pickle.dumps(clone))  # twice: the rebuilt class is picklable too
        assert torch.equal(run(clone2), run(model))
        remove_weight_norm(clone2[0])
        assert type(clone2[0]) is nn.Linear


def test_loads_plain_legacy_and_gv_layouts():
    torch.manual_seed(14)
    plain = nn.Linear(4, 3)
    m = weight_norm(nn.Linear(4, 3))
    m.load_state_dict(plain.state_dict())  # plain "weight" layout
    torch.testing.assert_close(m.weight, plain.weight, rtol=1e-6, atol=1e-7)
    g, v = _gv(m)
    torch.testing.assert_close(g.flatten(), plain.weight.detach().norm(dim=1))
    legacy = {
        "weight_g": torch.full((3, 1), 2.0),
        "weight_v": plain.weight.detach().clone(),
        "bias": plain.bias,
    }
    m.load_state_dict(legacy)  # torch's old hook-based layout
    torch.testing.assert_close(m.weight.double(), _ref_weight(legacy["weight_g"], legacy["weight_v"], 0))
    other = weight_norm(nn.Linear(4, 3))
    other.load_state_dict(m.state_dict())  # our (g, v) layout
    assert torch.equal(other.weight, m.weight)
    parent = nn.Sequential(nn.Linear(4, 3))
    wrapped = nn.Sequential(weight_norm(nn.Linear(4, 3)))
    wrapped.load_state_dict(parent.state_dict())  # the hook works under a prefix too
    torch.testing.assert_close(wrapped[0].weight, parent[0].weight, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="size mismatch|shape"):
        m.load_state_dict(nn.Linear(5, 3).state_dict())


def test_zero_norm_rows_give_finite_outputs_and_grads():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0].zero_()
    weight_norm(lin)
    g, v = _gv(lin)
    y = lin(torch.randn(4, 3))
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y.sum(), (g, v))
    assert all(torch.isfinite(t).all() for t in grads)
    assert torch.equal(lin.weight[0].detach(), torch.zeros(3))


def test_errors():
    with pytest.raises(ValueError, match="has no parameter 'kernel'"):
        weight_norm(nn.Linear(2, 2), name="kernel")
    with pytest.raises(ValueError, match="already has weight norm"):
        weight_norm(weight_norm(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"dim must be None or an int in \[-2, 1\], got 2"):
        weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        weight_norm(torch.zeros(2, 2))  # type: ignore[arg-type]


def test_removing_weight_norm_from_a_deepcopy_leaves_the_original_intact():
    # torch's deepcopy shared the on-the-fly ParametrizedLinear class: removing the parametrization
    # from the copy deleted the `weight` property of the original too
    layer = weight_norm(nn.Linear(5, 3))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(1.5)
    x = _randn((4, 5), seed=1)
    g = layer.parametrizations.weight.original0.detach().to(F64)
    v = layer.parametrizations.weight.original1.detach().to(F64)
    want = x.to(F64) @ (g * v / v.norm(dim=1, keepdim=True)).T + layer.bias.detach().to(F64)
    dup = remove_weight_norm(copy.deepcopy(layer))
    assert type(dup) is nn.Linear and type(layer).__name__ == "ParametrizedLinear"
    torch.testing.assert_close(layer(x).to(F64), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dup(x).to(F64), want, atol=1e-5, rtol=1e-5)
    again = copy.deepcopy(layer)  # a copy of the original still loads a plain checkpoint
    again.load_state_dict(nn.Linear(5, 3).state_dict())


@pytest.mark.parametrize("batch", [torch.randn(1, 4), torch.ones(6, 4)], ids=["one-sample", "constant"])
def test_data_init_refuses_a_batch_that_gives_a_unit_no_spread(batch):
    # it used to set g = 1/sqrt(tiny) ~ 9e18: every later input blew up
    layer = nn.Linear(4, 3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    with pytest.raises(ValueError, match="init_batch"):
        weight_norm(layer, init_batch=batch)
    torch.testing.assert_close(layer.weight, w0)  # g (and the bias) left as they were
    assert torch.equal(layer.bias, b0)


def test_weight_norm_dim_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"dim must be None or an int.*got 1\.0 of type float"):
        weight_norm(nn.Linear(3, 3), dim=1.0)
