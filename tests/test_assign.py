"""Hand-written cases for the FCOS-style assigner with sparse-region masking.

The toy pyramid is a 32x32 image with two levels:

- stride 8: a 4x4 grid, location ``row * 4 + col`` at ``(4 + 8 col, 4 + 8 row)``;
- stride 16: a 2x2 grid, location ``16 + row * 2 + col`` at ``(8 + 16 col, 8 + 16 row)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lld_lightning.constants import BACKGROUND, IGNORE
from lld_lightning.models.assign import (
    assign_locations,
    default_size_ranges,
    inside_regions,
)

BG, IG = BACKGROUND, IGNORE  # short names for the hand-written expected vectors
WHOLE_IMAGE = [0.0, 0.0, 32.0, 32.0]


def toy_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """``points [20, 2]`` and ``strides [20]`` of the two-level 32x32 toy pyramid."""
    points, strides = [], []
    for stride in (8, 16):
        cells = 32 // stride
        for row in range(cells):
            for col in range(cells):
                points.append((stride / 2 + stride * col, stride / 2 + stride * row))
                strides.append(stride)
    return torch.tensor(points), torch.tensor(strides)


def assign_one(
    boxes: list[list[float]],
    regions: list[list[float]],
    valid: list[bool] | None = None,
    **kwargs,
) -> list[int]:
    """Assign a single image; returns the ``[P]`` matched vector as a list."""
    points, strides = toy_grid()
    gt_boxes = torch.tensor(boxes, dtype=torch.float32).reshape(1, -1, 4)
    gt_valid = torch.tensor(valid if valid is not None else [True] * len(boxes)).reshape(1, -1)
    region_boxes = torch.tensor(regions, dtype=torch.float32).reshape(1, -1, 4)
    region_valid = torch.ones(region_boxes.shape[:2], dtype=torch.bool)
    matched = assign_locations(
        points, strides, gt_boxes, gt_valid, region_boxes, region_valid, **kwargs
    )
    assert matched.shape == (1, 20) and matched.dtype == torch.int64
    return matched[0].tolist()


def test_toy_grid_layout() -> None:
    points, strides = toy_grid()
    assert points[5].tolist() == [12.0, 12.0]
    assert points[16].tolist() == [8.0, 8.0]
    assert points[19].tolist() == [24.0, 24.0]
    assert strides.tolist() == [8] * 16 + [16] * 4


def test_default_size_ranges() -> None:
    assert default_size_ranges([8, 16, 32]) == [(0.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
    # Order and repetition (one entry per location) do not matter.
    assert default_size_ranges([16, 8, 8, 16]) == [(0.0, 64.0), (64.0, math.inf)]


def test_box_that_fits_level_two_only() -> None:
    # Centre (16, 16). Stride-8 locations within 12 px of it (5, 6, 9, 10) reach 20 px > 8 to
    # the far edges; the stride-16 locations reach 24 px, inside [8, inf).
    expected = [BG] * 16 + [0, 0, 0, 0]
    got = assign_one([[0, 0, 32, 32]], [WHOLE_IMAGE], size_ranges=[(0, 8), (8, math.inf)])
    assert got == expected


def test_default_ranges_put_the_same_box_on_level_one() -> None:
    # With the derived ranges [0, 64] / [64, inf) the 24 px reach is a stride-8 size.
    expected = [BG] * 20
    for index in (5, 6, 9, 10):
        expected[index] = 0
    assert assign_one([[0, 0, 32, 32]], [WHOLE_IMAGE]) == expected


def test_overlapping_boxes_smaller_wins() -> None:
    # Cell A [0,0,16,16] takes locations 0, 1, 4, 5; cell B [8,8,16,16] (smaller) contains only
    # location 5 and wins it. Location 16 (8, 8) is inside A but 8 px < 64 does not fit level 2.
    expected = [BG] * 20
    expected[0] = expected[1] = expected[4] = 0
    expected[5] = 1
    assert assign_one([[0, 0, 16, 16], [8, 8, 16, 16]], [WHOLE_IMAGE]) == expected
    # Listing the cells the other way round swaps the indices, not the winner.
    swapped = [{0: 1, 1: 0}.get(m, m) for m in expected]
    assert assign_one([[8, 8, 16, 16], [0, 0, 16, 16]], [WHOLE_IMAGE]) == swapped


def test_inside_box_but_outside_centre_radius_is_background() -> None:
    # A strip [0,0,32,8] (centre (16, 4)) contains locations 0..3; with radius 1.0 * 8 px only
    # x = 12 and x = 20 are near the centre; x = 4 and x = 28 are 12 px away.
    expected = [BG] * 20
    expected[1] = expected[2] = 0
    assert assign_one([[0, 0, 32, 8]], [WHOLE_IMAGE], center_radius=1.0) == expected
    # The default radius 1.5 * 8 = 12 px is strict: x = 4 and 28 (exactly 12 px) stay out.
    assert assign_one([[0, 0, 32, 8]], [WHOLE_IMAGE]) == expected


def test_location_on_the_box_edge_is_not_inside() -> None:
    # Strip [12,0,28,8], centre (20, 4): locations 1 (12, 4) and 3 (28, 4) lie on its left and
    # right edges (distance 0), only location 2 (20, 4) is strictly inside.
    expected = [BG] * 20
    expected[2] = 0
    assert assign_one([[12, 0, 28, 8]], [WHOLE_IMAGE]) == expected


def test_region_masks_unlabelled_locations() -> None:
    # No cell, region [0,0,16,16]: locations 0, 1, 4, 5 and 16 lie inside it.
    expected = [IG] * 20
    for index in (0, 1, 4, 5, 16):
        expected[index] = BG
    assert assign_one(torch.zeros(0, 4).tolist(), [[0, 0, 16, 16]]) == expected
    # The naive baseline has no IGNORE at all.
    got = assign_one(torch.zeros(0, 4).tolist(), [[0, 0, 16, 16]], ignore_outside_regions=False)
    assert got == [BG] * 20


def test_region_edges_are_half_open() -> None:
    # x1 <= x < x2: location 0 (4, 4) is inside [4,4,12,12], location 1 (12, 4) is not.
    points, _ = toy_grid()
    inside = inside_regions(
        points, torch.tensor([[[4.0, 4.0, 12.0, 12.0]]]), torch.ones(1, 1).bool()
    )
    assert inside[0].nonzero().flatten().tolist() == [0, 16]


def test_positive_outside_region_stays_positive() -> None:
    # Cell [8,8,24,24] (centre (16, 16)) is positive at 5, 6, 9, 10; the region [0,0,16,16]
    # holds only location 5 of them, yet 6, 9 and 10 remain positives of the labelled cell.
    expected = [IG] * 20
    for index in (0, 1, 4, 16):
        expected[index] = BG
    for index in (5, 6, 9, 10):
        expected[index] = 0
    assert assign_one([[8, 8, 24, 24]], [[0, 0, 16, 16]]) == expected


def test_padded_cells_never_match() -> None:
    got = assign_one([[0, 0, 32, 32], [0, 0, 16, 16]], [WHOLE_IMAGE], valid=[False, False])
    assert got == [BG] * 20


def test_image_without_region_is_ignored_except_positives() -> None:
    points, strides = toy_grid()
    matched = assign_locations(
        points,
        strides,
        torch.tensor([[[8.0, 8.0, 24.0, 24.0]]]),
        torch.ones(1, 1, dtype=torch.bool),
        torch.zeros(1, 1, 4),
        torch.zeros(1, 1, dtype=torch.bool),  # the only region is padding
    )
    expected = [IG] * 20
    for index in (5, 6, 9, 10):
        expected[index] = 0
    assert matched[0].tolist() == expected


def test_batch_is_assigned_per_image() -> None:
    # Image 0: the positive-outside-region case plus a padded cell and a padded whole-image
    # region (neither may count). Image 1: the overlapping-boxes case, fully annotated.
    points, strides = toy_grid()
    gt_boxes = torch.tensor(
        [[[8, 8, 24, 24], [0, 0, 32, 32]], [[0, 0, 16, 16], [8, 8, 16, 16]]], dtype=torch.float32
    )
    gt_valid = torch.tensor([[True, False], [True, True]])
    regions = torch.tensor([[[0, 0, 16, 16], WHOLE_IMAGE], [WHOLE_IMAGE, [0, 0, 0, 0]]])
    region_valid = torch.tensor([[True, False], [True, False]])
    matched = assign_locations(points, strides, gt_boxes, gt_valid, regions, region_valid)

    first = [IG] * 20
    for index in (0, 1, 4, 16):
        first[index] = BG
    for index in (5, 6, 9, 10):
        first[index] = 0
    second = [BG] * 20
    second[0] = second[1] = second[4] = 0
    second[5] = 1
    assert matched.tolist() == [first, second]


def test_no_cells_in_the_whole_batch() -> None:
    points, strides = toy_grid()
    matched = assign_locations(
        points,
        strides,
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.bool),
        torch.tensor([[WHOLE_IMAGE], [[0, 0, 16, 16]]]),
        torch.ones(2, 1, dtype=torch.bool),
    )
    assert matched[0].tolist() == [BG] * 20
    assert (matched[1] == IG).sum().item() == 15


def test_naive_equals_masked_with_ignore_as_background() -> None:
    generator = torch.Generator().manual_seed(0)
    points, strides = toy_grid()
    corner = torch.rand(3, 6, 2, generator=generator) * 24
    gt_boxes = torch.cat([corner, corner + 4 + torch.rand(3, 6, 2, generator=generator) * 20], -1)
    gt_valid = torch.rand(3, 6, generator=generator) > 0.2
    regions = torch.tensor([[[0, 0, 16, 16]], [[10, 4, 30, 20]], [[0, 16, 32, 32]]]).float()
    region_valid = torch.ones(3, 1, dtype=torch.bool)
    masked = assign_locations(points, strides, gt_boxes, gt_valid, regions, region_valid)
    naive = assign_locations(
        points, strides, gt_boxes, gt_valid, regions, region_valid, ignore_outside_regions=False
    )
    assert (masked == IGNORE).any() and (masked >= 0).any()
    assert not (naive == IGNORE).any()
    assert torch.equal(naive, masked.masked_fill(masked == IGNORE, BACKGROUND))


def test_wrong_number_of_size_ranges_is_rejected() -> None:
    points, strides = toy_grid()
    with pytest.raises(ValueError, match="size_ranges"):
        assign_locations(
            points,
            strides,
            torch.zeros(1, 1, 4),
            torch.zeros(1, 1, dtype=torch.bool),
            torch.zeros(1, 1, 4),
            torch.zeros(1, 1, dtype=torch.bool),
            size_ranges=[(0, math.inf)],
        )
