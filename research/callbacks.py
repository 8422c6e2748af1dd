"""Callbacks the sparse study adds to its runs (research only, not part of the package)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lld_lightning.callbacks.pseudo import PseudoLabeller
from lld_lightning.callbacks.time_budget import TimeBudget

#: The pseudo-labeller's warm-up until the time budget has a plan: no pseudo-labels yet.
NOT_YET: int = 10**9


class PseudoWarmupFraction(Callback):
    """Start a run's pseudo-labels after ``fraction`` of a `TimeBudget` run's planned steps.

    A time-budgeted run learns its length only as it goes (`TimeBudget.planned_steps`, re-planned
    from the measured speed), so the `PseudoLabeller`'s ``warmup_steps`` is set here before every
    training batch: ``NOT_YET`` until there is a plan, then ``fraction`` of it. Listed before the
    `PseudoLabeller`, whose batch hook reads it.

    Args:
        fraction: share of the planned steps trained on expert labels only, in ``[0, 1)``.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
        self.fraction = fraction

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        budget = next((c for c in trainer.callbacks if isinstance(c, TimeBudget)), None)
        planned = budget.planned_steps if budget is not None else None
        warmup = NOT_YET if planned is None else int(self.fraction * planned)
        for callback in trainer.callbacks:
            if isinstance(callback, PseudoLabeller):
                callback.warmup_steps = warmup
