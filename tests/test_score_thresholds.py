"""Per-class precision/recall at score thresholds (`lld_lightning.score_thresholds`)."""

from __future__ import annotations

import torch

from lld_lightning.score_thresholds import suggest, threshold_counts


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
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    counts = threshold_counts(empty, {"boxes": torch.zeros(0, 4), "labels": empty["labels"]}, [0.5], 3)
    assert counts["cells"].tolist() == [0, 0, 0]
    assert counts["detections"].sum() == 0 and counts["correct"].sum() == 0


def test_suggest_takes_the_lowest_threshold_reaching_the_precision() -> None:
    thresholds = [0.3, 0.5, 0.7]
    precision = torch.tensor([[0.5, 0.95, 0.2], [0.92, 0.97, 0.4], [0.99, 1.0, 0.0]])
    detections = torch.tensor([[10, 10, 5], [8, 9, 3], [4, 5, 0]])
    # "c" never reaches 0.9: left out (its last row has no detections at all)
    assert suggest(precision, detections, thresholds, 0.9, ["a", "b", "c"]) == {"a": 0.5, "b": 0.3}
