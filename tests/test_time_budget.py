"""`TimeBudget`: the run's step count and LR schedule follow the measured speed (fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

import lld_lightning.callbacks.time_budget as time_budget
from lld_lightning.callbacks.time_budget import TimeBudget
from lld_lightning.cli import main
from tests.conftest import REPO


class FakeClock:
    """One second per reading: the budget is counted in clock readings, not in real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _fit_with_budget(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    minutes: str,
    calibration_steps: str,
    *args: str,
    budget_args: tuple[str, ...] = (),
):
    """A tiny fit with a `TimeBudget` (``update_every`` 2) on the fake clock; ``args`` are extra
    CLI arguments, given before the callback, ``budget_args`` more of the callback's own."""
    monkeypatch.setattr(time_budget, "_clock", FakeClock())
    monkeypatch.chdir(tmp_path)
    return main([
        "fit",
        "--config", str(REPO / "configs" / "tiny.yaml"),
        "--data.synthetic.dir", str(tmp_path / "data"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        *args,
        "--trainer.callbacks+=lld_lightning.callbacks.time_budget.TimeBudget",
        "--trainer.callbacks.minutes", minutes,
        "--trainer.callbacks.calibration_steps", calibration_steps,
        "--trainer.callbacks.update_every", "2",
        *budget_args,
    ])


@pytest.mark.parametrize(
    ("reserve", "steps"),
    [("0", 12), ("4", 8)],  # final_validation_s: seconds kept for the final validation
)
def test_budget_sets_steps_and_schedule_and_validates_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reserve: str, steps: int
) -> None:
    cli = _fit_with_budget(
        tmp_path,
        monkeypatch,
        "0.2",  # minutes: 12 clock readings
        "2",  # calibration steps
        "--trainer.max_epochs", "1",  # lifted by the budget
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.val_check_interval", "1000",  # only the budget's final validation
        budget_args=("--trainer.callbacks.final_validation_s", reserve),
    )
    budget = next(c for c in cli.trainer.callbacks if isinstance(c, TimeBudget))
    # One reading at train start and one per step: 12 s at 1 s per step, whatever max_epochs
    # said, less the seconds kept for the final validation (none has been timed before it).
    assert budget.planned_steps == steps
    assert cli.trainer.global_step == budget.planned_steps
    assert cli.trainer.max_steps == -1  # stopped through trainer.should_stop, max_steps untouched
    assert cli.model._schedule_steps == budget.planned_steps
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    hparams = cli.model.hparams
    assert lr == pytest.approx(hparams.lr * hparams.min_lr_ratio, rel=0.05)  # cosine ran out
    assert "val/map_50" in cli.trainer.callback_metrics  # the final weights were validated
    summary = budget.summary()
    assert summary["planned_steps"] == steps
    # The final validation is the only one: two clock readings apart, counted in the summary.
    assert summary["validations"] == 1 and summary["validation_s"] == 1.0


def test_a_step_limit_of_the_users_caps_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _fit_with_budget(tmp_path, monkeypatch, "0.2", "2", "--trainer.max_steps", "5")
    budget = next(c for c in cli.trainer.callbacks if isinstance(c, TimeBudget))
    assert budget.planned_steps == cli.trainer.global_step == cli.model._schedule_steps == 5


def test_budget_stops_before_calibration_when_time_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _fit_with_budget(tmp_path, monkeypatch, "0.05", "100")  # 3 readings, calibration never reached
    assert 2 <= cli.trainer.global_step <= 4


@pytest.mark.parametrize(
    "kwargs",
    [{"minutes": 0}, {"minutes": 1, "update_every": 0}, {"minutes": 1, "final_validation_s": -1}],
)
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TimeBudget(**kwargs)


def test_the_final_validation_is_kept_inside_the_budget() -> None:
    budget = TimeBudget(minutes=1.0, calibration_steps=10)
    budget.start, budget.mark = 0.0, (10, 10.0)  # 1 s per step since step 10
    assert budget._plan(20, 20.0) == 60  # 40 s left: 40 more steps
    budget.validation_s = 5.0  # the last validation took 5 s; the final one will too
    assert budget._plan(20, 20.0) == 55
    assert budget._plan(20, 59.0) == 20  # no time left: stop now


def test_a_reserve_stands_in_for_the_final_validation_until_one_is_timed() -> None:
    budget = TimeBudget(minutes=1.0, calibration_steps=10, final_validation_s=8.0)
    budget.start, budget.mark = 0.0, (10, 10.0)  # 1 s per step since step 10
    budget.validation_s = budget.final_validation_s  # as on_train_start leaves it
    assert budget._plan(20, 20.0) == 52  # 40 s left, 8 of them kept for the final validation
    budget.validation_s = 3.0  # a validation was timed: its duration replaces the reserve
    assert budget._plan(20, 20.0) == 57
