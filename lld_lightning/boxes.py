"""Box primitives shared by data, models, losses, callbacks and tools: one implementation each.

Every box is xyxy in pixels. A point ``(x, y)`` lies inside a box when ``x1 <= x < x2`` and
``y1 <= y < y2`` (the pixel convention, so adjacent rectangles never share a point). Pairwise IoU
is torchvision's `box_iou`; NMS is torchvision's `batched_nms` behind `nms`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = ["box_centres", "box_iou", "elementwise_iou", "grow_boxes", "nms", "points_in_boxes"]

#: Keeps the IoU of a degenerate (zero-area) box finite.
IOU_EPS: float = 1e-7


def box_centres(boxes: Tensor) -> Tensor:
    """Centres ``[..., 2]`` of xyxy boxes ``[..., 4]``."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def points_in_boxes(points: Tensor, boxes: Tensor, valid: Tensor | None = None) -> Tensor:
    """Whether each point lies inside at least one (valid) box.

    Leading dimensions broadcast: points ``[P, 2]`` against regions ``[B, R, 4]`` give
    ``[B, P]``; points ``[N, 1, 2]`` against each point's own boxes ``[N, R, 4]`` give ``[N, 1]``.

    Args:
        points: float ``[..., N, 2]`` ``(x, y)``.
        boxes: float ``[..., R, 4]`` xyxy.
        valid: bool ``[..., R]``, False for padding; ``None`` = every box is real.

    Returns:
        bool ``[..., N]``.
    """
    x = points[..., :, None, 0]  # [..., N, 1]
    y = points[..., :, None, 1]
    box = boxes[..., None, :, :]  # [..., 1, R, 4]
    inside = (x >= box[..., 0]) & (x < box[..., 2]) & (y >= box[..., 1]) & (y < box[..., 3])  # [..., N, R]
    if valid is not None:
        inside = inside & valid[..., None, :]
    return inside.any(dim=-1)


def elementwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes paired by position (torchvision's `box_iou` is all-pairs).

    Leading dimensions broadcast: ``[N, 4]`` with ``[N, 4]`` gives ``[N]``; ``[N, 1, 4]`` with
    ``[N, M, 4]`` gives each box's IoU with the M boxes of its own image, ``[N, M]``.

    Args:
        boxes1: float ``[..., 4]`` xyxy.
        boxes2: float ``[..., 4]`` xyxy.

    Returns:
        float ``[...]`` in ``[0, 1]``.
    """
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(dim=-1)
    return intersection / (area1 + area2 - intersection + IOU_EPS)


def grow_boxes(boxes: Tensor, factor: float) -> Tensor:
    """Scale xyxy boxes ``[..., 4]`` about their centres by ``factor``."""
    centre = box_centres(boxes)
    half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)
    return torch.cat([centre - half, centre + half], dim=-1)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, groups: Tensor | None = None) -> Tensor:
    """Indices of the boxes kept by non-maximum suppression, highest score first.

    Args:
        boxes: float ``[N, 4]`` xyxy.
        scores: float ``[N]``.
        iou_threshold: a box overlapping a better one of its group by more than this is dropped.
        groups: int64 ``[N]``; boxes of different groups (images, classes, or both encoded in one
            integer) never suppress each other. ``None`` = one group.

    Returns:
        int64 ``[K]``.
    """
    if groups is None:
        groups = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    return batched_nms(boxes.float(), scores.float(), groups, iou_threshold)
