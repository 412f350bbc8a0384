"""Seed-fidelity checks: statements of the five seed articles (/work/shared/seeds/*.txt) that normkit
implements but no other test states directly, each against an independent oracle (a closed form or a
float64 computation written here, torch autograd, or a paper's own formula).

Seeds: 000 (BN and GN, cnblogs), 001 (activation vs weight norms, zhihu), 002 (BN formulas and Keras's
BatchNormalization), 003 (the BN paper, translated), 004 (Proxy Norm, Labatie et al.). Each test names
the article and the place it paraphrases. The training tests run a few hundred steps of the BN paper's
MLP (normkit.lab.models.MLP3) on scikit-learn's digits, with margins far from the thresholds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
import normkit.nn as nkn

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale + offset


def _rand_affine(layer: nn.Module, seed: int) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p is layer.weight else 0.0)
            )
    return layer


def _channels_last_flat(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (N * prod(S), C): one row per value of the per-channel set."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


# --- the BN transform (003 §3, Algorithm 1; 000 §5.1, 6-7) -----------------------------------------


def test_normalized_values_sum_to_zero_and_have_unit_mean_square():
    """003 §3: ignoring eps, sum_i xhat_i = 0 and (1/m) sum_i xhat_i^2 = 1 over each channel's set
    (m = N*H*W for a conv layer, 003 §3.2)."""
    x = _randn(5, 3, 4, 2, seed=0, scale=3.0, offset=2.0)
    bn = nkn.BatchNorm2d(3, eps=0.0, affine=False).double()
    xhat = _channels_last_flat(bn(x))
    m = xhat.shape[0]
    assert m == 5 * 4 * 2
    torch.testing.assert_close(xhat.sum(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close((xhat**2).sum(0) / m, torch.ones(3, dtype=F64), atol=1e-12, rtol=0)


def test_gamma_sqrt_var_and_beta_mean_recover_the_identity():
    """003 §3 (and 000 §5.1 6): with gamma = sqrt(Var_B + eps) and beta = E_B[x] the BN transform
    restores the original activations (the inserted layer can represent the identity)."""
    x = _randn(6, 4, 3, 3, seed=1, scale=2.0, offset=-1.0)
    flat = _channels_last_flat(x)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    bn = nkn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean)
    torch.testing.assert_close(bn(x), x, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(16, 4), (3, 4, 5, 2)], ids=["fc", "conv"])
def test_backward_equals_the_papers_chain_rule(shape):
    """003 §3: the six chain-rule formulas of the paper (dl/dxhat, dl/dvar, dl/dmu, dl/dx, dl/dgamma,
    dl/dbeta), written out in float64, against autograd through normkit's BN; for the conv case over the
    effective mini-batch m' = N*H*W (003 §3.2)."""
    C, eps = shape[1], 1e-3
    bn = _rand_affine((nkn.BatchNorm1d if len(shape) == 2 else nkn.BatchNorm2d)(C, eps=eps).double(), 2)
    x = _randn(*shape, seed=3, scale=1.5, offset=0.5).requires_grad_()
    dy = _randn(*shape, seed=4)
    dx, dgamma, dbeta = torch.autograd.grad(bn(x), (x, bn.weight, bn.bias), dy)

    xs, dys = _channels_last_flat(x.detach()), _channels_last_flat(dy)
    m = xs.shape[0]
    gamma = bn.weight.detach()
    mu = xs.sum(0) / m
    var = ((xs - mu) ** 2).sum(0) / m
    xhat = (xs - mu) / torch.sqrt(var + eps)
    d_xhat = dys * gamma
    d_var = (d_xhat * (xs - mu)).sum(0) * -0.5 * (var + eps) ** -1.5
    d_mu = (d_xhat * -1.0 / torch.sqrt(var + eps)).sum(0) + d_var * (-2.0 * (xs - mu)).sum(0) / m
    d_x = d_xhat / torch.sqrt(var + eps) + d_var * 2.0 * (xs - mu) / m + d_mu / m
    torch.testing.assert_close(_channels_last_flat(dx), d_x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dgamma, (dys * xhat).sum(0), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dbeta, dys.sum(0), atol=1e-10, rtol=1e-10)


