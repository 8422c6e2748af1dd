"""Estimate a microscope's pixel size (micrometres per pixel) from its images and a trained model.

A model trained at a working resolution (``data.pixel_size.working``) has seen cells at one size in
pixels (with the small scale jitter of training). Resampled with the right pixel size, a field's
cells look like that, and the model finds them, confidently; resampled too small they shrink below
what it learnt, too large they grow past it, and its confidence falls. The search therefore resamples
a few images at candidate pixel sizes, scores each by the summed confidence of the cells found, and
takes the best: a coarse pass over a factor of 16 (half-octave steps), a fine pass in eighth-octave
steps around the best, and a parabola through the best three points (in log scale).

Each image counts equally (its scores are divided by its own best); an image larger than
`MAX_SEARCH_SIDE` output pixels at a candidate is cut to its centre (a blood film has cells all
over, and the cost stays bounded at large candidates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lld_lightning.data.sample import Batch, collate
from lld_lightning.data.transforms import DeviceAugmentation

#: Resampling factors (output pixels per image pixel) of the coarse pass, relative to the working
#: resolution: 1/4x to 4x in half-octave steps.
COARSE_FACTORS: tuple[float, ...] = tuple(2.0 ** (k / 2) for k in range(-4, 5))
#: Offsets, in octaves, of the fine pass around the coarse pass's best factor.
FINE_OCTAVES: tuple[float, ...] = (-0.375, -0.25, -0.125, 0.125, 0.25, 0.375)
#: Largest side, in output pixels, of an image during the search (larger: its centre is used).
MAX_SEARCH_SIDE: int = 768
#: Images of the search (spread evenly over those given).
MAX_SEARCH_IMAGES: int = 8
#: Images per detect call of the search.
SEARCH_BATCH: int = 4

#: ``detect(batch) -> (view, detections)``: transforms a collated batch and detects (each
#: detection a dict with at least ``scores``).
DetectFn = Callable[[Batch], tuple[Batch, list[dict[str, Tensor]]]]


@dataclass(frozen=True)
class PixelSizeEstimate:
    """The estimated pixel size and the evidence for it.

    Attributes:
        pixel_size_um: micrometres per pixel of the images.
        curve: candidate pixel size -> mean relative confidence (1 = every image's best), sorted.
        num_images: images the estimate used (those where the model found anything).
    """

    pixel_size_um: float
    curve: dict[float, float]
    num_images: int


def _centre_crop(image: Tensor, side: float) -> Tensor:
    """The centre of a ``[3, H, W]`` image, at most ``side`` pixels each way."""
    height, width = image.shape[-2:]
    crop_h, crop_w = min(height, max(1, int(side))), min(width, max(1, int(side)))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[:, top : top + crop_h, left : left + crop_w]


def _confidence(
    detect: DetectFn, images: Sequence[Tensor], pixel_size_um: float, factor: float, min_score: float
) -> list[float]:
    """Summed score of the detections at or above ``min_score`` of each image at one candidate."""
    crops = [_centre_crop(image, MAX_SEARCH_SIDE / factor) for image in images]
    totals: list[float] = []
    for start in range(0, len(crops), SEARCH_BATCH):
        chunk = crops[start : start + SEARCH_BATCH]
        batch = collate(
            [
                {
                    "image": crop,
                    "boxes": torch.zeros((0, 4)),
                    "labels": torch.zeros((0,), dtype=torch.int64),
                    "attributes": torch.zeros((0, 0), dtype=torch.int64),
                    "regions": torch.zeros((0, 4)),
                    "domain": "",
                    "image_id": i,
                    "path": "",
                    "pixel_size_um": pixel_size_um,
                }
                for i, crop in enumerate(chunk)
            ]
        )
        _, detections = detect(batch)
        for found in detections:
            scores = found["scores"].float()
            totals.append(float(scores[scores >= min_score].sum()))
    return totals


def _refine(factors: list[float], values: list[float]) -> float:
    """The peak of a parabola through the best point and its neighbours, in log2 of the factor."""
    order = sorted(range(len(factors)), key=lambda i: factors[i])
    logs = [math.log2(factors[i]) for i in order]
    ys = [values[i] for i in order]
    best = max(range(len(ys)), key=lambda i: ys[i])
    if best == 0 or best == len(ys) - 1:
        return 2.0 ** logs[best]
    (x0, x1, x2), (y0, y1, y2) = logs[best - 1 : best + 2], ys[best - 1 : best + 2]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denominator
    if a >= 0:  # not a peak
        return 2.0 ** logs[best]
    return 2.0 ** min(max(-b / (2 * a), x0), x2)


def estimate_pixel_size(
    detect: DetectFn,
    images: Sequence[Tensor],
    transform: DeviceAugmentation,
    min_score: float = 0.3,
) -> PixelSizeEstimate:
    """Estimate the micrometres per pixel of images taken with one microscope and camera.

    Args:
        detect: transforms a collated batch with ``transform`` and detects (see `DetectFn`).
        images: uint8 ``[3, H, W]`` images (at most `MAX_SEARCH_IMAGES`, spread evenly, are used).
        transform: the model's evaluation transform; its ``working_pixel_size`` must be set.
        min_score: detections below this score do not count.

    Raises:
        ValueError: no images, no working resolution, or no cell found at any candidate.
    """
    working = transform.working_pixel_size
    if working is None:
        raise ValueError("estimating a pixel size needs a model with a working resolution")
    if not images:
        raise ValueError("no images to estimate a pixel size from")
    step = len(images) / min(len(images), MAX_SEARCH_IMAGES)
    sample = [images[int(i * step)] for i in range(min(len(images), MAX_SEARCH_IMAGES))]
    found: dict[float, list[float]] = {}

    def evaluate(factor: float) -> None:
        if factor not in found:
            found[factor] = _confidence(detect, sample, factor * working, factor, min_score)

    def relative() -> dict[float, float]:
        per_image = torch.tensor([found[f] for f in sorted(found)])  # [F, N]
        best = per_image.max(dim=0).values
        used = best > 0
        if not bool(used.any()):
            return {}
        mean = (per_image[:, used] / best[used]).mean(dim=1)
        return {f: float(v) for f, v in zip(sorted(found), mean.tolist(), strict=True)}

    with torch.inference_mode():
        for factor in COARSE_FACTORS:
            evaluate(factor)
        curve = relative()
        if not curve:
            raise ValueError(
                f"no cell scored {min_score} or more at any pixel size from "
                f"{COARSE_FACTORS[0] * working:.3g} to {COARSE_FACTORS[-1] * working:.3g} um: "
                "the images do not look like what the model was trained on"
            )
        coarse_best = max(curve, key=curve.__getitem__)
        for octave in FINE_OCTAVES:
            evaluate(coarse_best * 2.0**octave)
        curve = relative()
    factors = list(curve)
    factor = _refine(factors, [curve[f] for f in factors])
    used = int((torch.tensor([found[f] for f in sorted(found)]).max(dim=0).values > 0).sum())
    return PixelSizeEstimate(
        pixel_size_um=factor * working,
        curve={f * working: v for f, v in curve.items()},
        num_images=used,
    )
