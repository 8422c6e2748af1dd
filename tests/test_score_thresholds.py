"""Per-class precision/recall at score thresholds (`lld_lightning.tools.score_thresholds`)."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest
import torch

from lld_lightning.models import Detector
from lld_lightning.module import LldModule
from lld_lightning.tools.score_thresholds import (
    load_teacher,
    one_class_per_cell,
    outside_regions,
    region_counts,
    suggest,
    threshold_counts,
)

GRID = [0.3, 0.5, 0.7]


def test_counts_match_one_to_one_within_the_class() -> None:
    target = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
        "labels": torch.tensor([0, 0, 1]),
    }
    pred = {
        "boxes": torch.tensor(
            [[0.0, 0, 10, 10], [0, 1, 10, 11], [40, 40, 50, 50], [40, 40, 50, 50]]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.4]),
        # a hit, its duplicate (the cell is taken), a right box with the wrong class, a hit
        "labels": torch.tensor([0, 0, 0, 1]),
    }
    counts = threshold_counts(pred, target, [0.3, 0.5, 0.75], num_classes=2)
    assert counts["cells"].tolist() == [2, 1]
    assert counts["detections"].tolist() == [[3, 1], [3, 0], [2, 0]]
    assert counts["correct"].tolist() == [[1, 1], [1, 0], [1, 0]]


def test_counts_of_an_image_without_cells_or_detections() -> None:
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    counts = threshold_counts(
        empty, {"boxes": torch.zeros(0, 4), "labels": empty["labels"]}, [0.5], 3
    )
    assert counts["cells"].tolist() == [0, 0, 0]
    assert counts["detections"].sum() == 0 and counts["correct"].sum() == 0


def test_suggest_takes_the_lowest_threshold_reaching_the_precision() -> None:
    thresholds = [0.3, 0.5, 0.7]
    precision = torch.tensor([[0.5, 0.95, 0.2], [0.92, 0.97, 0.4], [0.99, 1.0, 0.0]])
    detections = torch.tensor([[10, 10, 5], [8, 9, 3], [4, 5, 0]])
    # "c" never reaches 0.9: left out (its last row has no detections at all)
    assert suggest(precision, detections, thresholds, 0.9, ["a", "b", "c"]) == {"a": 0.5, "b": 0.3}


def test_region_counts_of_a_batch_equal_the_images_counted_one_by_one() -> None:
    """One matching over the batch (boxes shifted apart per image) gives the per-image counts,
    also where two images have a cell at the same place and only one image's detection hits it."""
    region = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    targets = [
        {
            "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]),
            "labels": torch.tensor([0]),
            "regions": region,
        },
        {
            "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [20, 20, 30, 30]]),
            "labels": torch.tensor([0, 1]),
            "regions": region,
        },
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "regions": region,
        },
    ]
    preds = [
        {
            "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [50, 50, 60, 60]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 0]),
        },  # a hit, and one outside the region (not counted)
        {
            "boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0], [3, 3, 12, 12]]),
            "scores": torch.tensor([0.4, 0.7]),
            "labels": torch.tensor([1, 1]),
        },  # a hit; the wrong class on the other cell
        {
            "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]),
            "scores": torch.tensor([0.95]),
            "labels": torch.tensor([0]),
        },  # nothing labelled there: a false detection
    ]
    counts = region_counts(preds, targets, GRID, 2)
    inside = [{k: v[:1] if i == 0 else v for k, v in p.items()} for i, p in enumerate(preds)]
    one_by_one = [threshold_counts(p, t, GRID, 2) for p, t in zip(inside, targets, strict=True)]
    for key in ("detections", "correct", "cells"):
        assert torch.equal(counts[key], sum(c[key] for c in one_by_one))
    assert counts["correct"][0].tolist() == [1, 1] and counts["detections"][0].tolist() == [2, 2]


def test_one_class_per_cell_keeps_the_best_class_of_overlapping_boxes() -> None:
    preds = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 11], [30, 30, 40, 40]]),
            "scores": torch.tensor([0.6, 0.8, 0.5]),
            "labels": torch.tensor([0, 1, 0]),  # two classes on one cell, one other cell
        }
    ]
    (kept,) = one_class_per_cell(preds, nms_iou=0.5)
    assert kept["labels"].tolist() == [1, 0] and kept["scores"].tolist() == pytest.approx(
        [0.8, 0.5]
    )
    (loose,) = one_class_per_cell(preds, nms_iou=0.95)  # IoU 0.91: both hypotheses stay
    assert len(loose["labels"]) == 3


def test_outside_regions_keeps_detections_and_hidden_cells_centred_outside() -> None:
    """Region 0-20 px; the batch frame is the original image scaled by 2 (the letterbox)."""
    scale = torch.diag(torch.tensor([2.0, 2.0, 1.0]))[None]  # [1, 3, 3]
    batch = {
        # in original pixels: a cell inside the region (after scaling), one outside, padding
        "hidden_boxes": torch.tensor(
            [[[1.0, 1.0, 5.0, 5.0], [20.0, 20.0, 24.0, 24.0], [0, 0, 0, 0]]]
        ),
        "hidden_labels": torch.tensor([[0, 1, -1]]),
        "transform": scale,
    }
    targets = [{"regions": torch.tensor([[0.0, 0.0, 20.0, 20.0]])}]
    preds = [
        {
            "boxes": torch.tensor(
                [[2.0, 2.0, 10.0, 10.0], [40.0, 40.0, 48.0, 48.0], [16.0, 16.0, 26.0, 26.0]]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
            "labels": torch.tensor([0, 1, 1]),
        }
    ]
    (outside,), (cells,) = outside_regions(preds, targets, batch)
    # the third box's centre (21, 21) is outside the region's right and bottom edges (x < 20)
    assert outside["scores"].tolist() == pytest.approx([0.8, 0.7])
    assert cells["labels"].tolist() == [1]
    assert cells["boxes"].tolist() == [[40.0, 40.0, 48.0, 48.0]]


def test_load_teacher_reads_the_pseudo_labeller_state_with_weights_only(tmp_path: Path) -> None:
    detector = functools.partial(Detector, backbone="test_resnet", fpn_channels=16, readout=None)
    model = LldModule(num_classes=2, class_names=["a", "b"], attribute_spec={}, detector=detector)
    teacher = {
        f"module.{k}": torch.full_like(v, 0.25) if v.is_floating_point() else v
        for k, v in model.detector.state_dict().items()
    }
    ckpt = tmp_path / "fit.ckpt"
    torch.save(
        {
            "state_dict": {},
            "callbacks": {
                "ModelCheckpoint{}": {"best_model_path": "x"},
                "PseudoLabeller": {"teacher": {**teacher, "n_averaged": torch.tensor(3)}},
            },
        },
        ckpt,
    )
    load_teacher(model, str(ckpt))
    weights = [v for v in model.detector.state_dict().values() if v.is_floating_point()]
    assert weights and all(bool((v == 0.25).all()) for v in weights)
    torch.save({"callbacks": {"ModelCheckpoint{}": {}}}, tmp_path / "plain.ckpt")
    with pytest.raises(SystemExit, match="no PseudoLabeller teacher"):
        load_teacher(model, str(tmp_path / "plain.ckpt"))
    # A checkpoint that needs arbitrary code to load is refused, not run.
    torch.save({"callbacks": {}, "object": Path("anything")}, tmp_path / "pickled.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        load_teacher(model, str(tmp_path / "pickled.ckpt"))
