"""Mosaic: four augmented images of a batch tiled into one, cells and regions cut with them.

Applied by `DeviceAugmentation` (``mosaic`` = probability per image) after each image's own
geometry and photometry, so every tile is already an augmented ``S x S`` view. For a mosaic image
``b`` a centre ``(cx, cy)`` splits the canvas into four quadrants (top-left, top-right,
bottom-left, bottom-right); quadrant ``q`` shows an equally sized window of image
``partners[b, q]`` (``partners[b, 0] == b``) at that image's own resolution, so cell sizes do not
change. Windows are placed inside the image's content where it is large enough (else they cover
all of it), so tiles are letterbox fill only where an image has less content than the window.

Cells are shifted with their tile, clipped to the quadrant and dropped by the same visibility and
size rules as the geometric augmentation. Annotated regions are cut the same way, so a mosaic of
sparse images has up to four region pieces and everything outside them stays unknown; the
letterbox fill inside a tile lies outside every region, as before.

A mosaic image has no single map back to an original image: ``batch["mosaic"]`` (bool ``[B]``)
marks those rows, and their ``transform`` is the top-left tile's. Consumers that need the map
(the pseudo-labeller's teacher view) refuse mosaics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.sample import pack_per_image


@dataclass
class MosaicParams:
    """Where each output image's four tiles come from (CPU tensors, batch size ``B``).

    Attributes:
        use: bool ``[B]``, this row becomes a mosaic; other rows pass through unchanged.
        partners: int64 ``[B, 4]``, the batch image shown in each quadrant (top-left, top-right,
            bottom-left, bottom-right); column 0 is the row itself.
        centre: int64 ``[B, 2]``, ``(cx, cy)`` in output pixels where the quadrants meet.
        source: int64 ``[B, 4, 2]``, top-left ``(x, y)`` of each quadrant's window in its image.
    """

    use: Tensor
    partners: Tensor
    centre: Tensor
    source: Tensor


def quadrants(centre: Tensor, size: int) -> Tensor:
    """The four quadrant rectangles of each image: int64 xyxy ``[B, 4, 4]``."""
    cx, cy = centre[:, 0], centre[:, 1]
    zero, full = torch.zeros_like(cx), torch.full_like(cx, size)
    return torch.stack(
        [
            torch.stack([zero, zero, cx, cy], -1),
            torch.stack([cx, zero, full, cy], -1),
            torch.stack([zero, cy, cx, full], -1),
            torch.stack([cx, cy, full, full], -1),
        ],
        dim=1,
    )


def sample_mosaic(
    probability: float,
    bounds: Tensor,
    size: int,
    centre_range: tuple[float, float] = (0.25, 0.75),
    generator: torch.Generator | None = None,
) -> MosaicParams:
    """Random mosaic parameters for a batch.

    Args:
        probability: chance that a row becomes a mosaic.
        bounds: float ``[B, 4]`` xyxy content box of each (augmented) image in output pixels.
        size: side ``S`` of the images.
        centre_range: where the quadrants meet, as fractions of ``S`` (uniform per axis).
        generator: CPU generator for reproducible draws.
    """
    batch_size = bounds.shape[0]
    use = torch.rand(batch_size, generator=generator) < probability
    others = torch.randint(0, batch_size, (batch_size, 3), generator=generator)
    rows = torch.arange(batch_size)
    partners = torch.where(use[:, None], torch.cat([rows[:, None], others], 1), rows[:, None])
    low, high = centre_range
    centre = (size * (low + (high - low) * torch.rand(batch_size, 2, generator=generator))).long()
    centre = torch.where(use[:, None], centre.clamp(0, size), size)
    rect = quadrants(centre, size)
    window = rect[..., 2:] - rect[..., :2]  # [B, 4, 2] (w, h)
    content = bounds.detach().float().cpu()[partners]  # [B, 4, 4]
    # A window inside the content where it fits, else covering it; always inside the canvas.
    first = (content[..., :2].floor().long()).clamp(min=0)
    last = (content[..., 2:].ceil().long() - window).clamp(min=0)
    first, last = first.minimum(size - window), last.minimum(size - window)
    low_corner, high_corner = torch.minimum(first, last), torch.maximum(first, last)
    u = torch.rand(batch_size, 4, 2, generator=generator)
    source = low_corner + (u * (high_corner - low_corner + 1)).long().minimum(
        high_corner - low_corner
    )
    source = torch.where(use[:, None, None], source, 0)
    return MosaicParams(use=use, partners=partners, centre=centre, source=source)


def _cut(boxes: Tensor, shift: Tensor, rect: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shift ``[B, 4, N, 4]`` boxes by ``[B, 4, 2]`` and clip them to ``[B, 4, 4]`` rectangles;
    returns the clipped boxes, their visible area and the unclipped area."""
    moved = boxes + shift.repeat(1, 1, 2)[:, :, None, :]
    low = rect[:, :, None, :2].repeat(1, 1, 1, 2)
    high = rect[:, :, None, 2:].repeat(1, 1, 1, 2)
    clipped = torch.maximum(torch.minimum(moved, high), low)
    width, height = clipped[..., 2] - clipped[..., 0], clipped[..., 3] - clipped[..., 1]
    area = (moved[..., 2] - moved[..., 0]) * (moved[..., 3] - moved[..., 1])
    return clipped, width.clamp(min=0) * height.clamp(min=0), area


