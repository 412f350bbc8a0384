"""
From torch.nn to normkit
========================

A CNN written with ``torch.nn`` norms, trained, checkpointed. This tutorial moves it onto normkit
without touching its code: swap the norms, load the old checkpoint, check that the outputs agree,
then keep training, and finally try a batch-independent norm in the same model.

It runs in well under a minute on a laptop CPU, on scikit-learn's 8x8 digits (shipped with
scikit-learn, nothing is downloaded).
"""

# %%
# A model and a checkpoint, pure torch.nn
# ---------------------------------------
#
# A small CNN that takes its norm as an argument, the way torchvision and timm models do
# (``norm_layer=``). We train it for two epochs with ``torch.nn.BatchNorm2d`` and keep its
# ``state_dict``: that is the checkpoint we want to carry over.

import io

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import normkit

torch.manual_seed(0)

digits = load_digits()
x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
y_all = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x_all[:1400], y_all[:1400], x_all[1400:], y_all[1400:]
mean, std = x_train.mean(), x_train.std()
x_train, x_test = (x_train - mean) / std, (x_test - mean) / std


class SmallCNN(nn.Module):
    def __init__(self, norm_layer=nn.BatchNorm2d):
        super().__init__()
        # fmt: off
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), norm_layer(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), norm_layer(64), nn.ReLU(),
        )
        # fmt: on
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def train(model, epochs, batch_size=32, lr=0.05, params=None):
    """Plain SGD; returns the training loss of every step."""
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=lr, momentum=0.9)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def test_error(model):
    model.eval()
    return 100.0 * (model(x_test).argmax(1) != y_test).float().mean().item()


torch_model = SmallCNN()
torch_losses = train(torch_model, epochs=2)
checkpoint = io.BytesIO()
torch.save(torch_model.state_dict(), checkpoint)
print(f"torch.nn model: test error {test_error(torch_model):.1f} %")

# %%
# Swap the norms
# --------------
#
# Two ways, same result. If the model takes a ``norm_layer``, pass normkit's class: its layers
# subclass torch.nn's (``isinstance(layer, torch.nn.BatchNorm2d)`` is true) and take the same
# arguments. For a model you cannot rebuild, :func:`normkit.convert_norms` swaps every norm layer
# of a copy of it and reports what it did.

model = SmallCNN(norm_layer=normkit.nn.BatchNorm2d)
print(type(model.features[1]), isinstance(model.features[1], nn.BatchNorm2d))

converted, report = normkit.convert_norms(torch_model, "bn")
print(report)

# %%
# Load the checkpoint and check the outputs
# -----------------------------------------
#
# normkit's layers keep torch.nn's parameter and buffer names, so the torch checkpoint loads
# strictly. In eval mode both models now compute the same function; in train mode they use the
# same batch statistics and update the running statistics the same way.

checkpoint.seek(0)
print(model.load_state_dict(torch.load(checkpoint)))

x = x_test[:64]
for mode in ("eval", "train"):
    ours, ref = SmallCNN(normkit.nn.BatchNorm2d), SmallCNN()
    checkpoint.seek(0)
    state = torch.load(checkpoint)
    ours.load_state_dict(state)
    ref.load_state_dict(state)
    ours.train(mode == "train")
    ref.train(mode == "train")
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    bn_ours, bn_ref = ours.features[1], ref.features[1]
    stats_diff = (bn_ours.running_mean - bn_ref.running_mean).abs().max().item()
    print(f"{mode:5s}: largest output difference {diff:.1e}, running-mean difference {stats_diff:.1e}")
    assert diff < 1e-4 and stats_diff < 1e-6

# %%
# What normkit adds on the way: a batch with a NaN does not poison the running statistics (the
# update is skipped and counted), and a wrong input says what is wrong.

bn = model.features[1]
bad = x_train[:8].clone()
bad[0, 0, 0, 0] = float("nan")
model.train()
with torch.no_grad():
    model(bad)
print(
    "running_mean finite:",
    bool(torch.isfinite(bn.running_mean).all()),
    "| skipped updates:",
    int(bn.num_skipped_updates),
)

try:
    normkit.nn.GroupNorm(4, 30)
except normkit.NormError as err:  # also a ValueError and a RuntimeError
    print(err)

# %%
# Keep training
# -------------
#
# Training goes on from the checkpoint with the usual optimizer. :func:`normkit.param_groups`
# puts weight decay on the conv and linear weights only, not on the norms' affine parameters
# (4 tensors with decay, 7 without here).

groups = normkit.param_groups(model, weight_decay=5e-4)
print([(len(g["params"]), g["weight_decay"]) for g in groups])
normkit_losses = train(model, epochs=1, params=groups)
print(f"normkit model after one more epoch: test error {test_error(model):.1f} %")

# %%
# A batch-independent norm in the same model
# ------------------------------------------
#
# BN's output depends on the other samples of the batch. GroupNorm's does not: convert the
# trained model's norms to ``"gn:8"`` (the per-channel affine carries over; the running
# statistics have no meaning for GN and are dropped, as the report says) and fine-tune.

gn_model, gn_report = normkit.convert_norms(model, "gn:8")
print(gn_report)
gn_losses = train(gn_model, epochs=1, batch_size=8, lr=0.01)
print(f"GroupNorm model, fine-tuned for an epoch at batch size 8: test error {test_error(gn_model):.1f} %")

fig, ax = plt.subplots(figsize=(6, 3.2))
steps = range(len(torch_losses) + len(normkit_losses))
ax.plot(steps[: len(torch_losses)], torch_losses, label="torch.nn BatchNorm2d", lw=0.8)
ax.plot(steps[len(torch_losses) :], normkit_losses, label="normkit BatchNorm2d (from the checkpoint)", lw=0.8)
ax.set_xlabel("step (batch 32)")
ax.set_ylabel("training loss")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()
