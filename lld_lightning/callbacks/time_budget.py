"""Train for a wall-clock budget: the step count (and so the LR schedule) follows the measured speed.

``trainer.max_time`` stops a run when time is up, wherever the learning-rate schedule happens to
be: a cosine schedule sized for ``max_epochs`` is then cut off at a high learning rate, or ends
long before the time is used. `TimeBudget` instead measures the seconds per optimizer step
(validation pauses included) and sets the run's step count to what fits into the budget
(keeping the time of the last validation for the final one),
re-estimating as it goes, so warm-up, cosine decay and the last validation all land inside it.
This is what a fixed-time comparison (e.g. "4 minutes on one GPU") needs::

    lld fit --config configs/txl.yaml \\
        --trainer.callbacks+=lld_lightning.callbacks.time_budget.TimeBudget \\
        --trainer.callbacks.minutes=4

The budget counts from the start of the first training step's epoch (after the sanity check),
as the time of a training run, not of process start-up and imports. It owns the length of
training: ``max_epochs`` is lifted, and the run stops through ``trainer.should_stop`` at the
planned step, after one more validation. ``max_steps``, when set, still caps the run (and the
plan). The learning-rate horizon follows through ``LldModule.set_schedule_steps``. Under DDP
rank 0 decides and broadcasts, so every rank stops at the same step. A resumed run gets a fresh
budget.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

#: The clock the budget is measured with (tests replace it).
_clock = time.perf_counter

#: Provisional schedule length before the first estimate: large, so only warm-up runs until then.
PROVISIONAL_STEPS: int = 10**7


class TimeBudget(Callback):
    """Fit as many optimizer steps as ``minutes`` of training allow, schedule included.

    Args:
        minutes: the training budget (validation during training counts against it).
        calibration_steps: steps before the speed is measured (the first pay for warm-ups and start-up).
        update_every: under DDP, re-estimate the step count (a broadcast) every this many steps.
        final_validation_s: seconds kept for the final validation until one has been timed.
    """

    def __init__(
        self,
        minutes: float,
        calibration_steps: int = 30,
        update_every: int = 20,
        final_validation_s: float = 0.0,
    ) -> None:
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        if calibration_steps < 1 or update_every < 1:
            raise ValueError("calibration_steps and update_every must be >= 1")
        if final_validation_s < 0:
            raise ValueError(f"final_validation_s must be >= 0, got {final_validation_s}")
        self.budget_s = 60.0 * minutes
        self.final_validation_s = final_validation_s
        self.calibration_steps = calibration_steps
        self.update_every = update_every
        self.start: float | None = None
        self.mark: tuple[int, float] | None = None  # (step, time) where measuring began
        self.planned_steps: int | None = None
        self.elapsed_s: float = 0.0
        self.validation_s = (
            final_validation_s  # the last validation's duration, kept for the final one
        )
        self.validation_total_s: float = 0.0  # every validation inside the budget, summed
        self.validations: int = 0
        self._validation_start: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start, self.mark, self.planned_steps = _clock(), None, None
        self.validation_s, self.validation_total_s = self.final_validation_s, 0.0
        self.validations = 0
        # After configure_optimizers (which sized the schedule from the trainer's limits): the
        # budget, not an epoch count, ends the run, and only warm-up runs until the first plan.
        trainer.fit_loop.max_epochs = -1
        _set_schedule_steps(pl_module, PROVISIONAL_STEPS)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start is not None and not trainer.sanity_checking:
            self._validation_start = _clock()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_start is not None:
            self.validation_s = _clock() - self._validation_start
            self.validation_total_s += self.validation_s
            self.validations += 1
            self._validation_start = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.start is None:
            return
        step = int(trainer.global_step)
        if self.planned_steps is not None and step >= self.planned_steps:
            trainer.should_stop = True  # the same step on every rank: validate once more, stop
            return
        now = _clock()
        if self.mark is None and step >= self.calibration_steps:
            self.mark = (step, now)
        if step % self.update_every and trainer.world_size > 1:
            return  # ranks agree through a broadcast, so only every update_every steps
        planned = self._plan(step, now)
        planned = trainer.strategy.broadcast(planned, src=0)  # rank 0's clock decides
        if planned is None:
            return
        if trainer.max_steps > 0:  # a step limit of the user's still ends the run first
            planned = min(planned, trainer.max_steps)
        self.planned_steps = int(planned)
        _set_schedule_steps(pl_module, self.planned_steps)
        if step >= self.planned_steps:
            trainer.should_stop = True

    def _plan(self, step: int, now: float) -> int | None:
        """Total steps that fit the budget, from the speed since calibration (None: unknown)."""
        assert self.start is not None
        # The run ends with one more validation: keep the time the last one took for it.
        left = self.budget_s - (now - self.start) - self.validation_s
        if self.mark is None or step <= self.mark[0]:
            return step if left <= 0 else None
        seconds_per_step = (now - self.mark[1]) / (step - self.mark[0])
        return step + max(0, int(left / seconds_per_step))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start is None:
            return
        self.elapsed_s = _clock() - self.start
        reserve = (
            f"; {self.final_validation_s:.0f} s kept for the final one until one was timed"
            if self.final_validation_s
            else ""
        )
        rank_zero_info(
            f"[time budget] {trainer.global_step} optimizer steps in {self.elapsed_s:.0f} s "
            f"(budget {self.budget_s:.0f} s; {self.validations} validations took "
            f"{self.validation_total_s:.0f} s of it{reserve})"
        )

    def summary(self) -> dict[str, float]:
        """Steps planned at the last estimate, seconds of training used and the part of them
        spent validating (the final validation included when it ran before training ended)."""
        return {
            "budget_s": self.budget_s,
            "elapsed_s": self.elapsed_s,
            "planned_steps": float(self.planned_steps or 0),
            "validation_s": self.validation_total_s,
            "validations": float(self.validations),
        }


def _set_schedule_steps(pl_module: LightningModule, steps: int) -> None:
    """Move the LR schedule's horizon, where the module has one (`LldModule.set_schedule_steps`)."""
    set_steps = getattr(pl_module, "set_schedule_steps", None)
    if callable(set_steps):
        set_steps(steps)
