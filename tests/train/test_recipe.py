"""Schedules by elapsed fraction, EMA, class weights: exact values."""

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from capsmed.train.recipe import (
    CLOCK_SLACK,
    ModelEMA,
    balanced_class_weights,
    lr_factor,
    training_progress,
)


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [("none", 0.7, 1.0), ("cosine", 0.0, 1.0), ("cosine", 0.5, 0.5), ("cosine", 1.0, 0.0),
     ("cosine", 0.25, (1 + math.cos(math.pi / 4)) / 2), ("poly", 0.5, 0.5**0.9),
     ("poly", 1.0, 0.0), ("step", 0.3, 1.0), ("step", 0.34, 0.1), ("step", 0.9, 0.01),
     ("step", 1.0, 0.01)],
)
def test_lr_factor_values(schedule, progress, expected):
    assert lr_factor(schedule, progress) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_errors():
    with pytest.raises(ValueError, match="schedule must be one of none, cosine, poly, step"):
        lr_factor("linear", 0.5)
    with pytest.raises(ValueError, match="progress must lie in"):
        lr_factor("cosine", 1.5)


def test_training_progress_is_the_larger_fraction():
    assert CLOCK_SLACK == 0.02
    assert training_progress(10, 100, 0.0, None) == 0.1
    assert training_progress(10, 100, 1e9, None) == 0.1  # no budget: steps alone
    # 30.6 s of a minute: t = 0.51, (0.51 - 0.02) / 0.98 = 0.5
    assert training_progress(10, 100, 30.6, 1.0) == pytest.approx(0.5, abs=1e-12)
    assert training_progress(90, 100, 30.6, 1.0) == 0.9
    assert training_progress(10, 100, 60.0, 1.0) == 1.0  # the budget spent ends the schedule
    assert training_progress(10, 100, 600.0, 1.0) == 1.0  # clipped


def test_training_progress_ignores_the_clock_inside_its_slack():
    """The first batches' timing never moves the schedule: the step count alone sets it."""
    assert training_progress(0, 100, 1.2, 1.0) == 0.0  # t = 0.02 exactly
    assert training_progress(0, 100, 0.9, 1.0) == 0.0
    assert training_progress(5, 100, 1.0, 1.0) == 0.05
    # just past the slack the clock takes over, continuously from 0
    assert training_progress(0, 100, 1.8, 1.0) == pytest.approx(0.01 / 0.98, abs=1e-12)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        training_progress(0, 0, 0.0, None)
    with pytest.raises(ValueError, match="max_minutes must be > 0"):
        training_progress(0, 10, 0.0, 0.0)


def test_ema_warm_up_and_average():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.99)
    assert isinstance(ema, AveragedModel) and ema.steps == 0
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)
    d1 = ema.current_decay()
    assert d1 == pytest.approx(2 / 11)  # min(0.99, (1 + 1) / (10 + 1))
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, d1 * start + (1 - d1) * (start + 1.0))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), 5.0))  # copied
    assert ema.steps == 1 and ema.current_decay() == pytest.approx(3 / 12)
    ema.n_averaged.fill_(10_001)
    assert ema.current_decay() == 0.99
    copy = ModelEMA(model, decay=0.99)
    copy.load_state_dict(ema.state_dict())
    assert copy.steps == 10_000 and "n_averaged" in ema.state_dict()
    torch.testing.assert_close(copy.module[0].weight, ema.module[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match=r"EMA decay must lie in \(0, 1\)"):
        ModelEMA(model, 1.0)


def test_ema_equals_the_warmed_up_lerp_bit_for_bit():
    """The AveragedModel average is the earlier hand-written one: the same lerp at the same decay
    per step, starting from the initial weights, so trained runs keep their exact numbers."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    ema = ModelEMA(model, decay=0.9)
    reference = [p.detach().clone() for p in model.parameters()]
    for t in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 1, 5, 5))  # training mode: batch-norm statistics move
        ema.update_parameters(model)
        d = min(0.9, (1 + t) / (10 + t))
        for avg, new in zip(reference, model.parameters(), strict=True):
            avg.lerp_(new.detach(), 1.0 - d)
    for avg, ref in zip(ema.module.parameters(), reference, strict=True):
        assert torch.equal(avg, ref)
    for avg, new in zip(ema.module.buffers(), model.buffers(), strict=True):
        assert torch.equal(avg, new)  # statistics copied, not averaged


def test_balanced_class_weights():
    torch.testing.assert_close(balanced_class_weights([0, 0, 0, 1], 2),
                               torch.tensor([4 / 6, 2.0]))
    torch.testing.assert_close(balanced_class_weights([0, 2, 2, 2], 3),
                               torch.tensor([4 / 3, 0.0, 4 / 9]))  # class 1 absent: weight 0
    with pytest.raises(ValueError, match="empty training set"):
        balanced_class_weights([], 2)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        balanced_class_weights([0, 3], 2)
