"""FCOS-style location-to-cell assignment with sparse-annotation masking.

Every location (a point of one pyramid level) is matched to at most one annotated cell. The
annotated regions become a mask here, and only here: a location outside every region is
``IGNORE`` (unknown, neither object nor background) unless it is a positive for a labelled cell.

Memory: the assignment is one vectorised pass over ``[B, P, M]``. Its peak is about a dozen
``[B, P, M]`` float32/bool tensors, i.e. roughly ``40 * B * P * M`` bytes: for a 640x640 input
with strides 8/16/32 (P = 8400), B = 16 and M = 100 cells per image that is about 0.5 GB. Keep
``B * P * M`` below ~5e7 (M up to a few hundred cells per image at these sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lld_lightning.boxes import points_in_boxes
from lld_lightning.constants import BACKGROUND, IGNORE

#: The upper size bound of each level but the last is this many strides (FCOS: 64 px at stride 8).
SIZE_RANGE_STRIDES: float = 8.0

SizeRanges = Sequence[tuple[float, float]]


def default_size_ranges(strides: Sequence[int | float]) -> list[tuple[float, float]]:
    """Regression ranges derived from the level strides.

    The level with stride ``s`` takes cells whose largest distance ``max(l, t, r, b)`` from the
    location lies in ``[lo, hi]`` with ``hi = SIZE_RANGE_STRIDES * s`` (``inf`` for the largest
    stride) and ``lo`` the previous level's ``hi`` (0 for the smallest stride).

    Args:
        strides: the level strides, any order, duplicates allowed.

    Returns:
        ``(lo, hi)`` per unique stride, in ascending stride order.
    """
    unique = sorted({float(s) for s in strides})
    ranges: list[tuple[float, float]] = []
    lo = 0.0
    for i, stride in enumerate(unique):
        hi = math.inf if i == len(unique) - 1 else SIZE_RANGE_STRIDES * stride
        ranges.append((lo, hi))
        lo = hi
    return ranges


#: Per-location ranges kept for this many distinct ``strides`` tensors (one per input size).
_MAX_CACHED_RANGES: int = 8
_range_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _per_location_ranges(strides: Tensor, size_ranges: SizeRanges | None) -> tuple[Tensor, Tensor]:
    """``lo, hi`` float ``[P]`` for each location from its level's stride.

    ``torch.unique`` and ``.tolist()`` force a host sync, so the result is cached per
    ``strides`` tensor. The detector hands out the same cached ``strides`` object every step; the
    cache holds a reference to it (so its memory cannot be reused by another tensor) and checks
    identity and the in-place version counter before reusing an entry.
    """
    # Inference tensors (made under `torch.inference_mode`) have no version counter.
    version = 0 if strides.is_inference() else strides._version
    key = (id(strides), version, None if size_ranges is None else tuple(size_ranges))
    cached = _range_cache.get(key)
    if cached is not None and cached[0] is strides:
        return cached[1], cached[2]
    unique = torch.unique(strides)  # sorted ascending
    ranges = default_size_ranges(unique.tolist()) if size_ranges is None else list(size_ranges)
    if len(ranges) != unique.numel():
        raise ValueError(
            f"size_ranges has {len(ranges)} entries but there are {unique.numel()} strides "
            f"{unique.tolist()}; give one (lo, hi) per stride in ascending stride order"
        )
    table = torch.tensor(ranges, dtype=torch.float32, device=strides.device)  # [L, 2]
    level = torch.searchsorted(unique, strides)  # [P], index of each location's level
    lo, hi = table[level, 0], table[level, 1]
    if len(_range_cache) >= _MAX_CACHED_RANGES:
        _range_cache.clear()
    _range_cache[key] = (strides, lo, hi)
    return lo, hi


def inside_regions(points: Tensor, regions: Tensor, region_valid: Tensor) -> Tensor:
    """Which locations lie inside at least one valid annotated region (`points_in_boxes`).

    Args:
        points: float ``[P, 2]`` location centres ``(x, y)`` in input pixels.
        regions: float ``[B, R, 4]`` xyxy pixel rectangles.
        region_valid: bool ``[B, R]``, False for padding.

    Returns:
        bool ``[B, P]``.
    """
    return points_in_boxes(points[None], regions, region_valid)


def side_extremes(points: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest and the farthest side of every box from every location, in pixels.

    Args:
        points: float ``[P, 2]`` location centres ``(x, y)``.
        gt_boxes: float ``[B, M, 4]`` xyxy boxes.

    Returns:
        ``nearest, farthest`` float ``[B, P, M]``: ``min`` and ``max`` of ``(l, t, r, b)``;
        ``nearest > 0`` exactly when the location lies strictly inside the box.
    """
    x = points[None, :, None, 0]  # [1, P, 1]
    y = points[None, :, None, 1]
    box = gt_boxes[:, None, :, :]  # [B, 1, M, 4]
    left, top = x - box[..., 0], y - box[..., 1]  # [B, P, M]
    right, bottom = box[..., 2] - x, box[..., 3] - y
    nearest = torch.minimum(torch.minimum(left, right), torch.minimum(top, bottom))
    farthest = torch.maximum(torch.maximum(left, right), torch.maximum(top, bottom))
    return nearest, farthest


