"""A microscope's pixel size measured from its red cells, without a model.

Red cells are the commonest object of a blood film and about the same size in every healthy adult
(`RED_CELL_DIAMETER_UM`), so their median diameter in pixels gives the micrometres per pixel.
The measurement is classical image analysis, so it cannot be fooled the way a detector run at the
wrong scale is (a detector finds objects of its favourite size at any scale):

1. the green channel (haemoglobin and stain absorb it) divided by the local background light, so
   vignetting, uneven illumination and flat borders do not count as cells;
2. Otsu's threshold, taken again above the first when that one only split off dark nuclei;
3. holes filled (a red cell's pale centre is inside the cell), connected components labelled;
4. each component's area and largest inscribed radius (a distance transform): a round component
   (area close to the disc of that radius) is one cell, of diameter ``2 sqrt(area / pi)``; a
   component cut by the image border is measured by its inscribed radius; clumps, rings and
   streaks are not round and are ignored;
5. the diameter is the median of the round components after dropping specks (below
   `SPECK_FRACTION` of the area-weighted median): white cells are larger but far fewer.

One image has few whole red cells, so `estimate_pixel_size` pools the components of several
images of one microscope. The accuracy on TXL-PBC's four sources is in docs/results.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.contrib import connected_components_union_find
from kornia.filters import otsu_threshold
from torch import Tensor

from lld_lightning.constants import RED_CELL_DIAMETER_UM

#: The value of a pixel size option (``lld predict --pixel_size_um``, `Predictor`'s
#: ``pixel_size_um``) that asks for it to be measured from the images' red cells.
AUTO_PIXEL_SIZE: str = "auto"
#: Images are measured with their longer side at most this many pixels (cells stay tens of
#: pixels wide at every magnification a blood film is read at; the cost stays a fraction of a
#: second an image).
MEASURE_SIDE: int = 512
#: Components smaller than this many pixels (at the measured size) are dust and noise.
MIN_AREA: int = 30
#: Pixels whose 5 x 5 neighbourhood varies less than this (grey levels) are a flat fill (padding,
#: a burnt-in frame), never a cell or the film: every camera adds more noise than this.
FLAT_STD: float = 0.5
#: Largest hole filled, as a share of the field: a cell's pale centre is far smaller.
MAX_HOLE: float = 0.03
#: Area over the disc of the largest inscribed radius that still counts as one round cell: an
#: ellipse of axis ratio 1.7 passes, two touching cells (about 2) do not.
ROUNDNESS: tuple[float, float] = (0.6, 1.7)
#: A component cut by the border keeps at least this share of its inscribed disc's area.
MIN_CUT_SHARE: float = 0.45
#: The octagonal distance (alternating square and cross erosions) of a disc's centre is about
#: this share of its Euclidean radius.
OCTAGONAL_RADIUS: float = 0.9
#: Components below this share of the area-weighted median diameter are specks (platelets, dust).
SPECK_FRACTION: float = 0.4
#: Most images `estimate_pixel_size` measures (evenly spaced through the ones given).
MAX_IMAGES: int = 16


@dataclass(frozen=True)
class PixelSizeEstimate:
    """What `estimate_pixel_size` measured.

    Attributes:
        pixel_size_um: micrometres per pixel of the measured images.
        diameter_px: median red-cell diameter in the images' pixels.
        cells: how many round components were measured (red cells, and the few white cells and
            specks the median leaves aside).
        images: how many images were measured.
    """

    pixel_size_um: float
    diameter_px: float
    cells: int
    images: int


def pixel_size_option(value: object, working_pixel_size: float | None) -> float | str:
    """A pixel-size option (``--pixel_size_um`` of ``lld predict`` and ``lld adapt``,
    `Predictor`'s ``pixel_size_um``) checked: `AUTO_PIXEL_SIZE`, or a positive number of
    micrometres per pixel (returned as a float).

    Raises:
        ValueError: the model has no working resolution (``working_pixel_size`` None: it
            letterboxes, so a pixel size would change nothing), or the value is neither.
    """
    if working_pixel_size is None:
        raise ValueError(
            "this model has no working resolution (its data.pixel_size.working is null: it "
            "letterboxes every image), so a pixel size changes nothing; train with "
            "data.pixel_size.working set"
        )
    if value == AUTO_PIXEL_SIZE:
        return AUTO_PIXEL_SIZE
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0:
        raise ValueError(
            f"pixel_size_um must be a positive number or {AUTO_PIXEL_SIZE!r}, got {value!r}"
        )
    return number


class NoRedCellsError(ValueError):
    """No round cells were found in the images: the pixel size has to be given."""


def red_cell_diameters(image: Tensor) -> Tensor:
    """Diameters in pixels of the round cells (and cut cells) of one image.

    Args:
        image: uint8 ``[3, H, W]`` RGB.

    Returns:
        float32 ``[N]`` diameters in the image's own pixels, N >= 0 (white cells and platelets
        included: `median_red_cell_diameter` separates them).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    factor = min(1.0, MEASURE_SIDE / max(height, width))
    green = image[1].float().contiguous()[None, None]  # a strided view makes every pass slow
    if factor < 1.0:
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        green = F.interpolate(green, size=size, mode="bilinear", antialias=True)
    flat = _local_std(green) < FLAT_STD
    green = F.avg_pool2d(green, 3, 1, 1, count_include_pad=False)
    relative = _flatten(green)[0, 0]
    textured = relative[~flat[0, 0]]
    if textured.numel() == 0:
        return torch.zeros(0)
    mask = _fill_holes((relative <= _threshold(textured)) & ~flat[0, 0])
    return _round_components(mask) / factor


