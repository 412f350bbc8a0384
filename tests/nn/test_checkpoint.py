"""Gradient checkpointing (``torch.utils.checkpoint``) around normkit's layers.

The checkpoint runs the segment's forward again inside the backward and differentiates that run.
Oracle: the same step without the checkpoint (outputs, every gradient; for Batch Renorm, whose
training output reads its running statistics, also the buffers after one update).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normkit.nn as nkn
from tests.toolchain.samples import SAMPLE_IDS, SAMPLES, Sample

REENTRANT = [pytest.param(True, id="reentrant"), pytest.param(False, id="non-reentrant")]


def _renorm(cls: type[nn.Module], **kw) -> nn.Module:
    torch.manual_seed(0)
    m = cls(6, **kw).train()
    with torch.no_grad():  # running statistics far from the batch's: r and d are not 1 and 0
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.3, 1.5)
    return m


def _step(m: nn.Module, x: torch.Tensor, reentrant: bool | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = m(x) if reentrant is None else checkpoint(m, x, use_reentrant=reentrant)
    w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * w).sum().backward()
    return y.detach(), [x.grad, *(p.grad for p in m.parameters())]


@pytest.mark.parametrize("reentrant", REENTRANT)
@pytest.mark.parametrize(
    ("cls", "kw", "shape"),
    [
        (nkn.BatchRenorm2d, {}, (4, 6, 5, 5)),
        (nkn.BatchRenorm1d, {"r_max": 1.5, "d_max": 0.5}, (8, 6)),
        (nkn.BatchRenorm2d, {"warmup_steps": 3}, (4, 6, 3, 3)),  # the warm-up reads num_batches_tracked
    ],
    ids=["2d", "1d-tight-limits", "2d-warmup"],
)
def test_batch_renorm_under_checkpoint_equals_the_plain_step(cls, kw, shape, reentrant: bool):
    x = torch.randn(shape) * 1.7 + 0.4
    ref, m = _renorm(cls, **kw), _renorm(cls, **kw)
    for step in range(3):  # several steps: the state each one starts from has moved
        y_ref, g_ref = _step(ref, x + step, None)
        y, g = _step(m, x + step, reentrant)
        torch.testing.assert_close(y, y_ref)
        for i, (a, b) in enumerate(zip(g, g_ref)):
            torch.testing.assert_close(a, b, msg=lambda s, i=i, t=step: f"step {t}, gradient {i}: {s}")
        for (k, a), b in zip(m.named_buffers(), ref.buffers()):  # one update per step, not two
            torch.testing.assert_close(a, b, msg=lambda s, k=k, t=step: f"step {t}, buffer {k}: {s}")
        m.zero_grad()
        ref.zero_grad()


def _block(seed: int, cin: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(cin, 6, 3, padding=1),
        _renorm(nkn.BatchRenorm2d),
        nn.ReLU(),
        nn.Conv2d(6, 6, 1),
        _renorm(nkn.BatchRenorm2d),
    )


def _compare(fn_ref, fn, m_ref: nn.Module, m: nn.Module, x: torch.Tensor) -> None:
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = fn_ref(xr), fn(xc)
    (y_ref * y_ref.detach().cos()).sum().backward()
    (y * y.detach().cos()).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xc.grad, xr.grad)
    for (k, a), b in zip(m.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda s, k=k: f"grad of {k}: {s}")
    for (k, a), b in zip(m.named_buffers(), m_ref.buffers()):
        torch.testing.assert_close(a, b, msg=lambda s, k=k: f"buffer {k}: {s}")


@pytest.mark.parametrize("reentrant", REENTRANT)
def test_batch_renorm_inside_checkpointed_blocks(reentrant: bool):
    """The usual use: blocks of conv + Batch Renorm checkpointed one by one (the norms' inputs are
    recomputed tensors), the second block's segment recomputed first."""
    ref, m = nn.Sequential(_block(1, 3), _block(2, 6)), nn.Sequential(_block(1, 3), _block(2, 6))
    x = torch.randn(4, 3, 5, 5)

    def run(t):
        return checkpoint(m[1], checkpoint(m[0], t, use_reentrant=reentrant), use_reentrant=reentrant)

    _compare(ref, run, ref, m, x)


