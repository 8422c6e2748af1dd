"""`WeightEma` (the weight average used for evaluation and export) and `ema_copy` (the
pseudo-labeller's teacher): one EMA update, two schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lld_lightning.callbacks.ema import WeightEma, ema_avg_fn, ema_copy
from lld_lightning.cli import main
from tests.conftest import REPO


def test_decay_ramps_from_zero_to_the_set_decay() -> None:
    ema = WeightEma(decay=0.99, ramp_steps=100)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(100) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ema.decay_at(10_000) == pytest.approx(0.99)
    assert WeightEma(decay=0.9, ramp_steps=0).decay_at(1) == 0.9
    with pytest.raises(ValueError, match="decay"):
        WeightEma(decay=1.0)


def test_update_is_a_lerp_of_floats_and_a_copy_of_integer_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEma(decay=0.75, ramp_steps=0)
    average = AveragedModel(model, use_buffers=True, multi_avg_fn=ema.multi_avg_fn)
    average.update_parameters(model)  # the first update copies
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    average.update_parameters(model)
    expected = 0.75 * before + 0.25 * model[0].weight.detach()
    assert torch.allclose(average.module[0].weight, expected)
    assert int(average.module[1].num_batches_tracked) == 7


def test_fit_with_ema_checkpoints_the_average_and_ends_holding_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "--config", str(REPO / "configs" / "tiny.yaml"),
        "--data.synthetic.dir", str(tmp_path / "data"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.limit_train_batches", "3",
    ]
    ema = [
        "--trainer.callbacks+=lld_lightning.callbacks.ema.WeightEma",
        "--trainer.callbacks.decay", "0.5", "--trainer.callbacks.ramp_steps", "0",
    ]
    cli = main(["fit", *args, *ema])
    assert sum(isinstance(c, WeightEma) for c in cli.trainer.callbacks) == 1
    last = tmp_path / "run" / "latest" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert average.keys() == current.keys()
    floats = [k for k, v in average.items() if v.is_floating_point()]
    assert any(not torch.equal(average[k], current[k]) for k in floats)
    # After fit the model holds the average that the last checkpoint stored.
    state = cli.model.state_dict()
    assert all(torch.equal(state[k], average[k]) for k in floats)
    # Test, without a WeightEma, reads the checkpoint's average.
    tested = main(["test", *args, "--ckpt_path", str(last)])
    tested_state = tested.model.state_dict()
    assert all(torch.equal(tested_state[k].cpu(), average[k]) for k in floats)
    assert "all/map_50" in tested.model.test_results


def test_the_teacher_copy_is_frozen_and_averages_with_a_fixed_decay() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = ema_copy(model, decay=0.75)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model[0].weight.add_(3.0)
    teacher.update_parameters(model)  # the first update copies the model as it is now
    assert torch.equal(teacher.module[0].weight, model[0].weight)
    before = model[0].weight.detach().clone()
    for _ in range(2):  # the same decay at every step, no ramp
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked.fill_(5)
        teacher.update_parameters(model)
    expected = 0.75**2 * before + 0.75 * 0.25 * (before + 1) + 0.25 * (before + 2)
    torch.testing.assert_close(teacher.module[0].weight, expected)
    assert int(teacher.module[1].num_batches_tracked) == 5
    with pytest.raises(ValueError, match="decay"):
        ema_copy(model, decay=1.5)


def test_a_decay_function_is_read_at_every_update() -> None:
    decays = iter([0.0, 0.5])
    update = ema_avg_fn(lambda: next(decays))
    averaged, current = [torch.zeros(2)], [torch.ones(2)]
    update(averaged, current, torch.tensor(1))
    torch.testing.assert_close(averaged[0], torch.ones(2))  # decay 0: the model itself
    update(averaged, [torch.full((2,), 3.0)], torch.tensor(2))
    torch.testing.assert_close(averaged[0], torch.full((2,), 2.0))  # decay 0.5: the midpoint