def median_red_cell_diameter(diameters: Tensor) -> float:
    """The red-cell diameter among the components of `red_cell_diameters` (one or more images):
    the median after dropping specks; NaN when there are none."""
    if diameters.numel() == 0:
        return math.nan
    weights = diameters**2  # by area: cells outweigh specks, a speck cannot set the bar
    order = torch.argsort(diameters)
    cumulative = torch.cumsum(weights[order], 0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] / 2).clamp(max=len(order) - 1))
    big = diameters[order][index]
    return float(diameters[diameters >= SPECK_FRACTION * big].median())


def estimate_pixel_size(
    images: Iterable[Tensor], max_images: int = MAX_IMAGES
) -> PixelSizeEstimate:
    """The pixel size of images from one microscope, from their red cells.

    Args:
        images: uint8 ``[3, H, W]`` RGB images, all from one microscope and camera (a sequence;
            an iterator is read whole).
        max_images: at most this many, evenly spaced through them, are measured.

    Returns:
        The `PixelSizeEstimate` (micrometres per pixel of the images as given).

    Raises:
        NoRedCellsError: no round cells in any of the images.
    """
    images = evenly_spaced(list(images), max_images)
    diameters = [red_cell_diameters(image) for image in images]
    pooled = torch.cat(diameters) if diameters else torch.zeros(0)
    diameter = median_red_cell_diameter(pooled)
    if not diameter > 0:
        raise NoRedCellsError(
            f"found no round cells to measure in {len(images)} image(s): give the pixel size"
        )
    return PixelSizeEstimate(
        pixel_size_um=RED_CELL_DIAMETER_UM / diameter,
        diameter_px=diameter,
        cells=int(pooled.numel()),
        images=len(images),
    )


def evenly_spaced(items: list, limit: int) -> list:
    """At most ``limit`` of ``items``, evenly spaced from the first (all when there are fewer)."""
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


