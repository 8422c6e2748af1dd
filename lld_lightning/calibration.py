"""Per-class precision of detections by score threshold, and `RegionCalibration`, which keeps the
pseudo-label thresholds at a precision while the teacher's scores drift.

A sparse training image has its cells labelled inside one rectangle. The teacher's detections
there can be scored against those labels like a validation set's, batch after batch, at no extra
forward pass; outside the rectangle (where the pseudo-labels are made) nothing can be scored.
Measured on TXL-PBC (docs/pseudo_labels.md, "Thresholds that follow the scores"), the precision inside
the rectangles moved the same way as the real precision outside them when training on
pseudo-labels raised the teacher's scores, but less far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from lld_lightning.constants import MATCH_IOU
from lld_lightning.metrics.matching import UNMATCHED, match_detections
from lld_lightning.module import keep_inside_regions

#: The thresholds `RegionCalibration` chooses from: 0.30, 0.35, ..., 0.90.
CALIBRATION_GRID: tuple[float, ...] = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))


def threshold_counts(
    pred: dict[str, Tensor], target: dict[str, Tensor], thresholds: list[float], num_classes: int
) -> dict[str, Tensor]:
    """One image's counts at every threshold and class.

    Args:
        pred: ``boxes [N, 4]``, ``scores [N]``, ``labels [N]`` detections.
        target: ``boxes [M, 4]``, ``labels [M]`` the labelled cells.
        thresholds: ``T`` score thresholds (a detection counts when its score is >= one).
        num_classes: ``C``.

    Returns:
        int64 ``detections [T, C]`` (kept detections per class), ``correct [T, C]`` (those matched
        one-to-one to a cell of their class at IoU >= `MATCH_IOU`) and ``cells [C]``.
    """
    # Greedy matching visits detections by descending score, so the matches among the detections
    # at or above a threshold are those of one matching over all of them: match once per class,
    # then count by threshold.
    levels = torch.tensor(thresholds, dtype=torch.float32)[:, None]  # [T, 1]
    detections = torch.zeros((len(thresholds), num_classes), dtype=torch.int64)
    correct = torch.zeros_like(detections)
    labels, gt_labels = pred["labels"].cpu(), target["labels"].cpu()
    boxes, scores, gt_boxes = pred["boxes"].cpu().float(), pred["scores"].cpu().float(), target["boxes"].cpu()
    for c in range(num_classes):
        mine = labels == c
        matched = match_detections(boxes[mine], scores[mine], gt_boxes[gt_labels == c], MATCH_IOU)
        hit_scores = scores[mine][matched[matched != UNMATCHED]]
        detections[:, c] = (scores[mine][None] >= levels).sum(dim=1)
        correct[:, c] = (hit_scores[None] >= levels).sum(dim=1)
    return {
        "detections": detections,
        "correct": correct,
        "cells": torch.bincount(gt_labels, minlength=num_classes)[:num_classes],
    }


def one_class_per_cell(preds: list[dict[str, Tensor]], nms_iou: float) -> list[dict[str, Tensor]]:
    """Class-agnostic NMS inside each image, as the pseudo-labeller keeps its detections."""
    kept = [
        batched_nms(p["boxes"].float(), p["scores"].float(), torch.zeros_like(p["labels"]), nms_iou)
        for p in preds
    ]
    return [{key: value[k] for key, value in p.items()} for p, k in zip(preds, kept, strict=True)]


def region_counts(
    preds: list[dict[str, Tensor]],
    targets: list[dict[str, Tensor]],
    thresholds: list[float],
    num_classes: int,
) -> dict[str, Tensor]:
    """`threshold_counts` of a batch: detections centred inside their image's ``regions``
    against its labelled cells, matched in one pass over the batch.

    Each image's boxes are shifted along x by more than every box's extent (the coordinate trick
    of torchvision's ``batched_nms``), so no box overlaps another image's and the one greedy
    matching over the batch is exactly the per-image matchings together.

    Args:
        preds: per image ``boxes``, ``scores``, ``labels``.
        targets: per image ``boxes``, ``labels`` and ``regions [R, 4]`` (`unbatch_targets`).
    """
    preds = keep_inside_regions(preds, targets)
    every = torch.cat([item["boxes"].float() for item in [*preds, *targets]])
    span = float(every.max() - every.min()) + 1.0 if every.numel() else 1.0

    def batch_of(items: list[dict[str, Tensor]], keys: tuple[str, ...]) -> dict[str, Tensor]:
        joined = {key: torch.cat([item[key] for item in items]) for key in (*keys, "boxes")}
        sizes = torch.tensor([len(item["boxes"]) for item in items])
        shift = torch.repeat_interleave(torch.arange(len(items)) * span, sizes).to(joined["boxes"].device)
        joined["boxes"] = joined["boxes"].float() + shift[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0],
                                                                                   device=shift.device)
        return joined

    return threshold_counts(
        batch_of(preds, ("scores", "labels")), batch_of(targets, ("labels",)), thresholds, num_classes
    )


def suggest(
    precision: Tensor, detections: Tensor, thresholds: list[float], target: float, names: list[str]
) -> dict[str, float]:
    """Per class, the lowest threshold whose precision reaches ``target`` (classes without one
    are left out). ``precision``/``detections``: ``[T, C]``, thresholds ascending."""
    chosen = {}
    for c, name in enumerate(names):
        for t, threshold in enumerate(thresholds):
            if detections[t, c] > 0 and precision[t, c] >= target:
                chosen[name] = threshold
                break
    return chosen



class RegionCalibration:
    """Per-class score thresholds at a target precision, measured inside the labelled regions.

    Each `update` adds one batch's `threshold_counts` (the teacher's detections inside the
    regions against the expert cells there, at every ``grid`` threshold); older batches fade by
    ``1 - 1 / memory`` per update, so the estimate follows the teacher as it changes. A class's
    threshold is the lowest grid value whose precision reaches ``precision``, the grid's top when
    none does, and its ``fallback`` until the class has ``min_detections`` (faded) detections at
    the grid's lowest threshold.

    Args:
        num_classes: ``C``.
        precision: target precision inside the regions.
        grid: ascending candidate thresholds.
        memory: about how many updates (batches) the counts remember.
        min_detections: evidence a class needs before its threshold is calibrated.
    """

    def __init__(
        self,
        num_classes: int,
        precision: float = 0.9,
        grid: Sequence[float] = CALIBRATION_GRID,
        memory: float = 250.0,
        min_detections: float = 20.0,
    ) -> None:
        grid = [float(t) for t in grid]
        if not grid or any(b <= a for a, b in zip(grid, grid[1:], strict=False)):
            raise ValueError(f"grid must be non-empty and ascending, got {grid}")
        if not 0.0 < precision <= 1.0:
            raise ValueError(f"precision must lie in (0, 1], got {precision}")
        if memory < 1.0:
            raise ValueError(f"memory must be >= 1 update, got {memory}")
        self.grid = grid
        self.precision = float(precision)
        self.decay = 1.0 - 1.0 / float(memory)
        self.min_detections = float(min_detections)
        self.detections = torch.zeros((len(grid), num_classes), dtype=torch.float64)
        self.correct = torch.zeros_like(self.detections)

    def update(self, detections: Tensor, correct: Tensor) -> None:
        """Fade the counts, then add ``detections``/``correct`` ``[T, C]`` of one batch."""
        self.detections = self.detections * self.decay + detections.detach().cpu().double()
        self.correct = self.correct * self.decay + correct.detach().cpu().double()

    def thresholds(self, fallback: Tensor) -> Tensor:
        """Float ``[C]`` thresholds (``fallback [C]`` where a class lacks evidence)."""
        precision = self.correct / self.detections.clamp(min=1e-12)
        reached = (self.detections > 0) & (precision >= self.precision)  # [T, C]
        first = reached.int().argmax(dim=0)  # the lowest reaching threshold (0 when none does)
        grid = torch.tensor(self.grid, dtype=torch.float32)
        chosen = torch.where(reached.any(dim=0), grid[first], grid[-1])
        known = self.detections[0] >= self.min_detections
        return torch.where(known, chosen, fallback.detach().cpu().float()).to(fallback.device)

    def state_dict(self) -> dict[str, Any]:
        return {"detections": self.detections.clone(), "correct": self.correct.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["detections"].shape) != tuple(self.detections.shape):
            raise ValueError(
                f"calibration counts of shape {tuple(state['detections'].shape)} do not fit "
                f"{len(self.grid)} thresholds x {self.detections.shape[1]} classes"
            )
        self.detections = state["detections"].double().cpu()
        self.correct = state["correct"].double().cpu()
