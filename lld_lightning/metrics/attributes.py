"""Per-attribute accuracy and macro-F1 of the cells the detector found."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.metrics.matching import UNMATCHED, match_detections

#: Value reported for a metric that has no data (no NaN anywhere), as torchmetrics does for AP.
UNDEFINED_METRIC: float = -1.0


class AttributeMetrics(Metric):
    """Attribute accuracy and macro-F1 over ground-truth cells matched to a detection.

    Each ground-truth cell is matched to at most one detection with `match_detections`
    (greedy by descending score, class-agnostic, IoU >= ``iou_threshold``). For every matched
    cell and every attribute whose ground-truth value is not ``IGNORE_INDEX``, the pair
    (true value, predicted value of the matched detection) enters that attribute's confusion
    matrix. Unmatched cells are left out of the attribute metrics and only lower
    ``matched_fraction``.

    ``compute()`` returns float tensors:

    - ``<name>/accuracy``: trace / total of the attribute's confusion matrix;
    - ``<name>/f1``: macro-F1 over the attribute's values that occur in the targets *or* the
      predictions of matched cells (a value never seen on either side has an undefined F1 and is
      left out rather than counted as 0 or 1);
    - ``mean_accuracy``, ``mean_f1``: means over the attributes that have at least one valid
      matched value;
    - ``matched_fraction``: matched ground-truth cells / all ground-truth cells.

    Any of these without data (an attribute with no valid matched value, no attribute with data,
    no ground-truth cell) is `UNDEFINED_METRIC` (-1), never NaN, and is excluded from the means.

    Args:
        attribute_spec: ``{name: number of values}``, in the column order of ``attributes``.
        iou_threshold: minimum IoU for a detection to match a cell.
        score_threshold: detections below this score are not matched (0 keeps all).
        **kwargs: passed to `torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor
    matched_cells: Tensor
    total_cells: Tensor

    def __init__(
        self,
        attribute_spec: dict[str, int],
        iou_threshold: float = 0.5,
        score_threshold: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not attribute_spec:
            raise ValueError("AttributeMetrics needs a non-empty attribute_spec")
        if any(k < 2 for k in attribute_spec.values()):
            raise ValueError(f"every attribute needs >= 2 values, got {attribute_spec}")
        self.attribute_names = list(attribute_spec)
        self.num_values = torch.tensor(list(attribute_spec.values()), dtype=torch.int64)
        self.max_values = int(self.num_values.max())
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        num_attributes = len(self.attribute_names)
        # [A, K, K], rows = true value, columns = predicted value; padded to the largest K.
        self.add_state(
            "confusion",
            torch.zeros((num_attributes, self.max_values, self.max_values), dtype=torch.int64),
            dist_reduce_fx="sum",
        )
        self.add_state("matched_cells", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total_cells", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Match each image's detections to its cells and accumulate the confusion matrices.

        Args:
            preds: per image ``boxes`` float ``[N, 4]`` xyxy, ``scores`` ``[N]``,
                ``attributes`` int64 ``[N, A]`` predicted values.
            targets: per image ``boxes`` float ``[M, 4]`` xyxy, ``attributes`` int64 ``[M, A]``
                with ``IGNORE_INDEX`` where missing.
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        true_rows, pred_rows = [], []
        for pred, target in zip(preds, targets, strict=True):
            keep = pred["scores"] >= self.score_threshold
            matched = match_detections(
                pred["boxes"][keep], pred["scores"][keep], target["boxes"], self.iou_threshold
            )
            found = matched != UNMATCHED
            self.total_cells += matched.numel()
            self.matched_cells += found.sum()
            true_rows.append(target["attributes"][found])
            pred_rows.append(pred["attributes"][keep][matched[found]])
        if not true_rows:
            return
        self._accumulate(torch.cat(true_rows), torch.cat(pred_rows))

    def _accumulate(self, true: Tensor, pred: Tensor) -> None:
        """Add ``true``/``pred`` int64 ``[K, A]`` value pairs of matched cells to ``confusion``."""
        num_attributes = len(self.attribute_names)
        for rows, side in ((true, "target"), (pred, "prediction")):
            if rows.ndim != 2 or rows.shape[1] != num_attributes:
                raise ValueError(
                    f"{side} attributes must be [N, {num_attributes}], got {tuple(rows.shape)}"
                )
        num_values = self.num_values.to(true.device)
        valid = true != IGNORE_INDEX  # [K, A]
        bad_true = valid & ((true < 0) | (true >= num_values))
        bad_pred = valid & ((pred < 0) | (pred >= num_values))
        for bad, side in ((bad_true, "target"), (bad_pred, "predicted")):
            if bad.any():
                name = self.attribute_names[int(bad.any(dim=0).nonzero()[0])]
                raise ValueError(f"{side} value of attribute {name!r} out of range")
        attr_idx = torch.arange(num_attributes, device=true.device).expand_as(true)
        flat = (attr_idx * self.max_values + true) * self.max_values + pred  # [K, A]
        counts = torch.bincount(flat[valid], minlength=self.confusion.numel())
        self.confusion += counts.view_as(self.confusion)

    def confusion_matrices(self) -> dict[str, Tensor]:
        """Each attribute's confusion matrix, synced over ranks like ``compute()``.

        Returns:
            ``{name: int64 [K, K]}`` with rows = true value and columns = predicted value, ``K``
            that attribute's number of values.
        """
        # Every rank must call this in the same order: the sync is a collective call.
        with self.sync_context(should_unsync=True):
            confusion = self.confusion.detach().cpu().clone()
        return {
            name: confusion[i, :k, :k]
            for i, (name, k) in enumerate(zip(self.attribute_names, self.num_values.tolist(), strict=True))
        }

    def compute(self) -> dict[str, Tensor]:
        """The metrics described in the class docstring, as float scalar tensors."""
        confusion = self.confusion.double()
        tp = confusion.diagonal(dim1=1, dim2=2)  # [A, K]
        per_true, per_pred = confusion.sum(dim=2), confusion.sum(dim=1)  # [A, K] each
        present = (per_true + per_pred) > 0  # values seen in targets or predictions
        f1_per_value = 2 * tp / (per_true + per_pred).clamp(min=1)  # 2TP / (2TP + FP + FN)
        f1 = (f1_per_value * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)  # [A]
        total = per_true.sum(dim=1)  # [A]
        accuracy = tp.sum(dim=1) / total.clamp(min=1)
        has_data = total > 0
        undefined = torch.tensor(UNDEFINED_METRIC, dtype=torch.float64, device=confusion.device)
        accuracy = torch.where(has_data, accuracy, undefined)
        f1 = torch.where(has_data, f1, undefined)

        results: dict[str, Tensor] = {}
        for i, name in enumerate(self.attribute_names):
            results[f"{name}/accuracy"] = accuracy[i].float()
            results[f"{name}/f1"] = f1[i].float()
        if has_data.any():
            results["mean_accuracy"] = accuracy[has_data].mean().float()
            results["mean_f1"] = f1[has_data].mean().float()
        else:
            results["mean_accuracy"] = undefined.float()
            results["mean_f1"] = undefined.float()
        if self.total_cells > 0:
            results["matched_fraction"] = (self.matched_cells / self.total_cells).float()
        else:
            results["matched_fraction"] = undefined.float()
        return results
