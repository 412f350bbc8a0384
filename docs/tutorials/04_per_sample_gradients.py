"""
Per-sample gradients (DP-SGD) with batch-independent norms
==========================================================

Differentially private training (DP-SGD) clips the gradient of *each sample* before averaging, so it
needs per-sample gradients: ``torch.func.vmap(torch.func.grad(loss))`` computes them in one batched
call. BatchNorm cannot take part: its output for one sample depends on the rest of the batch, so a
"sample's gradient" is not defined by that sample alone. Batch-independent norms can, and Proxy Norm
(LayerNorm or GroupNorm plus a proxy-normalized activation, :class:`normkit.nn.GroupNormProxyAct2d`)
keeps BatchNorm's benefits without the batch.

This tutorial computes per-sample gradients of a small conv net with normkit's Proxy Norm, checks
them against a loop of single-sample gradients, takes one DP-SGD step (clip, average, add noise),
and times the same model with torch.nn's GroupNorm + ReLU next to it. Under ``torch.func`` normkit's
norms run their fused CPU kernels: ``GroupNormProxyAct2d`` is one fused call each way, and the
per-sample gradients of its parameters come from one kernel call for the whole batch.
"""

# %%
# A model with Proxy Norm
# -----------------------
#
# ``normkit.create_norm_layer("ln+pn", C)`` is LayerNorm over (C, H, W) plus Proxy Norm's
# activation (``GroupNormProxyAct2d`` with one group), the authors' main recommendation. It replaces
# "norm + ReLU" as one layer.

import timeit

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import normkit

torch.manual_seed(0)
torch.set_num_threads(2)


def make_model(norm_act):
    # fmt: off
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), norm_act(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), norm_act(64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    # fmt: on


model = make_model(lambda c: normkit.create_norm_layer("ln+pn", c))
print(model[1])
x = torch.randn(32, 3, 16, 16)
target = torch.randint(0, 10, (32,))

# %%
# Per-sample gradients with torch.func
# ------------------------------------
#
# ``functional_call`` runs the model with the parameters given as a dict; ``grad`` differentiates
# one sample's loss with respect to them, and ``vmap`` maps that over the batch (each sample a batch
# of one inside).

params = {k: v.detach() for k, v in model.named_parameters()}


def sample_loss(p, xi, ti):
    logits = functional_call(model, p, (xi.unsqueeze(0),))
    return nn.functional.cross_entropy(logits, ti.unsqueeze(0))


per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
print({k: tuple(g.shape) for k, g in list(per_sample.items())[:3]})

# %%
# The same, one sample at a time
# ------------------------------
#
# Because the norm never looks across the batch, each per-sample gradient is exactly the gradient
# of that sample's loss computed alone, with ordinary autograd:

worst = 0.0
for i in range(len(x)):
    model.zero_grad()
    sample_loss(dict(model.named_parameters()), x[i], target[i]).backward()
    for k, p in model.named_parameters():
        worst = max(worst, (per_sample[k][i] - p.grad).abs().max().item())
print(f"largest difference from the loop: {worst:.1e}")
assert worst < 1e-5

# %%
# One DP-SGD step
# ---------------
#
# Clip each sample's whole gradient to norm ``clip``, average, and add Gaussian noise of standard
# deviation ``sigma * clip / batch`` (Abadi et al., 2016). The privacy accounting that chooses
# ``sigma`` is a separate matter (libraries such as Opacus do it).

clip, sigma, lr = 1.0, 1.0, 0.1
norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))
scale = (clip / (norms + 1e-6)).clamp(max=1.0)
print(f"per-sample gradient norms: min {norms.min():.2f}, max {norms.max():.2f}")
with torch.no_grad():
    for k, p in model.named_parameters():
        g = (per_sample[k] * scale.view(-1, *[1] * (per_sample[k].dim() - 1))).mean(0)
        p -= lr * (g + torch.randn_like(g) * sigma * clip / len(x))

# %%
# Next to torch.nn
# ----------------
#
# The same per-sample gradients with torch.nn's GroupNorm(1) + ReLU in place of Proxy Norm (one more
# layer each time: Proxy Norm's activation is part of its layer), timed in one process. The machine
# that built this page is a small, noisy CPU: read the ratio, not the milliseconds.

reference = make_model(lambda c: nn.Sequential(nn.GroupNorm(1, c), nn.ReLU()))
ref_params = {k: v.detach() for k, v in reference.named_parameters()}


def ref_loss(p, xi, ti):
    logits = functional_call(reference, p, (xi.unsqueeze(0),))
    return nn.functional.cross_entropy(logits, ti.unsqueeze(0))


def run_ours():
    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)


def run_torch():
    return vmap(grad(ref_loss), in_dims=(None, 0, 0))(ref_params, x, target)


run_ours(), run_torch()  # (warm up)
best = {"normkit ln+pn": float("inf"), "torch.nn GroupNorm(1) + ReLU": float("inf")}
for _ in range(5):
    for name, fn in zip(best, (run_ours, run_torch)):
        best[name] = min(best[name], timeit.timeit(fn, number=3) / 3 * 1e3)
for name, ms in best.items():
    print(f"{name}: {ms:.1f} ms per batch of {len(x)}")
print(f"ratio: {best['normkit ln+pn'] / best['torch.nn GroupNorm(1) + ReLU']:.2f}")

# %%
# docs/PERFORMANCE.md (section 7) has the same comparison for every norm and transform
# (``python benchmarks/func_transforms.py``). Ensembles work the same way:
# ``torch.func.stack_module_state`` stacks the members' parameters, and ``vmap`` over them runs each
# norm once for all members (the members become channels of one kernel call).
