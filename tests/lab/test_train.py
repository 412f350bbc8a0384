"""The training loop: seeded determinism, data-parallel batch slicing, schedules, batch-statistics
evaluation."""

from __future__ import annotations

import pytest
import torch

from normkit.lab.data import load_dataset, load_synthetic
from normkit.lab.models import CNN4
from normkit.lab.train import (
    TrainConfig,
    _lr_factor,
    _run_length,
    epoch_batches,
    evaluate,
    evaluate_batch_stats,
    has_batch_stats,
    set_seed,
    train_classifier,
)


def _train(seed: int, norm: str = "bn") -> tuple[list[dict], dict[str, torch.Tensor]]:
    data = load_dataset("digits", limit_train=64, limit_test=32)
    set_seed(seed)
    model = CNN4(norm, head=True)
    res = train_classifier(
        model, data, TrainConfig(epochs=2, batch_size=8, lr=0.02, warmup_epochs=0.5, seed=seed)
    )
    return res.history + [res.final], model.state_dict()


def test_same_seed_same_numbers_bitwise() -> None:
    h1, s1 = _train(3)
    h2, s2 = _train(3)
    assert h1 == h2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    h3, _ = _train(4)
    assert h3 != h1


def test_epoch_batches_split_global_batches_across_ranks() -> None:
    parts = [epoch_batches(23, 3, torch.Generator().manual_seed(0), world_size=2, rank=r) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 3  # 23 // (3 * 2): the incomplete global batch is dropped
    flat = torch.cat([torch.cat(p) for p in parts])
    assert len(set(flat.tolist())) == 18  # disjoint
    single = epoch_batches(23, 6, torch.Generator().manual_seed(0))
    for step in range(3):  # rank slices of a global batch == the single-process batch of the same size
        assert torch.cat([parts[0][step], parts[1][step]]).tolist() == single[step].tolist()
    with pytest.raises(ValueError, match="exceeds the 5 training samples"):
        epoch_batches(5, 4, torch.Generator(), world_size=2)


def test_lr_schedule_warmup_then_cosine() -> None:
    f = _lr_factor("cosine", total=10, warmup=2)
    assert [round(f(s), 3) for s in (0, 1, 2, 7, 10)] == [0.5, 1.0, 1.0, 0.309, 0.0]
    assert _lr_factor("constant", 10)(9) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        _lr_factor("step", 10)


def test_batch_stats_evaluation_leaves_running_stats_alone() -> None:
    torch.manual_seed(0)
    model = CNN4("bn", head=True)
    model.train()
    model(torch.randn(16, 1, 8, 8))  # move the running statistics away from their init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,))
    _, err = evaluate_batch_stats(model, x, y, batch_size=2)  # last batch of 1 merged into the previous
    assert 0 <= err <= 100
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # untouched
    evaluate(model, x, y)
    assert model.training
    assert has_batch_stats(model) and not has_batch_stats(CNN4("ln+pn"))


def test_divergence_stops_the_run() -> None:
    set_seed(0)
    res = train_classifier(
        CNN4("none"),
        load_synthetic(64, 16),
        TrainConfig(epochs=3, batch_size=16, lr=1e6, schedule="constant"),
    )
    assert res.diverged and res.final["diverged"] and res.steps < 12


def test_a_capped_run_keeps_its_schedule_shape() -> None:
    """``max_steps`` shortens the warm-up with the run: 5 epochs of 8 steps with 1 warm-up epoch capped at
    10 steps warms up for 2 (a fifth), not 8 of its 10; uncapped, the warm-up is the full epoch."""
    cfg = TrainConfig(epochs=5, warmup_epochs=1, max_steps=10)
    assert _run_length(cfg, 8) == (10, 2)
    assert _run_length(TrainConfig(epochs=5, warmup_epochs=1), 8) == (40, 8)
    assert _run_length(TrainConfig(epochs=5, warmup_epochs=1, max_steps=100), 8) == (40, 8)
    factor = _lr_factor("cosine", *_run_length(cfg, 8))
    assert factor(1) == 1.0 and factor(9) < 0.1  # past the warm-up by step 2, then the cosine to its end


def test_max_steps_caps_the_run() -> None:
    set_seed(0)
    res = train_classifier(
        CNN4("gn:8"), load_synthetic(64, 16), TrainConfig(epochs=5, batch_size=8, max_steps=3)
    )
    assert res.steps == 3 and len(res.history) == 1


def test_an_exploding_loss_counts_as_diverged_where_it_first_exceeds_the_limit() -> None:
    import math

    data = load_dataset("digits", limit_train=128, limit_test=32)
    cfg = dict(epochs=2, batch_size=8, lr=20.0, momentum=0.9, seed=0, eval_batch_stats=False)
    # oracle: the same seeded run without the limit, its batch losses as they come
    losses: list[float] = []
    set_seed(0)
    free = train_classifier(
        CNN4("gn:8"), data, TrainConfig(**cfg), on_step=lambda step, loss: losses.append(loss)
    )
    limit = 100.0 * max(free.first_loss, math.log(10))
    first_bad = next((j for j, loss in enumerate(losses) if not math.isfinite(loss) or loss > limit), None)
    if first_bad is None and free.diverged:
        first_bad = len(losses)  # the unguarded run met a non-finite loss at the batch after its last step
    assert first_bad is not None, "LR 20 should blow this net up; pick a larger one if the maths changed"
    set_seed(0)
    guarded = train_classifier(CNN4("gn:8"), data, TrainConfig(**cfg, diverge_factor=100.0))
    assert guarded.diverged and guarded.steps == first_bad and guarded.final["diverged"]
