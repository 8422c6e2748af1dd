"""The pixel size measured from red cells: drawn films with known sizes, and a real PBC field
resized to half and twice its size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lld_lightning.constants import RED_CELL_DIAMETER_UM
from lld_lightning.data.red_cells import (
    NoRedCellsError,
    estimate_pixel_size,
    median_red_cell_diameter,
    red_cell_diameters,
)
from tests.test_scale import PBC_IMAGE

BACKGROUND = (236, 226, 220)
RED_CELL = (205, 150, 160)
PALLOR = (226, 206, 206)
NUCLEUS = (90, 50, 140)


def _film(
    diameter: float, size: tuple[int, int] = (480, 360), seed: int = 0, ring: bool = False
) -> np.ndarray:
    """A drawn film: red cells of ``diameter`` px with pale centres (some touching, some cut by
    the border), one white cell twice as large, platelet-sized specks, camera noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    radius = diameter / 2
    centres = []
    while len(centres) < 14:
        x = rng.uniform(-radius / 2, width + radius / 2)
        y = rng.uniform(-radius / 2, height + radius / 2)
        if all(math.hypot(x - a, y - b) > 1.9 * radius for a, b in centres):
            centres.append((x, y))
    for x, y in centres:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=RED_CELL)
        draw.ellipse([x - radius / 3, y - radius / 3, x + radius / 3, y + radius / 3], fill=PALLOR)
    x, y = width / 2, height / 2
    draw.ellipse([x - diameter, y - diameter, x + diameter, y + diameter], fill=(190, 170, 210))
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=NUCLEUS)
    for _ in range(6):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=NUCLEUS)
    pixels = np.asarray(image).astype(np.float32)
    if ring:  # the round field stop of a microscope photographed through the eyepiece
        yy, xx = np.mgrid[:height, :width]
        outside = np.hypot(xx - width / 2, yy - height / 2) > 0.48 * min(width, height) + 0.3 * width
        pixels[outside] = 25.0
    pixels += rng.normal(0.0, 2.0, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _drawn(diameter: float) -> object:
    """What a drawn disc measures: PIL fills ``diameter + 1`` pixels, and the threshold lies
    near the light side of the (smoothed) edge, a pixel or so outside it."""
    return pytest.approx(diameter + 1, rel=0.06, abs=2.5)


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("diameter", [24.0, 40.0, 80.0])
def test_drawn_red_cells_are_measured_within_a_few_percent(diameter: float) -> None:
    size = (int(12 * diameter), int(9 * diameter))
    films = [_tensor(_film(diameter, size=size, seed=s)) for s in range(3)]
    estimate = estimate_pixel_size(films)
    assert estimate.diameter_px == _drawn(diameter)
    assert estimate.pixel_size_um == pytest.approx(RED_CELL_DIAMETER_UM / estimate.diameter_px)
    assert estimate.images == 3 and estimate.cells >= 20


def test_a_dark_field_stop_around_the_film_is_not_a_cell() -> None:
    films = [_tensor(_film(40.0, seed=s, ring=True)) for s in range(3)]
    assert estimate_pixel_size(films).diameter_px == _drawn(40.0)


def test_a_flat_border_is_not_a_cell() -> None:
    # A film shrunk onto a uniform canvas (what a letterbox or a montage leaves around it).
    canvas = np.full((720, 960, 3), 190, dtype=np.uint8)
    canvas[180:540, 240:720] = _film(20.0)
    assert estimate_pixel_size([_tensor(canvas)]).diameter_px == _drawn(20.0)


def test_images_without_cells_are_refused() -> None:
    blank = torch.full((3, 200, 300), 230, dtype=torch.uint8)
    assert red_cell_diameters(blank).numel() == 0
    assert math.isnan(median_red_cell_diameter(torch.zeros(0)))
    with pytest.raises(NoRedCellsError, match="give the pixel size"):
        estimate_pixel_size([blank, blank])
    with pytest.raises(ValueError, match=r"RGB image \[3, H, W\]"):
        red_cell_diameters(torch.zeros(200, 300, dtype=torch.uint8))


def test_only_evenly_spaced_images_up_to_the_limit_are_measured() -> None:
    films = [_tensor(_film(30.0, seed=s)) for s in range(5)]
    assert estimate_pixel_size(films, max_images=2).images == 2


def _pbc_copies() -> dict[float, torch.Tensor]:
    if not Path(PBC_IMAGE).is_file():
        pytest.skip("TXL-PBC is not beside the checkout")
    image = Image.open(PBC_IMAGE).convert("RGB")
    return {
        factor: _tensor(
            np.asarray(
                image.resize(
                    (round(image.width * factor), round(image.height * factor)), Image.BICUBIC
                )
            )
        )
        for factor in (0.5, 1.0, 2.0)
    }


def test_a_real_field_gives_one_physical_size_at_half_one_and_twice_the_resolution() -> None:
    # configs/txl.yaml's PBC pixel size (7.5 um over the median red-cell box side of the source).
    pbc_um = 0.1064
    estimates = {f: estimate_pixel_size([copy]).pixel_size_um for f, copy in _pbc_copies().items()}
    for factor, value in estimates.items():
        # Pixels twice as many: micrometres per pixel half as many, within a few percent.
        assert value * factor == pytest.approx(estimates[1.0], rel=0.06)
    assert estimates[1.0] == pytest.approx(pbc_um, rel=0.15)