@torch.no_grad()
def assign_locations(
    points: Tensor,
    strides: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    regions: Tensor,
    region_valid: Tensor,
    ignore_outside_regions: bool = True,
    center_radius: float = 1.5,
    size_ranges: SizeRanges | None = None,
) -> Tensor:
    """Match every location to a cell, to ``BACKGROUND`` or to ``IGNORE``.

    A location is a *candidate* for a cell when all three hold:

    1. it lies strictly inside the cell box (``min(l, t, r, b) > 0``);
    2. it lies within ``center_radius * stride`` of the box centre on both axes (strictly); the
       centre window is clamped to the box, which rule 1 already enforces;
    3. the cell's size fits the location's level: ``lo <= max(l, t, r, b) <= hi``.

    Among several candidate cells the one with the smallest area wins (the first index on a
    tie). A location with no candidate is ``BACKGROUND`` if it lies inside a valid annotated
    region (see `inside_regions`), else ``IGNORE``; with ``ignore_outside_regions=False`` (the
    naive sparse baseline) it is ``BACKGROUND`` everywhere and ``IGNORE`` never occurs. A
    positive stays positive outside the regions: the expert labelled that cell. An image
    without any valid region is all ``IGNORE`` apart from its positives.

    Args:
        points: float ``[P, 2]`` location centres ``(x, y)`` in input pixels.
        strides: ``[P]`` stride of each location's level.
        gt_boxes: float ``[B, M, 4]`` cell boxes, xyxy pixels.
        gt_valid: bool ``[B, M]``, False for padding (never matched).
        regions: float ``[B, R, 4]`` annotated regions, xyxy pixels.
        region_valid: bool ``[B, R]``, False for padding.
        ignore_outside_regions: True for the region-masked loss, False for the naive baseline.
        center_radius: centre-sampling radius in units of the level stride.
        size_ranges: ``(lo, hi)`` per level in ascending stride order (``inf`` allowed);
            None derives them with `default_size_ranges`.

    Returns:
        int64 ``[B, P]``: the cell index in ``[0, M)``, ``BACKGROUND`` or ``IGNORE``.
    """
    batch_size, num_cells = gt_boxes.shape[:2]
    num_points = points.shape[0]
    points = points.float()
    stride = strides.float()
    gt_boxes = gt_boxes.float()
    # `.float()` of float32 strides is the same object, so the range cache keyed on it hits.
    lo, hi = _per_location_ranges(stride, size_ranges)

    matched = torch.full(
        (batch_size, num_points), BACKGROUND, dtype=torch.int64, device=gt_boxes.device
    )
    if num_cells > 0:
        x = points[None, :, None, 0]  # [1, P, 1]
        y = points[None, :, None, 1]
        box = gt_boxes[:, None, :, :]  # [B, 1, M, 4]
        nearest, farthest = side_extremes(points, gt_boxes)

        radius = (center_radius * stride)[None, :, None]  # [1, P, 1]
        center_x = (box[..., 0] + box[..., 2]) / 2  # [B, 1, M]
        center_y = (box[..., 1] + box[..., 3]) / 2
        near_center = ((x - center_x).abs() < radius) & ((y - center_y).abs() < radius)
        fits_level = (farthest >= lo[None, :, None]) & (farthest <= hi[None, :, None])
        candidate = (nearest > 0) & near_center & fits_level & gt_valid[:, None, :]  # [B, P, M]

        area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])  # [B, 1, M]
        area = torch.where(candidate, area, torch.full_like(area, math.inf))  # [B, P, M]
        smallest_area, best_cell = area.min(dim=2)  # [B, P]
        matched = torch.where(torch.isfinite(smallest_area), best_cell, matched)

    return mark_unknown(
        matched, points, regions, region_valid, ignore_outside_regions
    )


def mark_unknown(
    matched: Tensor,
    points: Tensor,
    regions: Tensor,
    region_valid: Tensor,
    ignore_outside_regions: bool = True,
) -> Tensor:
    """Turn ``BACKGROUND`` into ``IGNORE`` where nothing is known (the sparse mask).

    Outside every valid region (with ``ignore_outside_regions``) a location that no cell claimed
    is ``IGNORE``; positives are kept. See `assign_locations`.

    Returns:
        int64 ``[B, P]``, a new tensor.
    """
    if ignore_outside_regions:
        unknown = ~inside_regions(points, regions.float(), region_valid) & (matched == BACKGROUND)
        matched = matched.masked_fill(unknown, IGNORE)
    return matched