def test_conv_bn_is_bn1d_over_n_h_w_with_one_gamma_beta_per_feature_map():
    """000 §5.1 8-9, 003 §3.2: a conv layer's BN treats each feature map as one neuron, over an effective
    mini-batch of m*w*h values, with one (gamma, beta) per map (6 maps: 12 parameters, not 6*100*100*2);
    forward, gradients and the unbiased running variance (Bessel's m'/(m'-1)) equal BatchNorm1d on the
    (N*H*W, C) view, and in inference every location of a map gets the same linear transform."""
    N, C, H, W = 3, 6, 5, 4
    bn2 = _rand_affine(nkn.BatchNorm2d(C, momentum=1.0).double(), 5)
    bn1 = nkn.BatchNorm1d(C, momentum=1.0).double()
    bn1.load_state_dict(bn2.state_dict())
    assert sum(p.numel() for p in bn2.parameters()) == 2 * C
    x = _randn(N, C, H, W, seed=6, scale=2.0, offset=1.0).requires_grad_()
    xf = _channels_last_flat(x.detach()).requires_grad_()
    dy = _randn(N, C, H, W, seed=7)
    y2, y1 = bn2(x), bn1(xf)
    torch.testing.assert_close(_channels_last_flat(y2), y1, atol=1e-12, rtol=1e-12)
    (g2,) = torch.autograd.grad(y2, x, dy)
    (g1,) = torch.autograd.grad(y1, xf, _channels_last_flat(dy))
    torch.testing.assert_close(_channels_last_flat(g2), g1, atol=1e-12, rtol=1e-12)
    m = N * H * W
    flat = _channels_last_flat(x.detach())
    torch.testing.assert_close(bn2.running_var, flat.var(0, unbiased=False) * m / (m - 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(bn2.running_var, bn1.running_var, atol=1e-12, rtol=0)
    bn2.eval()
    a = bn2.weight / torch.sqrt(bn2.running_var + bn2.eps)
    b = bn2.bias - a * bn2.running_mean
    with torch.no_grad():
        torch.testing.assert_close(bn2(x), x * a.view(1, C, 1, 1) + b.view(1, C, 1, 1), atol=1e-12, rtol=0)


# --- BN and the scale of the weights (003 §3.3) -------------------------------------------------


@pytest.mark.parametrize("a", [0.1, 10.0])
def test_bn_is_invariant_to_the_weight_scale_and_its_gradient_scales_by_one_over_a(a):
    """003 §3.3: BN(Wu) = BN((aW)u), dBN((aW)u)/du = dBN(Wu)/du and dBN((aW)u)/d(aW) = (1/a) dBN(Wu)/dW
    (exact with eps = 0): larger weights get smaller gradients."""
    u = _randn(32, 6, seed=8)
    W = _randn(5, 6, seed=9)
    dy = _randn(32, 5, seed=10)
    bn = _rand_affine(nkn.BatchNorm1d(5, eps=0.0).double(), 11)

    def run(weight):
        weight = weight.clone().requires_grad_()
        inp = u.clone().requires_grad_()
        y = bn(inp @ weight.T)
        du, dw = torch.autograd.grad(y, (inp, weight), dy)
        return y.detach(), du, dw

    y1, du1, dw1 = run(W)
    ya, dua, dwa = run(a * W)
    torch.testing.assert_close(ya, y1, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dua, du1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dwa, dw1 / a, atol=1e-10, rtol=1e-10)


def test_bias_before_bn_is_redundant_and_gets_no_gradient():
    """003 §3.2: in BN(Wu + b) the bias b is cancelled by the mean subtraction, so it can be dropped;
    003 §2: a gradient step that ignores E[x]'s dependence on b changes b without changing the loss (b
    drifts forever), which backpropagating through the batch mean (what BN does) avoids: dl/db = 0."""
    u = _randn(32, 6, seed=12)
    W = _randn(5, 6, seed=13)
    b = _randn(5, seed=14, scale=3.0).requires_grad_()
    target = _randn(32, 5, seed=15)
    bn = _rand_affine(nkn.BatchNorm1d(5).double(), 16)
    y_b, y_0 = bn(u @ W.T + b), bn(u @ W.T)
    torch.testing.assert_close(y_b, y_0, atol=1e-12, rtol=1e-12)
    (db,) = torch.autograd.grad(((y_b - target) ** 2).sum(), b)
    torch.testing.assert_close(db, torch.zeros(5, dtype=F64), atol=1e-10, rtol=0)

    # The paper's counter-example: xhat = x + b - E[x + b] with E taken outside the gradient.
    x = u @ W.T

    def loss_of(bias, detach_mean):
        s = x + bias
        mean = s.mean(0)
        return (((s - (mean.detach() if detach_mean else mean)) - target) ** 2).sum()

    (db_naive,) = torch.autograd.grad(loss_of(b, True), b)
    assert db_naive.abs().max() > 1.0
    with torch.no_grad():
        b_new = b - 0.1 * db_naive
        torch.testing.assert_close(loss_of(b_new, False), loss_of(b, False), atol=1e-9, rtol=1e-12)
    assert (b_new - b).abs().max() > 0.1


# --- re-scaling invariances (001 §5) ------------------------------------------------------------


def _layer_out(norm: nn.Module, W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return norm(u @ W.T)


def test_rescaling_invariances_of_bn_ln_and_wn():
    """001 §5 (weight-vector, weight-matrix and data re-scaling): with eps = 0, scaling one unit's weight
    vector leaves BN and WN unchanged but not LN (which mixes the units); scaling the whole weight matrix,
    or the data, leaves BN and LN (and GN) unchanged."""
    u = _randn(16, 6, seed=20)
    W = _randn(8, 6, seed=21)
    s = torch.linspace(0.2, 5.0, 8, dtype=F64)[:, None]  # per-unit scales (weight vectors)
    bn = _rand_affine(nkn.BatchNorm1d(8, eps=0.0).double(), 22)
    ln = _rand_affine(nkn.LayerNorm(8, eps=0.0).double(), 23)
    gn = _rand_affine(nkn.GroupNorm(2, 8, eps=0.0).double(), 24)

    # weight-vector re-scaling
    torch.testing.assert_close(_layer_out(bn, s * W, u), _layer_out(bn, W, u), atol=1e-10, rtol=1e-10)
    assert (_layer_out(ln, s * W, u) - _layer_out(ln, W, u)).abs().max() > 0.1
    lin = nkn.weight_norm(nn.Linear(6, 8, bias=False).double())
    v = lin.parametrizations.weight.original1
    with torch.no_grad():
        y0 = lin(u)
        v.mul_(s)
        torch.testing.assert_close(lin(u), y0, atol=1e-12, rtol=1e-12)

    # weight-matrix and data re-scaling
    for a in (0.01, 7.0):
        for norm in (bn, ln, gn):
            ref = _layer_out(norm, W, u)
            torch.testing.assert_close(_layer_out(norm, a * W, u), ref, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(_layer_out(norm, W, a * u), ref, atol=1e-10, rtol=1e-10)


# --- weight normalization (001 §1; Salimans & Kingma, named by the brief) ------------------------


def test_wn_gradient_is_a_projection_and_sgd_grows_the_norm_of_v():
    """WN: grad_v = (g/||v||) (I - w w^T/||w||^2) grad_w per output unit (a projection orthogonal to
    v), so one SGD step gives ||v'||^2 = ||v||^2 + lr^2 ||grad_v||^2 exactly: ||v|| only grows."""
    lin = nkn.weight_norm(nn.Linear(5, 3).double())
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    x, dy = _randn(7, 5, seed=30), _randn(7, 3, seed=31)
    (dv,) = torch.autograd.grad(lin(x), v, dy)
    dw = dy.T @ x  # dl/dw of a linear layer
    v0, w0 = v.detach().clone(), lin.weight.detach()
    for j in range(3):
        wj = w0[j]
        proj = torch.eye(5, dtype=F64) - torch.outer(wj, wj) / wj.dot(wj)
        want = g.detach()[j, 0] / v0[j].norm() * proj @ dw[j]
        torch.testing.assert_close(dv[j], want, atol=1e-12, rtol=1e-10)
    lr = 0.3
    v_new = v0 - lr * dv
    torch.testing.assert_close(
        v_new.norm(dim=1) ** 2, v0.norm(dim=1) ** 2 + lr**2 * dv.norm(dim=1) ** 2, atol=1e-12, rtol=1e-12
    )
    assert bool((v_new.norm(dim=1) > v0.norm(dim=1)).all())


@pytest.mark.parametrize(
    "make, shape", [(lambda: nn.Linear(6, 4), (256, 6)), (lambda: nn.Conv2d(3, 4, 3), (16, 3, 7, 7))]
)
def test_wn_data_dependent_init_is_bn_of_the_initial_layer(make, shape):
    """WN's data-dependent init (g = 1/sigma[t], b = -mu[t]/sigma[t] with t = v.x/||v||) makes the layer's
    output on the init batch exactly what BN without affine (eps = 0, biased variance) would give for the
    original layer: an oracle written here in float64."""
    torch.manual_seed(0)
    layer = make().double()
    x = _randn(*shape, seed=32, scale=2.0, offset=1.0)
    with torch.no_grad():
        t = layer(x)
        dims = (0, *range(2, t.dim()))
        view = [1, -1] + [1] * (t.dim() - 2)
        want = (t - t.mean(dims).view(view)) / t.var(dims, unbiased=False).sqrt().view(view)
        init = nkn.weight_norm(copy.deepcopy(layer), init_batch=x)
        torch.testing.assert_close(init(x), want, atol=1e-10, rtol=1e-10)


# --- Keras's BatchNormalization as the article uses it (002, "Keras中BN的使用") ------------------------


def test_keras_bn_defaults_and_the_six_plus_six_weights_of_a_three_channel_image():
    """002: BatchNormalization(axis=-1, momentum=0.99, epsilon=0.001, center=True, scale=True) on an
    (H, W, 3) image has 6 trainable weights (gamma, beta) and 6 non-trainable ones (moving mean and
    variance, updated by the moving average, not by backprop); the statistics of each channel pool the
    whole batch and every pixel; trainable=False freezes gamma and beta. (20x20 instead of the article's
    320x320: the counts do not depend on the image size.)"""
    layer = nkn.BatchNormalization(3)
    cfg = layer.get_config()
    assert (cfg["axis"], cfg["momentum"], cfg["epsilon"], cfg["center"], cfg["scale"], cfg["trainable"]) == (
        -1,
        0.99,
        1e-3,
        True,
        True,
        True,
    )
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 6
    assert sum(b.numel() for b in layer.buffers()) == 6
    assert all(not b.requires_grad for b in layer.buffers())
    assert sum(w.size for w in layer.get_weights()) == 12

    x = (torch.randn(2, 20, 20, 3, generator=_gen(40)) * 2 + 1).double()
    layer = layer.double()
    layer(x)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2), unbiased=False)
    torch.testing.assert_close(layer.moving_mean, 0.01 * mean, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(layer.moving_variance, 0.99 + 0.01 * var, atol=1e-12, rtol=1e-10)

    layer.trainable = False
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 0
    assert sum(b.numel() for b in layer.buffers()) == 6
    assert sum(p.numel() for p in nkn.BatchNormalization(3, center=False).parameters()) == 3


# --- batch dependence (004 "批次规范的复杂性"; 001 局限1; 000 GN) ----------------------------------------


def _companion_spread(layer: nn.Module, x0: torch.Tensor, pool: torch.Tensor, B: int, draws: int) -> float:
    """Mean over x0's values of the std, over random companions, of layer's output for x0."""
    g = _gen(B)
    outs = []
    with torch.no_grad():
        for _ in range(draws):
            idx = torch.randperm(len(pool), generator=g)[: B - 1]
            outs.append(layer(torch.cat([x0, pool[idx]]))[0])
    return torch.stack(outs).std(0).mean().item()


def test_bn_output_noise_grows_as_the_batch_shrinks_and_batch_free_norms_have_none():
    """004: a sample's BN output depends on the other samples of its mini-batch, and the smaller the
    mini-batch the larger that noise (001 局限1, 000: BN degrades at small batches); GN, LN and LN+PN use
    no batch statistics (no noise), and BN in eval mode uses fixed running statistics."""
    C = 8
    x0 = torch.randn(1, C, 3, 3, generator=_gen(50))
    pool = torch.randn(2000, C, 3, 3, generator=_gen(51)) * 1.5 + 0.5
    bn = nkn.BatchNorm2d(C)
    spread = {B: _companion_spread(bn, x0, pool, B, 100) for B in (2, 8, 32)}
    # seen: 0.225 / 0.125 / 0.063 (about 1/sqrt(B) once B is large)
    assert spread[2] > 1.5 * spread[8] > 0
    assert spread[8] > 1.5 * spread[32] > 0
    for layer in (
        bn.eval(),
        normkit.create_norm_layer("gn:4", C),
        normkit.create_norm_layer("ln", C),
        normkit.create_norm_act_layer("ln+pn", C),
    ):
        assert _companion_spread(layer, x0, pool, 2, 10) < 1e-6, layer


# --- trained claims, on the BN paper's MLP (000 §5.1 11; 001 四.1; 003 abstract, §3.3) -----------------


@pytest.fixture(scope="module")
def digits():
    from normkit.lab.data import load_digits

    d = load_digits()
    return d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test


def _mlp_accuracy(digits, norm: str, lr: float, init_std: float = 0.1, steps: int = 300) -> float:
    """Test accuracy of MLP-3 (3 sigmoid layers of 100, the BN paper's MNIST net) after plain SGD on
    batches of 60 drawn with a fixed seed."""
    from normkit.lab.models import MLP3

    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = MLP3(norm, init_std=init_std)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = _gen(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (60,), generator=g)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


def test_bn_trains_at_a_learning_rate_that_breaks_the_plain_sigmoid_net(digits, one_thread):
    """000 §5.1 11-2, 001 四.1, 003 abstract and §3.3: BN allows much higher learning rates (and saturating
    nonlinearities). At LR 10 (100x the paper's MLP LR) the plain sigmoid net stays at chance while the BN
    net trains; at LR 1 both train (the plain net is trainable, so the LR is what breaks it).
    Seen: plain 10% vs BN 95-97% at LR 10 over seeds 0-4."""
    assert _mlp_accuracy(digits, "none", 1.0) > 0.8
    assert _mlp_accuracy(digits, "none", 10.0) < 0.3
    assert _mlp_accuracy(digits, "bn", 10.0) > 0.85


def test_bn_makes_training_insensitive_to_the_init_scale(digits, one_thread):
    """000 §5.1 11-3, 001 四.1, 003 abstract ("less careful about initialization"): over init scales
    std in {0.01, 0.1, 3}, the BN net reaches > 85% test accuracy at every scale, the plain net's accuracy
    spans more than 0.4 (chance at 0.01). Seen: BN 93-97%, plain 10% / 80-86% / 63-75% over seeds 0-4."""
    stds = (0.01, 0.1, 3.0)
    bn = [_mlp_accuracy(digits, "bn", 0.5, init_std=s) for s in stds]
    plain = [_mlp_accuracy(digits, "none", 0.5, init_std=s) for s in stds]
    assert min(bn) > 0.85, bn
    assert max(plain) - min(plain) > 0.4, plain


# --- channel-wise normalization and expressivity (004 "批处理规范的第一个/第二个好处", "代理定额") ---------


def test_ln_and_gn_lose_channel_wise_normalization_which_proxy_norm_restores():
    """004: BN and IN keep every channel normalized (no channel-wise squared mean), LN and GN do not
    (a large channel-wise squared mean deep in the net); IN removes all variation of the instance
    statistics; LN or GN(few groups) + Proxy Norm keep channel-wise normalization *and* that variation.
    A small untrained RandNet (10 layers of width 16, 64 digits16 inputs; the lab's E4 at 1/4 scale),
    post-norm power fractions at the last layer. Seen: P_mean LN 0.90, GN(4) 0.50, LN+PN 0.02,
    GN(4)+PN 0.008."""
    from normkit.lab.data import load_digits
    from normkit.lab.experiments.power import decompose_sequence
    from normkit.lab.models import RandNet

    x = load_digits(16).x_train[:64]
    frac = {}
    for norm in ("bn", "in", "ln", "gn:4", "ln+pn", "gn:4+pn"):
        torch.manual_seed(0)
        net = RandNet(norm, depth=10, width=16).train()
        mods = [m for pair in zip(net.convs, net.norm_acts) for m in pair]
        frac[norm] = decompose_sequence(mods, x)
    last = {n: f[-1]["post_norm"] for n, f in frac.items()}
    assert last["bn"]["P_mean"] < 1e-6 and last["in"]["P_mean"] < 1e-6
    assert last["ln"]["P_mean"] > 0.5 and last["gn:4"]["P_mean"] > 0.3
    for pn in ("ln+pn", "gn:4+pn"):
        assert last[pn]["P_mean"] < 0.1, (pn, last[pn])
        assert last[pn]["P_varmean"] > 1e-4 and last[pn]["P_varstd"] > 1e-4, (pn, last[pn])
        # what the next layer receives is centred too (PN's own output)
        assert frac[pn][-1]["post_act"]["P_mean"] < 0.1
    assert last["ln"]["P_mean"] > 5 * last["ln+pn"]["P_mean"]
    assert frac["ln"][-1]["post_act"]["P_mean"] > 0.5
    assert max(max(f["post_norm"]["P_varmean"], f["post_norm"]["P_varstd"]) for f in frac["in"]) < 1e-6


# --- defects the audit found, fixed (reproducers were in /tmp/seeds_audit/) -----------------------------
# The registry's 'ln' refused (N, C) features, so MLP3 / lr-sweep could not run LN on a fully connected
# layer (001 四.2); MLP3 reported logit(Proxy Norm's output), not the sigmoid's input, for '+pn' norms.


def test_mlp3_runs_layer_norm_on_fully_connected_features():
    from normkit.lab.models import MLP3

    torch.manual_seed(0)
    ln, gn1 = MLP3("ln"), MLP3("gn:1")
    gn1.load_state_dict(ln.state_dict())
    x = torch.randn(8, 64)
    torch.testing.assert_close(ln(x), gn1(x))  # LN over the features = GN with one group


def test_mlp3_reports_the_true_sigmoid_input_with_proxy_norm():
    from normkit.lab.models import MLP3

    torch.manual_seed(0)
    model = MLP3("ln+pn").double()
    x = torch.randn(16, 64, dtype=F64)
    _, pre = model(x, return_hidden=True)
    h = x
    for lin, na in zip(model.linears[:-1], model.norm_acts[:-1]):
        h = na(lin(h))
    last = model.norm_acts[-1]
    z = model.linears[-1](h)
    zhat = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + last.eps)
    want = last.weight * zhat + last.bias  # (LN over the features, then the proxy step's affine)
    torch.testing.assert_close(pre, want)
