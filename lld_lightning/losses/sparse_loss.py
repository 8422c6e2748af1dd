"""The sparse multi-task detection loss: classes, boxes, localisation quality and attributes.

Locations are matched to cells by `assign_locations`; every location the assigner marks
``IGNORE`` (outside all annotated regions and not a positive) is dropped before any term is
computed, so it contributes no loss and receives exactly zero gradient. With ``mode="naive"``
nothing is ignored and the unlabelled field of view counts as background (the baseline the
masked loss is compared against).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from lld_lightning.constants import IGNORE, IGNORE_INDEX
from lld_lightning.models.assign import TASK_ALIGNED_TOP_K, assign_locations, assign_task_aligned
from lld_lightning.models.detector import decode_boxes, encode_boxes
from lld_lightning.models.postprocess import detection_scores

LossMode = Literal["masked", "naive"]
BoxLossName = Literal["giou", "ciou", "diou"]
ClsLossName = Literal["focal", "quality_focal"]
AssignerName = Literal["fcos", "task_aligned"]

BOX_LOSSES: dict[str, Callable[..., Tensor]] = {
    "giou": generalized_box_iou_loss,
    "ciou": complete_box_iou_loss,
    "diou": distance_box_iou_loss,
}

#: Keeps the IoU of a degenerate (zero-area) predicted box finite.
IOU_EPS: float = 1e-7


def elementwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of each box with the box at the same index (torchvision's `box_iou` is pairwise).

    Args:
        boxes1: float ``[N, 4]`` xyxy.
        boxes2: float ``[N, 4]`` xyxy.

    Returns:
        float ``[N]`` in ``[0, 1]``.
    """
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return intersection / (area1 + area2 - intersection + IOU_EPS)


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


