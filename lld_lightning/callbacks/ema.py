"""Exponential moving averages of weights: `WeightEma` for evaluation and export, `ema_copy` for the
`PseudoLabeller`'s teacher. Both average through `ema_update`, the one implementation of the step.

`WeightEma` builds on Lightning's `WeightAveraging` callback, which does the bookkeeping:
validation runs on the averaged weights (swapped in, then back out), every checkpoint stores them
as its ``state_dict`` (the training weights go under ``current_model_state``, so a resumed fit
continues from those), and when training ends the model holds the average. So `lld test` and
`lld predict` on any checkpoint of the run, and the test that follows a fit, all use the averaged
weights.

What `WeightEma` adds is the decay schedule. A fixed decay keeps ``decay ** s`` of the random
initialisation after ``s`` steps (0.999 keeps half of it after 700 steps), which ruins short runs.
Here the decay at optimizer step ``s`` is ``decay * (1 - exp(-s / ramp_steps))``: the average
follows the model closely at first and averages over about ``1 / (1 - decay)`` steps once ``s`` is
several times ``ramp_steps``. The schedule reads ``trainer.global_step``, so a resumed run
continues it. Switch it on for a fit with::

    lld fit --config configs/txl.yaml \\
        --trainer.callbacks+=lld_lightning.callbacks.ema.WeightEma --trainer.callbacks.decay 0.9998

The teacher needs no ramp: it starts as an exact copy of the student when pseudo-labelling begins,
so it holds no random initialisation to forget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

#: `AveragedModel`'s ``multi_avg_fn``: ``(averaged tensors, current tensors, updates so far)``.
MultiAvgFn = Callable[[list[Tensor], list[Tensor], Tensor], None]


@torch.no_grad()
def ema_update(averaged: list[Tensor], current: list[Tensor], decay: float) -> None:
    """One EMA step, in place: ``averaged = decay * averaged + (1 - decay) * current``.

    Args:
        averaged: the averaged tensors, one device and dtype (as `AveragedModel` groups them).
        current: the model's tensors, in the same order.
        decay: the share of the average kept, in ``[0, 1]``.
    """
    if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
        torch._foreach_lerp_(averaged, current, 1.0 - decay)
    else:  # integer buffers (BatchNorm's num_batches_tracked) count, they do not average
        torch._foreach_copy_(averaged, current)


def ema_avg_fn(decay: float | Callable[[], float]) -> MultiAvgFn:
    """The ``multi_avg_fn`` of an `AveragedModel` that applies `ema_update`.

    Args:
        decay: a fixed decay, or a function returning the decay of the next update.
    """
    decay_now = decay if callable(decay) else lambda: decay

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        ema_update(averaged, current, decay_now())

    return update


def ema_copy(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen EMA copy of ``model`` (parameters and buffers), in eval mode.

    The first ``update_parameters(model)`` copies the model; every later one is an `ema_update`
    with ``decay``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    average = AveragedModel(model, multi_avg_fn=ema_avg_fn(decay), use_buffers=True)
    average.requires_grad_(False)
    return average.eval()


class WeightEma(WeightAveraging):
    """EMA of every parameter and buffer of the LightningModule, ramped in over the first steps.

    Args:
        decay: the decay once the ramp is over (about ``1 / (1 - decay)`` steps of memory).
        ramp_steps: optimizer steps over which the decay rises from 0 towards ``decay``; 0 = ``decay`` from the first step.
        device: where the average lives (default: the model's device).
    """

    def __init__(
        self, decay: float = 0.9998, ramp_steps: float = 2000.0, device: str | None = None
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.decay = decay
        self.ramp_steps = ramp_steps
        self._step = 0
        #: The `AveragedModel` update: `ema_update` at the decay of the current step.
        self.multi_avg_fn = ema_avg_fn(lambda: self.decay_at(self._step))
        super().__init__(device=device, use_buffers=True, multi_avg_fn=self.multi_avg_fn)

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step ``step``."""
        if self.ramp_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-step / self.ramp_steps))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        # Nothing to keep: the schedule reads trainer.global_step, and after a resume the
        # parent's "last updated at step" guard restarts at 0, which only lets the next step
        # update. An empty state also keeps `lld test --ckpt_path` (which has no WeightEma)
        # from warning that the checkpoint was made with a callback it lacks.
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "latest_update_step" in state_dict:  # a checkpoint of Lightning's own callback
            super().load_state_dict(state_dict)
