import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sparse import simulate_sparse, sparse_rectangle


def _record(image_id: int = 3) -> ImageRecord:
    boxes = np.array([[10, 10, 30, 30], [100, 100, 140, 150], [60, 20, 80, 40]], dtype=np.float32)
    return ImageRecord(
        path=Path("x.png"), width=200, height=160, boxes_xyxy=boxes,
        labels=np.array([1, 2, 3]), attributes=np.zeros((3, 7), dtype=np.int64),
        regions_xyxy=np.array([[0, 0, 200, 160]], dtype=np.float32), image_id=image_id,
    )


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.4])
def test_rectangle_has_requested_area_and_fits(fraction: float) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        x1, y1, x2, y2 = sparse_rectangle(200, 160, fraction, rng)
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 160
        assert (x2 - x1) * (y2 - y1) == pytest.approx(fraction * 200 * 160, rel=1e-4)


def test_same_rectangle_every_epoch_and_boxes_outside_dropped() -> None:
    record = _record()
    first = simulate_sparse(record, 0.2, seed=7)
    again = simulate_sparse(record, 0.2, seed=7)
    np.testing.assert_array_equal(first.regions_xyxy, again.regions_xyxy)
    other_seed = simulate_sparse(record, 0.2, seed=8)
    assert not np.array_equal(first.regions_xyxy, other_seed.regions_xyxy)
    other_image = simulate_sparse(dataclasses.replace(record, image_id=4), 0.2, seed=7)
    assert not np.array_equal(first.regions_xyxy, other_image.regions_xyxy)
    (rx1, ry1, rx2, ry2), = first.regions_xyxy
    centres = (record.boxes_xyxy[:, :2] + record.boxes_xyxy[:, 2:]) / 2
    inside = (centres[:, 0] >= rx1) & (centres[:, 0] < rx2) & (centres[:, 1] >= ry1) & (centres[:, 1] < ry2)
    np.testing.assert_array_equal(first.boxes_xyxy, record.boxes_xyxy[inside])
    np.testing.assert_array_equal(first.labels, record.labels[inside])
    assert first.attributes.shape == (int(inside.sum()), 7)


def test_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        sparse_rectangle(10, 10, 0.0, np.random.default_rng(0))