class SparseDetectionLoss(nn.Module):
    """Focal classification + IoU box + quality + attribute loss on a sparse-annotation mask.

    Every term is a sum over the locations it concerns divided by
    ``max(1, num_foreground)``, the number of positive locations in the batch averaged over DDP
    ranks (FCOS/torchvision normalisation). Terms are returned unweighted; the caller weights
    them. Everything is computed in float32, also under bf16/fp16 autocast.

    A per-cell weight (``targets["weights"]``, default 1) scales every term at that cell's
    positive locations (classification included); it does not change ``num_foreground``, so a
    weight-0 cell's locations add nothing to any term. What a cell's positives count in
    ``num_foreground`` is its ``targets["normaliser_weights"]`` (default 1): pseudo-labels that
    should add to the expert loss without rescaling it count 0.

    Args:
        num_classes: number of cell classes ``C``.
        attribute_spec: ``{name: num_values}`` in the column order of ``targets["attributes"]``.
        mode: ``"masked"`` ignores locations outside the annotated regions; ``"naive"`` treats
            them as background.
        focal_alpha: focal-loss weight of positives.
        focal_gamma: focal-loss focusing exponent.
        center_radius: centre-sampling radius of the assigner, in strides.
        box_loss: ``"giou"``, ``"ciou"`` or ``"diou"`` (the torchvision losses).
        cls_loss: ``"focal"`` (torchvision's sigmoid focal loss, one-hot targets) or
            ``"quality_focal"`` (`quality_focal_loss`: a positive's class target is the IoU of
            its predicted box with its cell, detached).
        assigner: ``"fcos"`` (`assign_locations`: centre window and size range per level) or
            ``"task_aligned"`` (`assign_task_aligned`: the ``top_k`` locations inside each cell
            whose current prediction fits it best, scored as at inference,
            ``sqrt(sigmoid(cls) * sigmoid(quality))``). Both apply the same sparse mask.
        top_k: positives per cell of the task-aligned assigner.
    """

    def __init__(
        self,
        num_classes: int,
        attribute_spec: dict[str, int],
        mode: LossMode = "masked",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        center_radius: float = 1.5,
        box_loss: BoxLossName = "giou",
        cls_loss: ClsLossName = "focal",
        assigner: AssignerName = "fcos",
        top_k: int = TASK_ALIGNED_TOP_K,
    ) -> None:
        super().__init__()
        if assigner not in get_args(AssignerName):
            raise ValueError(f"assigner must be one of {get_args(AssignerName)}, got {assigner!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if mode not in ("masked", "naive"):
            raise ValueError(f"mode must be 'masked' or 'naive', got {mode!r}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {sorted(BOX_LOSSES)}, got {box_loss!r}")
        if cls_loss not in get_args(ClsLossName):
            raise ValueError(f"cls_loss must be one of {get_args(ClsLossName)}, got {cls_loss!r}")
        self.num_classes = num_classes
        self.attribute_spec = dict(attribute_spec)
        self.mode = mode
        self.cls_loss = cls_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.center_radius = center_radius
        self.box_loss = box_loss
        self.assigner = assigner
        self.top_k = top_k

    def forward(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """Compute the named loss terms.

        Args:
            outputs: the detector output (docs/architecture.md): ``cls_logits [B, P, C]``,
                ``box_deltas [B, P, 4]`` (stride units), ``quality_logits [B, P]``,
                ``attr_logits {name: [B, P, K]}``, ``points [P, 2]``, ``strides [P]``.
            targets: batch keys ``boxes`` float ``[B, M, 4]`` xyxy pixels, ``labels`` int64
                ``[B, M]`` (``IGNORE_INDEX`` = padding), ``attributes`` int64 ``[B, M, A]``
                (``IGNORE_INDEX`` = missing), ``regions`` float ``[B, R, 4]``,
                ``region_valid`` bool ``[B, R]``, optional ``weights`` float ``[B, M]``, optional
                ``box_weights`` float ``[B, M]`` (replaces ``weights`` in the box and quality
                terms; pseudo-labels that should not train localisation set 0) and
                optional ``ignore_boxes`` float ``[B, K, 4]`` with ``ignore_valid`` bool
                ``[B, K]`` (background inside them is ``IGNORE``, see `assign_locations`),
                optional ``normaliser_weights`` float ``[B, M]`` (how much each positive
                location of a cell counts in ``num_foreground``; default 1).

            With a region read-out, ``outputs["roi"]`` also holds ``image_index`` and
            ``cell_index`` int64 ``[N]``: the expert cell each read-out box belongs to
            (`training_rois`).

        Returns:
            Scalar float32 tensors ``cls``, ``box``, ``quality``, ``attributes``, ``roi_cls``,
            ``roi_attributes`` (both 0 without ``outputs["roi"]``), ``dfl`` (the distribution
            focal loss of the box sides, mean over the 4 sides, summed over positives like
            ``box``; 0 without ``outputs["box_distribution"]``), and, detached for logging,
            ``num_foreground`` (positives in the batch, mean over ranks) and
            ``supervised_fraction`` (the share of this rank's locations that carry a
            classification loss: 1 for ``naive``, the annotated share of the field for
            ``masked``).
        """
        device_type = outputs["cls_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._terms(outputs, targets)

    def _terms(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        cls_logits = outputs["cls_logits"].float()
        points = outputs["points"].float()
        strides = outputs["strides"].float()
        gt_boxes, labels, attributes, weights = _cell_targets(targets, cls_logits.device)
        if attributes.shape[2] != len(self.attribute_spec):
            raise ValueError(
                f"targets['attributes'] has {attributes.shape[2]} columns but the attribute spec "
                f"names {len(self.attribute_spec)}: {list(self.attribute_spec)}"
            )

        mask = {
            "regions": targets["regions"].to(cls_logits.device),
            "region_valid": targets["region_valid"].to(cls_logits.device),
            "ignore_outside_regions": self.mode == "masked",
            "ignore_boxes": _optional(targets, "ignore_boxes", cls_logits.device),
            "ignore_valid": _optional(targets, "ignore_valid", cls_logits.device),
        }
        if self.assigner == "task_aligned":
            with torch.no_grad():
                pred_boxes = decode_boxes(points, strides, outputs["box_deltas"].float())
                pred_scores = detection_scores(cls_logits, outputs["quality_logits"])  # as `postprocess`
            matched = assign_task_aligned(
                points, gt_boxes, labels, labels != IGNORE_INDEX, pred_boxes=pred_boxes,
                pred_scores=pred_scores, top_k=self.top_k, **mask,
            )  # [B, P]
        else:
            matched = assign_locations(
                points, strides, gt_boxes, labels != IGNORE_INDEX,
                center_radius=self.center_radius, **mask,
            )  # [B, P]
        valid = matched != IGNORE  # [B, P]
        foreground = matched >= 0  # [B, P]
        cell = matched.clamp(min=0)  # [B, P], an index usable by gather (masked by foreground)

        counted = _optional(targets, "normaliser_weights", cls_logits.device)
        if counted is not None and counted.shape[1] == 0:  # padded like `_cell_targets` does
            counted = counted.new_zeros((counted.shape[0], 1))
        if counted is None:
            num_foreground = foreground.sum().float()
        else:
            num_foreground = (counted.float().gather(1, cell) * foreground).sum()
        num_foreground = mean_over_ranks(num_foreground).detach()
        normaliser = num_foreground.clamp(min=1.0)

        # Per-location weight: the cell's weight at positives, 1 for background.
        location_weight = torch.where(foreground, weights.gather(1, cell), 1.0)  # [B, P]
        location_label = labels.gather(1, cell).clamp(min=0)  # [B, P]
        cls_target = F.one_hot(location_label, self.num_classes).float()  # [B, P, C]
        cls_target = cls_target * foreground[..., None]

        # Positive locations only, flattened to [N].
        image_index, point_index = foreground.nonzero(as_tuple=True)
        cell_index = matched[image_index, point_index]
        positive_weight = weights[image_index, cell_index]  # [N]
        box_weights = targets.get("box_weights")
        positive_box_weight = (
            positive_weight
            if box_weights is None
            else box_weights.to(cls_logits.device).float()[image_index, cell_index]
        )  # [N], box and quality terms only
        predicted = decode_boxes(
            points[point_index],
            strides[point_index],
            outputs["box_deltas"].float()[image_index, point_index],
        )  # [N, 4]
        target_boxes = gt_boxes[image_index, cell_index]  # [N, 4]
        box_loss = BOX_LOSSES[self.box_loss](predicted, target_boxes, reduction="none")  # [N]
        box_term = (box_loss * positive_box_weight).sum() / normaliser

        dfl_term = cls_logits.new_zeros(())
        if "box_distribution" in outputs:
            distribution = outputs["box_distribution"].float()[image_index, point_index]  # [N, 4, n]
            sides = encode_boxes(points[point_index], strides[point_index], target_boxes)  # [N, 4]
            per_side = distribution_focal_loss(distribution.flatten(0, 1), sides.flatten())
            dfl_term = (per_side.view(-1, 4).mean(dim=1) * positive_box_weight).sum() / normaliser

        iou = elementwise_iou(predicted.detach(), target_boxes)  # [N]
        if self.cls_loss == "focal":
            cls_loss = sigmoid_focal_loss(
                cls_logits[valid],
                cls_target[valid],
                alpha=self.focal_alpha,
                gamma=self.focal_gamma,
                reduction="none",
            ).sum(dim=1)  # [V]
        else:
            positive_iou = torch.zeros_like(location_weight)  # [B, P]
            positive_iou[image_index, point_index] = iou
            soft_target = cls_target * positive_iou[..., None]  # [B, P, C]
            cls_loss = quality_focal_loss(cls_logits[valid], soft_target[valid]).sum(dim=1)  # [V]
        cls_term = (cls_loss * location_weight[valid]).sum() / normaliser
        quality_logits = outputs["quality_logits"].float()[image_index, point_index]  # [N]
        quality_loss = F.binary_cross_entropy_with_logits(quality_logits, iou, reduction="none")
        quality_term = (quality_loss * positive_box_weight).sum() / normaliser

        attribute_loss = cls_logits.new_zeros(())
        positive_attributes = attributes[image_index, cell_index]  # [N, A]
        for column, name in enumerate(self.attribute_spec):
            logits = outputs["attr_logits"][name].float()[image_index, point_index]  # [N, K]
            # reduction="none" gives exactly 0 (and zero gradient) at ignored targets, so an
            # all-missing attribute adds 0.0, never the NaN of an empty mean.
            per_location = F.cross_entropy(
                logits, positive_attributes[:, column], ignore_index=IGNORE_INDEX, reduction="none"
            )
            attribute_loss = attribute_loss + (per_location * positive_weight).sum()
        attribute_term = attribute_loss / normaliser
        roi_cls_term, roi_attribute_term = self._readout_terms(
            outputs.get("roi"), labels, attributes, weights, counted
        )

        return {
            "cls": cls_term,
            "box": box_term,
            "quality": quality_term,
            "attributes": attribute_term,
            "roi_cls": roi_cls_term,
            "roi_attributes": roi_attribute_term,
            "dfl": dfl_term,
            "num_foreground": num_foreground,
            "supervised_fraction": valid.float().mean().detach(),
        }

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
