"""`WeightEma` and `LldModule(ema_decay=...)`: the weight average used for evaluation and export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lld_lightning.cli import main
from lld_lightning.ema import WeightEma
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
    average = AveragedModel(model, use_buffers=True, multi_avg_fn=ema._update)
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
        "--data.synthetic_dir", str(tmp_path / "data"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.limit_train_batches", "3",
        "--model.ema_decay", "0.5", "--model.ema_ramp_steps", "0",
    ]
    cli = main(["fit", *args])
    assert sum(isinstance(c, WeightEma) for c in cli.trainer.callbacks) == 1
    checkpoint = torch.load(tmp_path / "runs/tiny/checkpoints/last.ckpt", map_location="cpu",
                            weights_only=False)
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert average.keys() == current.keys()
    floats = [k for k, v in average.items() if v.is_floating_point()]
    assert any(not torch.equal(average[k], current[k]) for k in floats)
    # After fit the model holds the average that the last checkpoint stored.
    state = cli.model.state_dict()
    assert all(torch.equal(state[k], average[k]) for k in floats)
    # Test reads the checkpoint's average; no WeightEma outside fitting.
    tested = main(["test", *args, "--ckpt_path", str(tmp_path / "runs/tiny/checkpoints/last.ckpt")])
    assert not any(isinstance(c, WeightEma) for c in tested.trainer.callbacks)
    assert "all/map_50" in tested.model.test_results
