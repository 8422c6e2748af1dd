"""`RegionCalibration` and the pseudo-labeller's thresholds that follow the teacher's precision
inside the labelled regions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lld_lightning.calibration import CALIBRATION_GRID, RegionCalibration
from lld_lightning.pseudo import PseudoLabeller
from tests.test_pseudo import _batch, _preds, _with_teacher_view

GRID = [0.3, 0.5, 0.7]


def _counts(detections: list[list[int]], correct: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(detections), torch.tensor(correct)


def test_the_lowest_threshold_reaching_the_precision_per_class() -> None:
    calibration = RegionCalibration(3, precision=0.9, grid=GRID, memory=float("inf"), min_detections=5)
    # class 0 reaches 0.9 from 0.5, class 1 at every threshold, class 2 never (the grid's top)
    calibration.update(*_counts([[10, 10, 10], [8, 9, 6], [5, 5, 2]], [[6, 10, 2], [8, 9, 1], [5, 5, 1]]))
    fallback = torch.tensor([0.6, 0.6, 0.6])
    assert calibration.thresholds(fallback).tolist() == pytest.approx([0.5, 0.3, 0.7])


def test_a_class_keeps_its_threshold_until_it_has_enough_detections() -> None:
    calibration = RegionCalibration(2, precision=0.9, grid=GRID, memory=float("inf"), min_detections=5)
    calibration.update(*_counts([[4, 10], [4, 10], [4, 10]], [[4, 10], [4, 10], [4, 10]]))
    assert calibration.thresholds(torch.tensor([0.6, 0.6])).tolist() == pytest.approx([0.6, 0.3])
    calibration.update(*_counts([[1, 0], [1, 0], [1, 0]], [[1, 0], [1, 0], [1, 0]]))
    assert calibration.thresholds(torch.tensor([0.6, 0.6])).tolist() == pytest.approx([0.3, 0.3])


def test_old_batches_fade_so_the_threshold_follows_the_scores() -> None:
    calibration = RegionCalibration(1, precision=0.9, grid=GRID, memory=10, min_detections=1)
    precise = _counts([[10], [10], [10]], [[10], [10], [10]])
    drifted = _counts([[10], [10], [10]], [[5], [7], [10]])  # only >= 0.7 is still precise
    for _ in range(30):
        calibration.update(*precise)
    assert calibration.thresholds(torch.tensor([0.6])).item() == pytest.approx(0.3)
    for _ in range(30):
        calibration.update(*drifted)
    assert calibration.thresholds(torch.tensor([0.6])).item() == pytest.approx(0.7)
    # one batch's worth of weight: (1 - 1/10) per update
    assert calibration.detections[0, 0].item() == pytest.approx(10 * (1 - 0.9**60) / 0.1)


def test_state_round_trip_and_bad_settings() -> None:
    calibration = RegionCalibration(2, grid=GRID)
    calibration.update(*_counts([[3, 1], [2, 1], [1, 0]], [[2, 1], [2, 1], [1, 0]]))
    restored = RegionCalibration(2, grid=GRID)
    restored.load_state_dict(calibration.state_dict())
    assert torch.equal(restored.detections, calibration.detections)
    with pytest.raises(ValueError, match="do not fit"):
        RegionCalibration(3, grid=GRID).load_state_dict(calibration.state_dict())
    for kwargs in ({"grid": [0.5, 0.3]}, {"grid": []}, {"precision": 0.0}, {"memory": 0.5}):
        with pytest.raises(ValueError):
            RegionCalibration(2, **kwargs)
    with pytest.raises(ValueError, match="mode='teacher'"):
        PseudoLabeller(mode="self", calibrate_precision=0.9)


def test_the_labeller_scores_the_teacher_inside_the_regions_only() -> None:
    """Inside the region (0-20 px): a hit on the expert cell at 0.5 and a false detection at 0.35;
    outside it, a detection at 0.9 with no label there, which must not count."""
    module = SimpleNamespace(
        class_names=["a", "b", "c"], device=torch.device("cpu"), _trainer=None,
        detector=torch.nn.Linear(1, 1), log=lambda *args, **kwargs: None,
    )
    labeller = PseudoLabeller(
        threshold=0.6, calibrate_precision=0.9, calibration_memory=float("inf"), calibration_min_detections=2
    )
    labeller.on_fit_start(SimpleNamespace(global_step=0), module)
    assert labeller.thresholds.tolist() == pytest.approx([0.6, 0.6, 0.6])
    batch = _with_teacher_view(_batch(1))
    preds = [_preds(
        [[2, 2, 12, 12], [14, 14, 18, 18], [40, 40, 50, 50]], [0.5, 0.35, 0.9], [1, 1, 1]
    )]
    labeller.calibrate(batch, preds, "teacher_", module)
    detections, correct = labeller.calibration.detections, labeller.calibration.correct
    grid = list(CALIBRATION_GRID)
    assert detections[grid.index(0.3), 1] == 2 and correct[grid.index(0.3), 1] == 1
    assert detections[grid.index(0.4), 1] == 1 and correct[grid.index(0.4), 1] == 1
    assert detections[:, [0, 2]].sum() == 0 and detections[grid.index(0.6), 1] == 0
    # class 1: precision 1.0 from 0.4 on; classes 0 and 2 saw nothing and keep 0.6
    assert labeller.thresholds.tolist() == pytest.approx([0.6, 0.4, 0.6])
    # the teacher's detections are asked for down to the grid's lowest threshold
    state = labeller.state_dict()
    restored = PseudoLabeller(threshold=0.6, calibrate_precision=0.9, calibration_min_detections=2)
    restored.load_state_dict(state)
    restored.on_fit_start(SimpleNamespace(global_step=0), module)
    assert restored.thresholds.tolist() == pytest.approx([0.6, 0.4, 0.6])


def test_region_counts_of_a_batch_equal_the_images_counted_one_by_one() -> None:
    """One matching over the batch (boxes shifted apart per image) gives the per-image counts,
    also where two images have a cell at the same place and only one image's detection hits it."""
    from lld_lightning.calibration import region_counts, threshold_counts

    region = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    targets = [
        {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([0]), "regions": region},
        {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [20, 20, 30, 30]]), "labels": torch.tensor([0, 1]),
         "regions": region},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "regions": region},
    ]
    preds = [
        {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.8]),
         "labels": torch.tensor([0, 0])},  # a hit, and one outside the region (not counted)
        {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0], [3, 3, 12, 12]]), "scores": torch.tensor([0.4, 0.7]),
         "labels": torch.tensor([1, 1])},  # a hit; the wrong class on the other cell
        {"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "scores": torch.tensor([0.95]),
         "labels": torch.tensor([0])},  # nothing labelled there: a false detection
    ]
    counts = region_counts(preds, targets, GRID, 2)
    inside = [{k: v[:1] if i == 0 else v for k, v in p.items()} for i, p in enumerate(preds)]
    one_by_one = [threshold_counts(p, t, GRID, 2) for p, t in zip(inside, targets, strict=True)]
    for key in ("detections", "correct", "cells"):
        assert torch.equal(counts[key], sum(c[key] for c in one_by_one))
    assert counts["correct"][0].tolist() == [1, 1] and counts["detections"][0].tolist() == [2, 2]
