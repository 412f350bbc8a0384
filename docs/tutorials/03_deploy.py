"""
Deploy: fold the norms, then export
===================================

A trained model with normkit norms, made ready for inference: fold every BatchNorm into the
convolution before it with :func:`normkit.fold_bn`, fold Proxy Norm's affine into the next
convolution with :func:`normkit.fold_proxy_norm`, then export with ``torch.export`` and to ONNX,
and run the ONNX file in ONNX Runtime. Every step is checked against the model it came from.

The ONNX part needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (the ``test`` and ``docs``
extras install them).
"""

# %%
# A trained model
# ---------------
#
# A small conv net with normkit's BatchNorm2d, given non-trivial running statistics by a few
# training steps on random data (what matters here is that the statistics are not 0 and 1).

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import normkit

torch.manual_seed(0)


def make_model(norm_layer):
    # fmt: off
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), norm_layer(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), norm_layer(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), norm_layer(32), nn.ReLU(),  # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    # fmt: on


model = make_model(normkit.nn.BatchNorm2d)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for _ in range(20):
    x = torch.randn(16, 3, 16, 16) * 2 + 0.5
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
example = torch.randn(4, 3, 16, 16)
print(model)

# %%
# Fold the BatchNorms
# -------------------
#
# In eval mode a BN layer is a per-channel affine map, ``y = s * (x - running_mean) + beta`` with
# ``s = gamma / sqrt(running_var + eps)``, so the convolution before it can absorb it:
# ``W' = s W`` along the output channels and ``b' = s (b - running_mean) + beta``.
# :func:`normkit.fold_bn` does this for the whole model (it finds conv → BN pairs with
# ``torch.fx``), replaces each folded BN by ``nn.Identity``, leaves the original model alone, and
# returns the largest difference between the two models' outputs on a probe input.

folded, max_diff, report = normkit.fold_bn(model, example)
print(report)
print(f"largest |folded(x) - model(x)| on the probe: {max_diff:.2e}")
print(folded)
assert max_diff < 1e-4

# %%
# fold_bn refuses a model in train mode (a BN in train mode uses batch statistics, which no
# weight can absorb), and says so:

try:
    normkit.fold_bn(model.train(), example)
except normkit.NormError as err:
    print(err)
model.eval()

# %%
# Proxy Norm: fold its affine into the next convolution
# -----------------------------------------------------
#
# A model converted to LayerNorm + Proxy Norm (``"ln+pn"``) has, after each norm, an affine map,
# a proxy-normalized activation and its own per-channel scale and shift.
# :func:`normkit.fold_proxy_norm` folds what can be folded into the following convolution and
# returns the model; the outputs stay the same.

pn_model, pn_report = normkit.convert_norms(model, "ln+pn")
pn_model.eval()
pn_folded = normkit.fold_proxy_norm(pn_model, example)
with torch.no_grad():
    diff = (pn_folded(example) - pn_model(example)).abs().max().item()
print(pn_report)
print(f"largest |fold_proxy_norm(model)(x) - model(x)|: {diff:.2e}")
assert diff < 1e-4

# %%
# torch.export
# ------------
#
# normkit's layers export to standard ATen ops (``batch_norm``, ``group_norm``, ``layer_norm``,
# or plain arithmetic), so the exported program has no normkit dependency. Here the unfolded
# model, to show that the norm layers themselves export; the folded one has none left.

program = torch.export.export(model, (example,))
ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"})
print("\n".join(ops))
with torch.no_grad():
    diff = (program.module()(example) - model(example)).abs().max().item()
print(f"largest |exported(x) - model(x)|: {diff:.2e}")
assert diff < 1e-5

# %%
# ONNX, run in ONNX Runtime
# -------------------------
#
# ``torch.onnx.export`` (the dynamo-based exporter) writes the folded model to a file; ONNX
# Runtime loads and runs it. ONNX Runtime runs its own kernels, so the outputs agree to float32
# rounding, not bit for bit.

import logging  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # the exporter's progress notes
    logging.getLogger(name).setLevel(logging.ERROR)

out_dir = Path(os.environ.get("NORMKIT_DOCS_SCRATCH", tempfile.mkdtemp()))
out_dir.mkdir(parents=True, exist_ok=True)
onnx_path = out_dir / "folded.onnx"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the exporter's notes
    torch.onnx.export(folded, (example,), onnx_path, dynamo=True, verbose=False)
print(f"{onnx_path.name}: {onnx_path.stat().st_size / 1024:.0f} KiB")

session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
(got,) = session.run(None, {name: example.numpy()})
with torch.no_grad():
    want = model(example).numpy()
print(f"largest |onnxruntime(x) - model(x)|: {np.abs(got - want).max():.2e}")
assert np.allclose(got, want, atol=1e-4)

# %%
# What was exported, node by node (no normalization left after folding):

import onnx  # noqa: E402

graph = onnx.load(str(onnx_path)).graph
print([node.op_type for node in graph.node])
