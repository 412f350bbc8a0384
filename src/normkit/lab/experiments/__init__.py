"""The lab's experiments (ALGORITHMS.md §4), one module each, each a typed config plus a ``run_*`` function.

* :mod:`.compare` -- E1/E3: test error of small CNNs per norm, batch size and seed (the main job).
* :mod:`.power` -- E4: the power decomposition per layer of random (and trained) nets.
* :mod:`.lr_sweep` -- E2: largest stable learning rate with and without BN; MLP-3 sigmoid percentiles.
* :mod:`.landscape` -- E5: Santurkar et al.'s loss-landscape measures with and without BN.
"""
