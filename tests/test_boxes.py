"""The shared box primitives (`lld_lightning.boxes`): hand-computed cases and broadcasting."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from lld_lightning.boxes import box_centres, elementwise_iou, grow_boxes, nms, points_in_boxes


def test_points_in_boxes_is_half_open_and_honours_valid() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    points = torch.tensor([[0.0, 0.0], [10.0, 5.0], [9.99, 9.99], [25.0, 25.0], [15.0, 15.0]])
    assert points_in_boxes(points, boxes).tolist() == [True, False, True, True, False]
    valid = torch.tensor([True, False])
    assert points_in_boxes(points, boxes, valid).tolist() == [True, False, True, False, False]
    assert points_in_boxes(points, boxes[:0]).tolist() == [False] * 5  # no region: nothing inside


def test_points_in_boxes_broadcasts_over_images_and_per_point_boxes() -> None:
    points = torch.tensor([[5.0, 5.0], [25.0, 25.0]])  # [P, 2]
    regions = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[20.0, 20.0, 30.0, 30.0]]])  # [B, R, 4]
    assert points_in_boxes(points[None], regions, torch.ones(2, 1, dtype=torch.bool)).tolist() == [
        [True, False],
        [False, True],
    ]
    own = points_in_boxes(points[:, None], regions)  # each point against its own image's boxes
    assert own.tolist() == [[True], [True]]


def test_elementwise_iou_matches_torchvision_diagonal_and_broadcasts() -> None:
    generator = torch.Generator().manual_seed(0)
    top_left = torch.rand(6, 2, generator=generator) * 10
    boxes1 = torch.cat([top_left, top_left + 1 + torch.rand(6, 2, generator=generator) * 10], dim=1)
    top_left = torch.rand(6, 2, generator=generator) * 10
    boxes2 = torch.cat([top_left, top_left + 1 + torch.rand(6, 2, generator=generator) * 10], dim=1)
    torch.testing.assert_close(elementwise_iou(boxes1, boxes2), box_iou(boxes1, boxes2).diagonal())
    torch.testing.assert_close(elementwise_iou(boxes1[:, None], boxes2[None]), box_iou(boxes1, boxes2))
    assert elementwise_iou(torch.tensor([0.0, 0, 4, 4]), torch.tensor([2.0, 0, 6, 4])).item() == pytest.approx(8 / 24)


def test_centres_grow_and_nms() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    assert box_centres(boxes)[0].tolist() == [5.0, 5.0]
    assert grow_boxes(boxes[:1], 2.0).tolist() == [[-5.0, -5.0, 15.0, 15.0]]
    scores = torch.tensor([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5, groups=torch.tensor([0, 1, 0])).tolist() == [1, 2, 0]