def apply_mosaic(
    batch: dict[str, Any], params: MosaicParams, min_visibility: float, min_size: float
) -> dict[str, Any]:
    """Tile the rows of an augmented batch as ``params`` says.

    Args:
        batch: `DeviceAugmentation` output: ``image`` float ``[B, 3, S, S]``, ``boxes``,
            ``labels``, ``attributes``, ``regions``, ``region_valid`` in output pixels.
        params: from `sample_mosaic` (or fixed, in tests).
        min_visibility: drop a cell whose part inside its quadrant is below this fraction of it.
        min_size: drop a cell whose visible width or height is below this many pixels.

    Returns:
        A new dict: the tiled ``image``; per row the kept cells of its four tiles in quadrant
        order, padded to the longest row with ``IGNORE_INDEX`` and zero boxes, and the region
        pieces likewise (``region_valid`` False for padding); ``mosaic`` bool ``[B]``. Other keys
        are unchanged.
    """
    images = batch["image"]
    device, size = images.device, images.shape[-1]
    out = dict(batch)
    out["mosaic"] = params.use.to(device)
    if not bool(params.use.any()):
        return out
    rect = quadrants(params.centre, size)  # [B, 4, 4] CPU
    tiled = images.clone()
    for row in torch.nonzero(params.use)[:, 0].tolist():
        for quadrant in range(4):
            x0, y0, x1, y1 = rect[row, quadrant].tolist()
            if x1 <= x0 or y1 <= y0:
                continue
            sx, sy = params.source[row, quadrant].tolist()
            partner = int(params.partners[row, quadrant])
            tiled[row, :, y0:y1, x0:x1] = images[partner, :, sy : sy + y1 - y0, sx : sx + x1 - x0]
    out["image"] = tiled

    partners = params.partners.to(device)
    rect_d = rect.to(device=device, dtype=torch.float32)
    shift = rect_d[..., :2] - params.source.to(device=device, dtype=torch.float32)  # [B, 4, 2]
    batch_size = partners.shape[0]

    labels = batch["labels"][partners]  # [B, 4, M]
    boxes, visible, area = _cut(batch["boxes"].float()[partners], shift, rect_d)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    keep = (
        (labels != IGNORE_INDEX)
        & (area > 0)
        & (visible > 0)
        & (visible >= min_visibility * area)
        & (width >= min_size)
        & (height >= min_size)
    )
    attributes = batch["attributes"][partners]  # [B, 4, M, A]; A may be 0
    cells = 4 * labels.shape[-1]
    row, column = keep.reshape(batch_size, cells).nonzero(as_tuple=True)  # row-major: rows sorted
    packed = pack_per_image(
        {
            "boxes": boxes.reshape(batch_size, cells, 4)[row, column],
            "labels": labels.reshape(batch_size, cells)[row, column],
            "attributes": attributes.reshape(batch_size, cells, attributes.shape[-1])[row, column],
        },
        row,
        batch_size,
    )
    kept = packed["valid"]
    out["boxes"] = packed["boxes"]
    out["labels"] = torch.where(kept, packed["labels"], IGNORE_INDEX)
    out["attributes"] = torch.where(kept[..., None], packed["attributes"], IGNORE_INDEX)

    regions, region_area, _ = _cut(batch["regions"].float()[partners], shift, rect_d)
    valid = (batch["region_valid"][partners] & (region_area > 0)).reshape(batch_size, -1)
    row, column = valid.nonzero(as_tuple=True)
    packed = pack_per_image(
        {"regions": regions.reshape(batch_size, -1, 4)[row, column]}, row, batch_size, min_width=1
    )
    out["regions"] = packed["regions"]
    out["region_valid"] = packed["valid"]
    return out
