"""normkit's lab: small, seeded experiments that reproduce the normalization papers' claims on a CPU.

Run it from the command line (``normkit compare``, ``power``, ``lr-sweep``, ``landscape``,
``report``) or from Python::

    from normkit.lab.experiments.compare import CompareConfig, run_compare
    outcome = run_compare(CompareConfig(norms=["bn", "gn:8", "ln+pn"], batch_sizes=[32, 2]))
    print(outcome.summary)

Modules: :mod:`.data` (digits, CIFAR-10 batches), :mod:`.models` (CNN-4, pre-activation ResNet,
MLP-3, RandNet, VGG-ish; every norm built through the registry), :mod:`.train` (the seeded
training loop), :mod:`.power` (the power decomposition, pure functions), :mod:`.records` (run
folders), :mod:`.plots` (matplotlib, loaded lazily), :mod:`.report`, :mod:`.experiments`.

The lab sits on top of the import graph: it uses :mod:`normkit.nn` and
:mod:`normkit.functional`; ``import normkit`` never imports it (nor matplotlib, scikit-learn or
rich, which load only inside the functions that need them).
"""
