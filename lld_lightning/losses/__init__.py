"""Plain-PyTorch losses (no Lightning)."""

from lld_lightning.losses.sparse_loss import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS, SparseDetectionLoss

__all__ = ["DEFAULT_LOSS_WEIGHTS", "LOSS_TERMS", "SparseDetectionLoss"]
