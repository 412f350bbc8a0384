"""
BatchNorm at small batch: a lab experiment from Python
======================================================

Does BatchNorm break when the batch is small? The lab's ``compare`` experiment trains the same
CNN with a given norm at several batch sizes and measures the test error. Here we run a reduced
version of it from Python (one norm, one seed, three epochs on 600 of scikit-learn's digits:
about half a minute on two CPU cores), read the run folder it writes, and look at its plot.

The full experiment, with GroupNorm and LayerNorm + Proxy Norm next to BN, two seeds and eight
epochs, is ``normkit compare`` (3 to 6 minutes on two CPU cores); what it measured is on the
:doc:`/RESULTS` page.
"""

# %%
# Why small batches hurt BN: two values per channel
# -------------------------------------------------
#
# The model is the lab's CNN-4 with a head: ``Linear(64 -> 64) -> norm -> ReLU`` on the pooled
# features, so the head's norm sees ``(N, 64, 1, 1)``. A BatchNorm there pools each channel's
# statistics over the N samples of the batch only. With N = 2 the two normalized values of a channel are
# always -1 and +1, whatever the inputs were: the layer throws away everything but the sign.

import json
import os
import tempfile
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import torch

import normkit
from normkit.lab.experiments.compare import CompareConfig, run_compare

bn = normkit.nn.BatchNorm1d(4, affine=False)
x = torch.randn(2, 4) * 10 + 3
print(bn(x))
print(normkit.diagnostics.values_per_statistic("bn", (2, 64, 1, 1)), "values behind each mean and variance")

# %%
# Run the experiment
# ------------------
#
# :class:`~normkit.lab.experiments.compare.CompareConfig` holds every setting of ``normkit
# compare``; :func:`~normkit.lab.experiments.compare.run_compare` trains one model per (norm,
# batch size, seed), writes a run folder and returns a summary. The learning rate is scaled with
# the batch size (``lr * B / 32``, Goyal et al.'s linear scaling rule), so every batch size gets a
# fair schedule.

out_root = Path(os.environ.get("NORMKIT_DOCS_SCRATCH", tempfile.mkdtemp())) / "runs"
config = CompareConfig(
    norms=["bn"],
    batch_sizes=[32, 8, 2],
    seeds=[0],
    epochs=3,
    lr=0.1,
    limit_train=600,
    jobs=1,
    threads=1,
    quiet=True,
    out=str(out_root),
)
outcome = run_compare(config)
print(outcome.summary)

# %%
# The run folder
# --------------
#
# Everything the run did is on disk: the configuration, the environment (torch version, CPU,
# commit), one line of metrics per training, the aggregated results, the summary and the plots.

for path in sorted(outcome.path.iterdir()):
    print(f"{path.name:20s} {path.stat().st_size:8d} bytes")

results = json.loads((outcome.path / "results.json").read_text())
print(sorted(results))

# %%
# The lab's plot
# --------------
#
# ``error_vs_batch.png`` is the plot ``normkit compare`` writes: test error against batch size,
# one panel per norm (here BN's only), and for BN a second, dotted line measured with batch
# statistics (the model in train mode on test batches of the training batch size). The dashed line
# is E1's pass threshold: BN's error at the smallest batch must reach its error at the largest + 3 pt.

image = mpimg.imread(outcome.path / "error_vs_batch.png")
fig, ax = plt.subplots(figsize=(6, 4.3))
ax.imshow(image)
ax.set_axis_off()
fig.tight_layout()

# %%
# Reading it
# ----------
#
# The same numbers, from ``outcome.aggregate``. At batch 32 BN's test error is a few percent; at
# batch 2 it is many times that, whichever statistics it uses at test time: the head's BN
# cannot learn anything useful from two values per channel, and its running statistics, averaged
# over such batches, do not describe single test images either.

rows = sorted(outcome.aggregate, key=lambda r: -r["batch_size"])
for r in rows:
    print(
        f"B={r['batch_size']:2d}  lr={r['lr']:.4f}  test error {r['test_err_mean']:5.1f} %  "
        f"(with batch statistics {r['test_err_batch_stats_mean']:5.1f} %)"
    )
err = {r["batch_size"]: r["test_err_mean"] for r in rows}
assert err[2] > err[32] + 3, "BN at batch 2 should be clearly worse than at batch 32"

# %%
# Batch-independent norms (GroupNorm, LayerNorm + Proxy Norm) do not have this problem: their
# statistics come from one sample. Run ``normkit compare`` for the three of them side by side,
# or change ``norms=`` above to ``["bn", "gn:8", "ln+pn"]`` (and the epochs back to 8).
