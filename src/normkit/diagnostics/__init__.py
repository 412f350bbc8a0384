"""Diagnostics for norm layers: pure statistics (:mod:`.stats`) and hooks that record them (:mod:`.monitor`).

* :class:`NormMonitor`: a context manager that records, per norm layer and batch, the train/eval
  gap of BN, the drift of running statistics, dead and collapsed channels, the number of values
  behind each statistic and the power decomposition before and after the norm.
* :func:`train_eval_gap`: how much each BN layer's output changes between batch and running
  statistics on a batch (the model's state is restored).
* :mod:`normkit.diagnostics.stats`: the numbers themselves, as pure functions.
"""

from . import stats
from .monitor import NormMonitor, TrainEvalGap, train_eval_gap
from .stats import (
    TERMS,
    PowerDecomposition,
    batch_running_gap,
    channel_moments,
    dead_and_collapsed,
    ema_effective_batches,
    power_decomposition,
    power_fractions,
    values_per_statistic,
)

__all__ = [
    "TERMS",
    "NormMonitor",
    "PowerDecomposition",
    "TrainEvalGap",
    "batch_running_gap",
    "channel_moments",
    "dead_and_collapsed",
    "ema_effective_batches",
    "power_decomposition",
    "power_fractions",
    "stats",
    "train_eval_gap",
    "values_per_statistic",
]
