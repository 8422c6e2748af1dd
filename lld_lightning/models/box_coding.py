"""The box coding of the detector's output: (l, t, r, b) distances in stride units <-> xyxy."""

from __future__ import annotations

import torch


def decode_boxes(
    points: torch.Tensor, strides: torch.Tensor, box_deltas: torch.Tensor
) -> torch.Tensor:
    """Distances in stride units -> xyxy pixel boxes.

    Args:
        points: ``[..., 2]`` (x, y) location centres in pixels.
        strides: ``[...]`` stride of each location.
        box_deltas: ``[..., 4]`` (l, t, r, b) distances in stride units. Leading dimensions
            broadcast, e.g. points ``[P, 2]`` with deltas ``[B, P, 4]``.

    Returns:
        ``[..., 4]`` xyxy boxes in pixels.
    """
    distances = box_deltas * strides.unsqueeze(-1).to(box_deltas.dtype)
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def encode_boxes(
    points: torch.Tensor, strides: torch.Tensor, boxes_xyxy: torch.Tensor
) -> torch.Tensor:
    """The inverse of `decode_boxes`: xyxy pixel boxes -> (l, t, r, b) in stride units.

    Args:
        points: ``[..., 2]`` (x, y) location centres in pixels.
        strides: ``[...]`` stride of each location.
        boxes_xyxy: ``[..., 4]`` boxes; leading dimensions broadcast.

    Returns:
        ``[..., 4]`` distances; negative where the point lies outside the box.
    """
    left_top = points - boxes_xyxy[..., :2]
    right_bottom = boxes_xyxy[..., 2:] - points
    return torch.cat([left_top, right_bottom], dim=-1) / strides.unsqueeze(-1).to(boxes_xyxy.dtype)