# ------------------------------------------------------------------------------------ steps
def _flatten(green: Tensor) -> Tensor:
    """``[1, 1, H, W]`` light over the local background light (1 = background): the background
    is the brightest light within a quarter of the shorter side, smoothed (at an eighth of the
    resolution, where the window is cheap)."""
    height, width = green.shape[-2:]
    small = F.adaptive_avg_pool2d(green, (max(1, height // 8), max(1, width // 8)))
    k = max(3, min(small.shape[-2:]) // 4) | 1  # odd
    pad = (k // 2,) * 4
    background = F.max_pool2d(F.pad(small, pad, mode="replicate"), k, 1)
    background = F.avg_pool2d(F.pad(background, pad, mode="replicate"), k, 1)
    background = F.interpolate(background, size=(height, width), mode="bilinear")
    return green / background.clamp(min=1.0)


def _local_std(green: Tensor) -> Tensor:
    """Standard deviation of the grey level over 5 x 5 pixels."""
    mean = F.avg_pool2d(green, 5, 1, 2, count_include_pad=False)
    square = F.avg_pool2d(green**2, 5, 1, 2, count_include_pad=False)
    return (square - mean**2).clamp(min=0).sqrt()


def _threshold(values: Tensor) -> float:
    """Cells are this dark or darker. Otsu's cut, unless it only split off the darkest stain (the
    nuclei of a white-cell close-up): then under a fifth of the field lies below it, and a second
    cut above it separates a further tenth or more of the field (the red cells) from the light."""
    values = values.flatten()
    cut = _otsu(values)
    below = float((values <= cut).float().mean())
    if below < 0.2:
        second = _otsu(values[values > cut])
        if float((values <= second).float().mean()) - below >= 0.1:
            cut = second
    return cut


def _otsu(values: Tensor) -> float:
    """Otsu's threshold of a 1-D tensor: the values at or below it are one class."""
    return float(otsu_threshold(values[None])[1])


def _fill_holes(mask: Tensor) -> Tensor:
    """``mask`` with its small holes filled (a red cell's pale centre): background components
    that do not touch the border, below `MAX_HOLE` of the field. A larger enclosed region is the
    field inside a dark ring (a round field stop, a padded border) and stays background."""
    labels = _labels(~mask)
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    area = torch.bincount(labels.flatten())
    holes = (labels > 0) & ~torch.isin(labels, border)
    return mask | (holes & (area[labels] <= MAX_HOLE * mask.numel()))


def _labels(mask: Tensor) -> Tensor:
    """Connected components (8-connected) of ``mask``: int64 ``[H, W]``, 0 = background."""
    return connected_components_union_find(mask.to(torch.uint8)[None, None])[0, 0]


def _distance(mask: Tensor) -> Tensor:
    """Octagonal distance of each mask pixel to the background (alternating square and cross
    erosions); outside the image counts as mask, so a cell cut by the border keeps its radius."""
    current = mask.float()[None, None]
    distance = torch.zeros_like(current)
    for step in range(max(current.shape[-2:])):  # any mask is eroded away by then
        if not bool(current.any()):
            break
        distance += current
        padded = F.pad(current, (1, 1, 1, 1), value=1.0)
        if step % 2 == 0:
            current = -F.max_pool2d(-padded, 3, 1)
        else:
            centre = padded[..., 1:-1, 1:-1]
            current = torch.minimum(
                torch.minimum(centre, torch.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])),
                torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]),
            )
    return distance[0, 0]


def _round_components(mask: Tensor) -> Tensor:
    """Diameters of the round components of ``mask`` (see the module docstring, step 4)."""
    labels = _labels(mask)
    distance = _distance(mask)
    border = torch.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    ids, index = torch.unique(labels, return_inverse=True)
    index = index.flatten()
    count = len(ids)
    area = torch.bincount(index, minlength=count).float()
    radius = torch.zeros(count).scatter_reduce(0, index, distance.flatten(), "amax")
    radius = radius / OCTAGONAL_RADIUS
    cut = torch.zeros(count).scatter_reduce(0, index, border.flatten().float(), "amax") > 0
    share = area / (math.pi * radius.clamp(min=1.0) ** 2)
    usable = (ids > 0) & (area >= MIN_AREA)
    whole = usable & ~cut & (share >= ROUNDNESS[0]) & (share <= ROUNDNESS[1])
    partial = usable & cut & (share >= MIN_CUT_SHARE) & (share <= ROUNDNESS[1])
    diameter = torch.where(whole, 2 * torch.sqrt(area / math.pi), 2 * radius)
    return diameter[whole | partial]
