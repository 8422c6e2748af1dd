"""Lightning callbacks: run checkpoints, pseudo-labels, weight averaging, a time budget, prediction files."""

from lld_lightning.callbacks.checkpoint import RunCheckpoint
from lld_lightning.callbacks.ema import WeightEma
from lld_lightning.callbacks.predict_writer import PredictionWriter
from lld_lightning.callbacks.pseudo import PseudoLabeller
from lld_lightning.callbacks.time_budget import TimeBudget

__all__ = ["PredictionWriter", "PseudoLabeller", "RunCheckpoint", "TimeBudget", "WeightEma"]
