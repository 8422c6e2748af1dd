"""The sparse multi-task detection loss: classes, boxes, localisation quality and attributes.

Locations are matched to cells by `assign_locations`; every location the assigner marks
``IGNORE`` (outside all annotated regions and not a positive) is dropped before any term is
computed, so it contributes no loss and receives exactly zero gradient. With ``mode="naive"``
nothing is ignored and the unlabelled field of view counts as background (the baseline the
masked loss is compared against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from lld_lightning.boxes import elementwise_iou
from lld_lightning.constants import IGNORE, IGNORE_INDEX
from lld_lightning.models.assign import assign_locations
from lld_lightning.models.box_coding import decode_boxes, encode_boxes

LossMode = Literal["masked", "naive"]
ClsLossName = Literal["focal", "quality_focal"]

#: The named terms `SparseDetectionLoss` returns and weights into the training loss.
LOSS_TERMS: tuple[str, ...] = ("cls", "box", "quality", "dfl", "attributes", "roi_cls", "roi_attributes")

#: The recipe's weights. One cross-entropy per attribute (7 for LLD) summed at weight 1 would
#: dwarf the class term and slow class learning, so both attribute terms take 0.3; the
#: distribution focal loss takes GFL's 0.25 beside its IoU loss at 2.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "cls": 1.0, "box": 2.0, "quality": 1.0, "dfl": 0.25, "attributes": 0.3, "roi_cls": 1.0,
    "roi_attributes": 0.3,
}


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss (Li et al., GFL, 2020): focal BCE with a soft target in ``[0, 1]``.

    ``|y - sigmoid(x)|^beta * BCE(x, y)`` elementwise: the positive class of a positive location
    aims at its box's IoU instead of 1, so the class score itself ranks boxes by how well they
    fit (what mAP@[.5:.95] rewards); every other entry aims at 0 as in the plain focal loss.

    Args:
        logits: float ``[..., C]``.
        targets: float ``[..., C]`` soft targets in ``[0, 1]`` (not differentiated through).

    Returns:
        float ``[..., C]`` per-element losses.
    """
    probability = logits.sigmoid()
    modulation = (targets - probability).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulation


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Distribution focal loss (Li et al., GFL, 2020) of one distance per row.

    A continuous target ``y`` between the bins ``i = floor(y)`` and ``i + 1`` is the mixture
    ``(i + 1 - y) * onehot(i) + (y - i) * onehot(i + 1)``; the loss is the cross-entropy to that
    mixture, which is smallest when the distribution puts its mass on the two neighbouring bins
    in that proportion (its expectation is then ``y``).

    Args:
        logits: float ``[N, n]`` logits over the distances ``0 .. n - 1``.
        targets: float ``[N]`` distances in bin units; clamped to ``[0, n - 1]``.

    Returns:
        float ``[N]`` per-row losses.
    """
    num_bins = logits.shape[-1]
    targets = targets.clamp(min=0.0, max=num_bins - 1)
    left = targets.floor().long().clamp(max=num_bins - 2)
    right_weight = targets - left.float()  # 1 at the top bin: all the mass on the right one
    log_probs = F.log_softmax(logits, dim=-1)
    left_log = log_probs.gather(-1, left[:, None])[:, 0]
    right_log = log_probs.gather(-1, (left + 1)[:, None])[:, 0]
    return -((1.0 - right_weight) * left_log + right_weight * right_log)


def mean_over_ranks(value: Tensor) -> Tensor:
    """Average a tensor across DDP ranks (identity when not distributed).

    Args:
        value: any tensor on this rank's device; not differentiated through.

    Returns:
        The mean over ranks, same shape.
    """
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / dist.get_world_size()
    return value


@dataclass
class _Positives:
    """The positive locations of a batch, flattened to ``[N]`` (one row per location)."""

    image_index: Tensor  # int64 [N]
    point_index: Tensor  # int64 [N]
    cell_index: Tensor  # int64 [N], the cell's column in the batch's boxes
    weight: Tensor  # float [N], the cell's weight
    box_weight: Tensor  # float [N], the cell's weight in the box, dfl and quality terms
    predicted: Tensor  # float [N, 4] decoded xyxy boxes
    target: Tensor  # float [N, 4] the cells' boxes
    iou: Tensor  # float [N] IoU of the two, detached


class SparseDetectionLoss(nn.Module):
    """Focal classification + GIoU box + quality + attribute loss on a sparse-annotation mask.

    Every term is a sum over the locations it concerns divided by
    ``max(1, num_foreground)``, the number of positive locations in the batch averaged over DDP
    ranks (FCOS/torchvision normalisation). `forward` returns the terms unweighted; `total`
    weights them. Everything is computed in float32, also under bf16/fp16 autocast.

    A per-cell weight (``targets["weights"]``, default 1) scales every term at that cell's
    positive locations (classification included); it does not change ``num_foreground``, so a
    weight-0 cell's locations add nothing to any term. What a cell's positives count in
    ``num_foreground`` is its ``targets["normaliser_weights"]`` (default 1): pseudo-labels that
    should add to the expert loss without rescaling it count 0.

    In a config the loss is a component of `LldModule`::

        model:
          loss:
            class_path: lld_lightning.losses.SparseDetectionLoss
            init_args: {cls_loss: quality_focal}

    Args:
        num_classes: number of cell classes ``C`` (given by `LldModule` from the data).
        attribute_spec: ``{name: num_values}`` in the column order of ``targets["attributes"]``
            (given by `LldModule` from the data).
        mode: ``masked`` ignores every location outside the annotated regions; ``naive`` treats
            it as background (the baseline the masked loss is compared against).
        cls_loss: ``focal`` (one-hot targets) or ``quality_focal`` (a positive's class target is
            the IoU of its predicted box, `quality_focal_loss`: the class score then ranks boxes
            by fit, which mAP@[.5:.95] rewards).
        weights: weight of each named term (`LOSS_TERMS`); missing names keep
            `DEFAULT_LOSS_WEIGHTS`.
        focal_alpha: focal-loss weight of positives.
        focal_gamma: focal-loss focusing exponent.
        center_radius: centre-sampling radius of the assigner, in strides.
    """

    def __init__(
        self,
        num_classes: int,
        attribute_spec: dict[str, int],
        mode: LossMode = "masked",
        cls_loss: ClsLossName = "focal",
        weights: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        center_radius: float = 1.5,
    ) -> None:
        super().__init__()
        if mode not in ("masked", "naive"):
            raise ValueError(f"mode must be 'masked' or 'naive', got {mode!r}")
        if cls_loss not in ("focal", "quality_focal"):
            raise ValueError(f"cls_loss must be 'focal' or 'quality_focal', got {cls_loss!r}")
        weights = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        self.num_classes = num_classes
        self.attribute_spec = dict(attribute_spec)
        self.mode = mode
        self.cls_loss = cls_loss
        self.weights = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.center_radius = center_radius

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """The training loss: the weighted sum of the named terms."""
        return sum(self.weights[name] * terms[name] for name in LOSS_TERMS)

    def forward(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Compute the named loss terms.

        Args:
            outputs: the detector output (`Detector`): ``cls_logits [B, P, C]``,
                ``box_deltas [B, P, 4]`` (stride units), ``box_distribution [B, P, 4, n]``,
                ``quality_logits [B, P]``, ``attr_logits {name: [B, P, K]}``, ``points [P, 2]``,
                ``strides [P]``; with a region read-out ``roi`` also holds ``image_index`` and
                ``cell_index`` int64 ``[N]``: the expert cell of each read-out box.
            targets: batch keys (`lld_lightning.data.sample.Batch`): ``boxes`` float
                ``[B, M, 4]`` xyxy pixels, ``labels`` int64 ``[B, M]`` (``IGNORE_INDEX`` =
                padding), ``attributes`` int64 ``[B, M, A]`` (``IGNORE_INDEX`` = missing),
                ``regions`` float ``[B, R, 4]``, ``region_valid`` bool ``[B, R]``; optional
                ``weights``, ``box_weights`` (replaces ``weights`` in the box, dfl and quality
                terms), ``normaliser_weights`` float ``[B, M]``.

        Returns:
            Scalar float32 tensors, one per `LOSS_TERMS` entry (``roi_*`` are 0 without
            ``outputs["roi"]``), and, detached for logging, ``num_foreground`` (positives in the
            batch, mean over ranks) and ``supervised_fraction`` (the share of this rank's
            locations that carry a classification loss).
        """
        device_type = outputs["cls_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._terms(outputs, targets)

    def _terms(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        device = outputs["cls_logits"].device
        gt_boxes, labels, attributes, weights = _cell_targets(targets, device)
        if attributes.shape[2] != len(self.attribute_spec):
            raise ValueError(
                f"targets['attributes'] has {attributes.shape[2]} columns but the attribute spec "
                f"names {len(self.attribute_spec)}: {list(self.attribute_spec)}"
            )
        matched = self._assign(outputs, targets, gt_boxes, labels)  # [B, P]
        counted = _optional(targets, "normaliser_weights", device)
        normaliser, num_foreground = _normaliser(matched, counted)
        positives = _positives(outputs, targets, matched, gt_boxes, weights)
        roi_cls, roi_attributes = self._readout_terms(
            outputs.get("roi"), labels, attributes, weights, counted
        )
        valid = matched != IGNORE
        return {
            "cls": self._cls_term(outputs, matched, labels, weights, positives) / normaliser,
            "box": (_giou_loss(positives) * positives.box_weight).sum() / normaliser,
            "quality": self._quality_term(outputs, positives) / normaliser,
            "dfl": self._dfl_term(outputs, positives) / normaliser,
            "attributes": self._attribute_term(outputs, attributes, positives) / normaliser,
            "roi_cls": roi_cls,
            "roi_attributes": roi_attributes,
            "num_foreground": num_foreground,
            "supervised_fraction": valid.float().mean().detach(),
        }

    def _assign(self, outputs: dict, targets: dict, gt_boxes: Tensor, labels: Tensor) -> Tensor:
        device = gt_boxes.device
        return assign_locations(
            outputs["points"].float(),
            outputs["strides"].float(),
            gt_boxes,
            labels != IGNORE_INDEX,
            regions=targets["regions"].to(device),
            region_valid=targets["region_valid"].to(device),
            ignore_outside_regions=self.mode == "masked",
            center_radius=self.center_radius,
        )

    def _cls_term(
        self, outputs: dict, matched: Tensor, labels: Tensor, weights: Tensor, positives: _Positives
    ) -> Tensor:
        """Sum over every location that is not ``IGNORE`` (unnormalised)."""
        cls_logits = outputs["cls_logits"].float()
        valid = matched != IGNORE  # [B, P]
        foreground = matched >= 0
        cell = matched.clamp(min=0)  # [B, P], usable by gather (masked by foreground)
        location_weight = torch.where(foreground, weights.gather(1, cell), 1.0)  # [B, P]
        location_label = labels.gather(1, cell).clamp(min=0)  # [B, P]
        target = F.one_hot(location_label, self.num_classes).float() * foreground[..., None]  # [B, P, C]
        if self.cls_loss == "focal":
            per_location = sigmoid_focal_loss(
                cls_logits[valid], target[valid], alpha=self.focal_alpha, gamma=self.focal_gamma,
                reduction="none",
            ).sum(dim=1)  # [V]
        else:
            positive_iou = torch.zeros_like(location_weight)  # [B, P]
            positive_iou[positives.image_index, positives.point_index] = positives.iou
            soft_target = target * positive_iou[..., None]  # [B, P, C]
            per_location = quality_focal_loss(cls_logits[valid], soft_target[valid]).sum(dim=1)  # [V]
        return (per_location * location_weight[valid]).sum()

    @staticmethod
    def _quality_term(outputs: dict, positives: _Positives) -> Tensor:
        logits = outputs["quality_logits"].float()[positives.image_index, positives.point_index]  # [N]
        loss = F.binary_cross_entropy_with_logits(logits, positives.iou, reduction="none")
        return (loss * positives.box_weight).sum()

    @staticmethod
    def _dfl_term(outputs: dict, positives: _Positives) -> Tensor:
        """Distribution focal loss of the box sides, mean over the 4 sides, summed over positives."""
        points, strides = outputs["points"].float(), outputs["strides"].float()
        index = positives.point_index
        distribution = outputs["box_distribution"].float()[positives.image_index, index]  # [N, 4, n]
        sides = encode_boxes(points[index], strides[index], positives.target)  # [N, 4]
        per_side = distribution_focal_loss(distribution.flatten(0, 1), sides.flatten())  # [N * 4]
        return (per_side.view(-1, 4).mean(dim=1) * positives.box_weight).sum()

    def _attribute_term(self, outputs: dict, attributes: Tensor, positives: _Positives) -> Tensor:
        """One cross-entropy per attribute, summed, at every positive location (unnormalised)."""
        total = positives.weight.new_zeros(())
        cell_attributes = attributes[positives.image_index, positives.cell_index]  # [N, A]
        for column, name in enumerate(self.attribute_spec):
            logits = outputs["attr_logits"][name].float()[positives.image_index, positives.point_index]
            # reduction="none" gives exactly 0 (and zero gradient) at ignored targets, so an
            # all-missing attribute adds 0.0, never the NaN of an empty mean.
            per_location = F.cross_entropy(
                logits, cell_attributes[:, column], ignore_index=IGNORE_INDEX, reduction="none"
            )
            total = total + (per_location * positives.weight).sum()
        return total

    def _readout_terms(
        self,
        roi: dict | None,
        labels: Tensor,
        attributes: Tensor,
        weights: Tensor,
        counted: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the region read-out's class and attributes, per read-out box.

        Both are sums over read-out boxes (times the cell's weight) divided by the number of
        boxes in the batch averaged over ranks (each counted by its cell's ``counted`` weight,
        when given); the attribute term sums over attributes like ``attributes``. Without a
        read-out both are exactly 0.
        """
        zero = weights.new_zeros(())
        if roi is None:
            return zero, zero
        image_index, cell_index = roi["image_index"], roi["cell_index"]
        count = (
            weights.new_tensor(float(image_index.numel()))
            if counted is None
            else counted.float()[image_index, cell_index].sum()
        )
        count = mean_over_ranks(count).clamp(min=1.0)
        cell_weight = weights[image_index, cell_index]  # [N]
        cls_loss = F.cross_entropy(
            roi["cls_logits"].float(), labels[image_index, cell_index], reduction="none"
        )
        cls_term = (cls_loss * cell_weight).sum() / count
        attribute_loss = zero
        cell_attributes = attributes[image_index, cell_index]  # [N, A]
        for column, name in enumerate(self.attribute_spec):
            per_box = F.cross_entropy(
                roi["attr_logits"][name].float(),
                cell_attributes[:, column],
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            attribute_loss = attribute_loss + (per_box * cell_weight).sum()
        return cls_term, attribute_loss / count


def _optional(targets: dict, key: str, device: torch.device) -> Tensor | None:
    value = targets.get(key)
    return None if value is None else value.to(device)


def _cell_targets(targets: dict, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes ``[B, M', 4]``, labels ``[B, M']``, attributes ``[B, M', A]``, weights ``[B, M']``.

    ``M' = max(M, 1)``: a batch without any cell gets one padding cell so that the per-location
    gathers stay well defined; padding is never matched.
    """
    gt_boxes = targets["boxes"].to(device).float()
    labels = targets["labels"].to(device)
    attributes = targets["attributes"].to(device)
    weights = targets.get("weights")
    weights = torch.ones_like(gt_boxes[..., 0]) if weights is None else weights.to(device).float()
    if gt_boxes.shape[1] == 0:
        batch_size, num_attributes = gt_boxes.shape[0], attributes.shape[2]
        gt_boxes = gt_boxes.new_zeros((batch_size, 1, 4))
        labels = labels.new_full((batch_size, 1), IGNORE_INDEX)
        attributes = attributes.new_full((batch_size, 1, num_attributes), IGNORE_INDEX)
        weights = weights.new_zeros((batch_size, 1))
    return gt_boxes, labels, attributes, weights


def _normaliser(matched: Tensor, counted: Tensor | None) -> tuple[Tensor, Tensor]:
    """``max(1, num_foreground)`` and ``num_foreground`` (detached, mean over ranks)."""
    foreground = matched >= 0
    if counted is None:
        num_foreground = foreground.sum().float()
    else:
        if counted.shape[1] == 0:  # padded like `_cell_targets` does
            counted = counted.new_zeros((counted.shape[0], 1))
        num_foreground = (counted.float().gather(1, matched.clamp(min=0)) * foreground).sum()
    num_foreground = mean_over_ranks(num_foreground).detach()
    return num_foreground.clamp(min=1.0), num_foreground


def _positives(
    outputs: dict, targets: dict, matched: Tensor, gt_boxes: Tensor, weights: Tensor
) -> _Positives:
    image_index, point_index = (matched >= 0).nonzero(as_tuple=True)
    cell_index = matched[image_index, point_index]
    weight = weights[image_index, cell_index]  # [N]
    box_weights = targets.get("box_weights")
    box_weight = (
        weight if box_weights is None
        else box_weights.to(gt_boxes.device).float()[image_index, cell_index]
    )
    points, strides = outputs["points"].float(), outputs["strides"].float()
    predicted = decode_boxes(
        points[point_index], strides[point_index], outputs["box_deltas"].float()[image_index, point_index]
    )  # [N, 4]
    target = gt_boxes[image_index, cell_index]  # [N, 4]
    return _Positives(
        image_index, point_index, cell_index, weight, box_weight, predicted, target,
        elementwise_iou(predicted.detach(), target),
    )


def _giou_loss(positives: _Positives) -> Tensor:
    return generalized_box_iou_loss(positives.predicted, positives.target, reduction="none")  # [N]
