"""Plain-PyTorch losses (no Lightning)."""

from lld_lightning.losses.sparse_loss import SparseDetectionLoss

__all__ = ["SparseDetectionLoss"]
