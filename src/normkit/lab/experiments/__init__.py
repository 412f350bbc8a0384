"""The lab's experiments (docs/EXPERIMENTS.md, E1..E5), one module each, each a typed config plus a ``run_*``
function.

* :mod:`.compare` -- E1/E3: test error of small CNNs per norm, batch size and seed (the main job).
* :mod:`.power` -- E4: the power decomposition per layer of random (and trained) nets.
* :mod:`.lr_sweep` -- E2: largest stable learning rate with and without BN; MLP-3 sigmoid percentiles.
* :mod:`.landscape` -- E5: Santurkar et al.'s loss-landscape measures with and without BN.

Each config dataclass is the single source of its experiment's settings: defaults, help texts and
checks (:mod:`._common`); ``normkit <experiment>``'s options are generated from it (:data:`CONFIGS`).

Example:
    >>> sorted(CONFIGS) == sorted(RUNNERS)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .compare import CompareConfig, run_compare
from .landscape import LandscapeConfig, run_landscape
from .lr_sweep import LRSweepConfig, run_lr_sweep
from .power import PowerConfig, run_power

__all__ = ["CONFIGS", "RUNNERS"]

#: subcommand -> (config class, one-line help, description), in the order ``normkit --help`` lists them.
CONFIGS: dict[str, tuple[type, str, str]] = {
    "compare": (
        CompareConfig,
        "E1/E3: test error per norm, batch size and seed (the main job)",
        "Train small CNNs with each norm across batch sizes and seeds; print the test error (mean ± std over "
        "seeds) and check the pass criteria of docs/EXPERIMENTS.md, E1 and E3, each with its margin against "
        "the seeds' spread.",
    ),
    "power": (
        PowerConfig,
        "E4: power decomposition per layer of deep random (and trained) nets",
        "Decompose each layer's activation power into P_mean, P_varmean, P_varstd, P_meanstd "
        "(docs/EXPERIMENTS.md, "
        "E4), before and after the norm, for random nets (and trained CNN-4s).",
    ),
    "lr-sweep": (
        LRSweepConfig,
        "E2: largest stable LR with and without BN; MLP-3 sigmoid percentiles",
        "CNN-4 without a norm vs with BN over a learning-rate grid (divergence, steps to the no-norm net's "
        "best "
        "accuracy), and the BN paper's MLP-3 sigmoid experiment with the 15/50/85th percentiles of a "
        "last-hidden-layer input over training (docs/EXPERIMENTS.md, E2).",
    ),
    "landscape": (
        LandscapeConfig,
        "E5: Santurkar et al.'s loss-landscape measures with and without BN",
        "Train a plain 6-conv net with and without BN; every few steps measure, along the gradient, the loss "
        "range, the gradient change and the effective beta-smoothness (docs/EXPERIMENTS.md, E5).",
    ),
}

#: subcommand -> its ``run_*`` function.
RUNNERS: dict[str, Callable[[Any], Any]] = {
    "compare": run_compare,
    "power": run_power,
    "lr-sweep": run_lr_sweep,
    "landscape": run_landscape,
}
