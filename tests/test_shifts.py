"""The shifted-microscopes suite: deterministic, same size, boxes follow the pixels, severities
grow."""

from __future__ import annotations

import numpy as np
import pytest

from lld_lightning.data.shifts import (
    SCALE_FACTORS,
    SEVERITIES,
    SHIFTS,
    apply_shift,
    background_colour,
    disk_kernel,
    shift_seed,
)

BACKGROUND = (230, 215, 220)
DISK = (70, 40, 120)


def field(centre: tuple[float, float], radius: float, size: tuple[int, int] = (120, 160)):
    """A light field with one dark disk: (uint8 [H, W, 3] image, its [1, 4] box)."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[inside] = DISK
    x, y = centre
    return image, np.array([[x - radius, y - radius, x + radius, y + radius]], dtype=np.float32)


def textured(seed: int = 0, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """A mid-grey image with fine detail, so blur and compression have something to remove."""
    rng = np.random.default_rng(seed)
    return rng.integers(60, 200, size=(*size, 3), dtype=np.uint8)


def dark_centroid_and_extent(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) and [x1, y1, x2, y2] of the dark pixels."""
    dark = image.astype(float).mean(axis=2) < 150
    ys, xs = np.nonzero(dark)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    return centroid, extent


@pytest.mark.parametrize("name", SHIFTS)
def test_every_shift_is_deterministic_and_keeps_the_image_size(name: str) -> None:
    image, boxes = field((80, 60), 12)
    labels = np.array([3])
    for severity in SEVERITIES:
        seed = shift_seed(name, severity, 0)
        first = apply_shift(name, severity, image, boxes, labels, seed)
        again = apply_shift(name, severity, image, boxes, labels, seed)
        assert first.image.shape == image.shape and first.image.dtype == np.uint8
        assert np.array_equal(first.image, again.image)
        assert np.array_equal(first.boxes_xyxy, again.boxes_xyxy)
        assert first.labels.tolist() == [3] and first.keep.tolist() == [True]
        assert not np.array_equal(first.image, image)
        zooms = name in ("scale", "all")
        assert first.cell_scale == pytest.approx(
            SCALE_FACTORS[severity] if zooms else 1.0, rel=0.02
        )


def test_seeds_differ_per_shift_severity_and_image() -> None:
    seeds = {shift_seed(n, s, i) for n in SHIFTS for s in SEVERITIES for i in range(3)}
    assert len(seeds) == len(SHIFTS) * len(SEVERITIES) * 3
    image = textured()
    no_boxes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    one = apply_shift("low_light", 2, image, *no_boxes, seed=1).image
    other = apply_shift("low_light", 2, image, *no_boxes, seed=2).image
    assert not np.array_equal(one, other)


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("centre", [(80, 60), (70, 52), (90, 66)])
def test_scale_moves_the_box_with_the_cell(severity: int, centre: tuple[float, float]) -> None:
    image, boxes = field(centre, 14)
    out = apply_shift("scale", severity, image, boxes, np.array([0]), seed=0)
    factor = SCALE_FACTORS[severity]
    box = out.boxes_xyxy[0]
    centroid, extent = dark_centroid_and_extent(out.image)
    assert np.allclose(centroid, [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], atol=0.6)
    assert np.allclose(extent, box, atol=1.5)
    assert box[2] - box[0] == pytest.approx(28 * factor, rel=0.03)


def test_zoom_out_fills_the_border_with_the_background_colour() -> None:
    image, boxes = field((80, 60), 14)
    out = apply_shift("scale", 3, image, boxes, np.array([0]), seed=0)
    assert out.image[0, 0].tolist() == list(BACKGROUND)
    assert background_colour(out.image).tolist() == list(BACKGROUND)


def test_zoom_in_clips_a_cut_cell_and_drops_a_mostly_hidden_one() -> None:
    # At 1.6x about the centre (80, 60), x maps to (x - 30) * 1.6 and y to (y - 22.5) * 1.6.
    image = np.full((120, 160, 3), BACKGROUND, dtype=np.uint8)
    boxes = np.array(
        [
            [22, 50, 42, 70],  # 60 % visible (x 30..42 of 22..42): kept, clipped
            [10, 50, 34, 70],  # 4 of 24 px visible: dropped
            [70, 50, 90, 70],  # inside: kept whole
        ],
        dtype=np.float32,
    )
    out = apply_shift("scale", 1, image, boxes, np.array([0, 1, 2]), seed=0)
    assert out.keep.tolist() == [True, False, True]
    assert out.labels.tolist() == [0, 2]
    assert out.boxes_xyxy[0].tolist() == pytest.approx([0.0, 44.0, 19.2, 76.0])
    assert out.boxes_xyxy[1].tolist() == pytest.approx([64.0, 44.0, 96.0, 76.0])


def test_all_applies_every_shift_and_keeps_scales_boxes() -> None:
    image, boxes = field((80, 60), 14)
    out = apply_shift("all", 2, image, boxes, np.array([0]), seed=5)
    scaled = apply_shift("scale", 2, image, boxes, np.array([0]), seed=5)
    assert np.array_equal(out.boxes_xyxy, scaled.boxes_xyxy)
    assert out.encoded is not None  # JPEG is the last step
    assert out.image.astype(float).mean() < scaled.image.astype(float).mean() - 20  # low light


def _statistic(name: str, image: np.ndarray, shifted: np.ndarray) -> float:
    """A number each shift makes worse as severity grows (larger = worse)."""
    ref, out = image.astype(float), shifted.astype(float)
    if name == "defocus":  # detail lost: less gradient energy
        return -np.abs(np.diff(out, axis=1)).mean()
    if name == "vignetting":  # corners darker than the centre
        h, w = out.shape[:2]
        return out[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean() - out[:8, :8].mean()
    if name == "low_light":
        return -out.mean()
    return np.abs(out - ref).mean()  # colour, jpeg: further from the original


@pytest.mark.parametrize("name", ["colour", "defocus", "vignetting", "low_light", "jpeg"])
def test_severities_are_monotone(name: str) -> None:
    for index in range(3):
        image = (
            textured(index) if name in ("defocus", "jpeg") else np.full((96, 128, 3), 200, np.uint8)
        )
        no_boxes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        values = [
            _statistic(
                name,
                image,
                apply_shift(name, s, image, *no_boxes, shift_seed(name, s, index)).image,
            )
            for s in SEVERITIES
        ]
        assert values[0] < values[1] < values[2], (name, index, values)


def test_disk_kernel_is_a_normalised_round_pillbox() -> None:
    kernel = disk_kernel(3.0)
    assert kernel.shape == (7, 7)
    assert kernel.sum() == pytest.approx(1.0)
    assert np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1])
    assert kernel[3, 3] == kernel.max() and kernel[0, 0] == 0.0


def test_bad_input_is_one_clear_error() -> None:
    image, boxes = field((80, 60), 12)
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        apply_shift("fog", 1, image, boxes, np.array([0]), seed=0)
    with pytest.raises(ValueError, match="severity must be one of"):
        apply_shift("jpeg", 4, image, boxes, np.array([0]), seed=0)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        apply_shift("jpeg", 1, image.astype(np.float32), boxes, np.array([0]), seed=0)
    with pytest.raises(ValueError, match="1 boxes and 2 labels"):
        apply_shift("jpeg", 1, image, boxes, np.array([0, 1]), seed=0)