def test_batch_renorm_shared_by_two_segments_and_twice_in_one():
    """Weight sharing: one layer in two checkpointed segments; and twice in one segment, its first
    call on the segment's input."""
    x = torch.randn(4, 6, 3, 3) * 1.5
    ref, m = _renorm(nkn.BatchRenorm2d), _renorm(nkn.BatchRenorm2d)

    def two_segments(layer, ckpt):
        def f(t):
            h = ckpt(layer, t)
            return ckpt(layer, h * 1.3 + 0.2)

        return f

    plain = lambda layer, t: layer(t)  # noqa: E731
    ckpt = lambda layer, t: checkpoint(layer, t, use_reentrant=False)  # noqa: E731
    _compare(two_segments(ref, plain), two_segments(m, ckpt), ref, m, x)

    ref, m = _renorm(nkn.BatchRenorm2d), _renorm(nkn.BatchRenorm2d)
    twice_ref = two_segments(ref, plain)
    _compare(twice_ref, lambda t: checkpoint(two_segments(m, plain), t, use_reentrant=False), ref, m, x)


@pytest.mark.parametrize("reentrant", REENTRANT)
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
def test_every_layer_under_checkpoint_gives_the_plain_gradients(sample: Sample, reentrant: bool):
    """Outputs and gradients of the checkpointed layer equal the plain layer's (running statistics
    update twice under a checkpoint, as torch.nn's do, except Batch Renorm's: see above)."""
    x = sample.input()
    y_ref, g_ref = _step(sample.module(True), x, None)
    y, g = _step(sample.module(True), x, reentrant)
    torch.testing.assert_close(y, y_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, msg=lambda s, i=i: f"gradient {i}: {s}")


def test_a_recomputed_input_at_a_dead_inputs_address_pairs_by_order(monkeypatch):
    """A layer deeper in a segment gets a recomputed input, which the allocator may place where another
    forward's (dead) input was: same address, same version, a key equal to that forward's. Pairing by
    that key took the wrong state (a rare failure of the 17-forward test, depending on addresses); only a
    saved input still alive (a segment's own input, which the checkpoint keeps) pairs by key, the rest
    by order, newest first. Addresses are simulated (each tensor's ``addr``)."""
    from normkit.nn import _recompute

    monkeypatch.setattr(_recompute, "_key", lambda x: (("cpu",), (x.addr,)))
    monkeypatch.setattr(_recompute, "_under_checkpoint", lambda: True)

    def at(addr: str) -> torch.Tensor:
        t = torch.randn(4, 3)
        t.addr = addr  # pyright: ignore[reportAttributeAccessIssue]
        return t

    states = _recompute.ForwardStates()
    first, second, third = ((torch.full((3,), v),) for v in (1.0, 2.0, 3.0))
    kept = at("C")  # a segment's input: alive, the checkpoint holds it
    for x, state in ((at("A"), first), (kept, second), (at("B"), third)):
        assert states.begin(x, state) is None
    del x  # (the inputs at A and B die here)
    monkeypatch.setattr(torch._C, "_current_graph_task_id", lambda: 1)  # as inside a backward
    got = states.begin(at("A"), ())  # recomputed, placed where the first forward's input was
    assert got is not None and torch.equal(got[0], third[0])  # the newest, by order (not A's)
    got = states.begin(kept, ())  # the kept input itself: its own state, whatever the order
    assert got is not None and torch.equal(got[0], second[0])
    got = states.begin(at("D"), ())
    assert got is not None and torch.equal(got[0], first[0])
    assert states.begin(at("E"), ()) is _recompute.LOST
