"""normkit.distributed: batch norm across processes with torch.distributed (gloo on CPU, nccl on GPU).

* :func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm`: swap a model's BN layers for
  :class:`normkit.nn.SyncBatchNorm` (statistics over every process) and back, losing nothing.
* :func:`recalibrate_bn`: precise BN, the running statistics recomputed as population statistics
  over a loader (pooled over the processes).
* :func:`sync_bn_buffers`: make every process's running statistics agree (average or broadcast).

Statistics are computed per process, exchanged with one collective and merged with Chan et al.'s
parallel formula (:mod:`normkit.functional._collective`). Without an initialised process group,
or with one process, every function here works locally and issues no collective.
"""

from .buffers import sync_bn_buffers
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .recalibrate import recalibrate_bn

__all__ = ["convert_sync_batchnorm", "recalibrate_bn", "revert_sync_batchnorm", "sync_bn_buffers"]
