"""The "shifted microscopes" suite: named, seeded, deterministic image shifts at three severities.

In the spirit of ImageNet-C, each shift imitates one way another laboratory's microscope differs
from the training one. They are written in numpy and PIL with functional forms of their own (a
pillbox defocus, a cos^4 falloff, a sensor noise model, area-averaged zoom, JPEG), never the
training augmentation's (kornia affine, Gaussian blur, HED stain and colour jitter), so the
protocol does not test the training recipe against itself. Photometric shifts work in linear
light (sRGB approximated by a 2.2 gamma), where optics and sensors add and multiply.

Severities 1 / 2 / 3:

- ``scale``: cells 1.6x / 0.6x / 0.4x their size, ordered by ``abs(log(factor))``. Zoom-in
  crops the centre and enlarges it; zoom-out shrinks the field into the same sensor, as a lower
  magnification would, and fills the rest with the background colour (median of the border).
- ``colour``: a white-balance error (per-channel gains, mean log-attenuation 0.10 / 0.20 /
  0.35) plus a pale coloured veil of weight 0.04 / 0.08 / 0.15, each of a seeded hue.
- ``defocus``: a pillbox (disk) kernel of radius 0.4 / 0.8 / 1.4 % of the short side (1 px
  at least).
- ``vignetting``: cos^4 falloff to 75 / 55 / 35 % illumination in the corners, the optical
  centre moved by up to 5 % (seeded).
- ``low_light``: exposure x0.5 / x0.25 / x0.12, Poisson shot noise (1000 e- full well) and
  Gaussian read noise of 2 / 3 / 5 e- (seeded).
- ``jpeg``: PIL JPEG at quality 30 / 15 / 8.
- ``all``: ``scale``, ``defocus``, ``vignetting``, ``colour``, ``low_light``, ``jpeg`` in that
  order, each at the severity.

Only ``scale`` moves pixels: boxes follow them exactly, a box cut by the crop is clipped and
dropped when less than half of it stays visible.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Shift names, in the order tables list them; ``all`` applies the others at one severity.
SHIFTS: tuple[str, ...] = ("scale", "colour", "defocus", "vignetting", "low_light", "jpeg", "all")
#: Severities, mild to strong.
SEVERITIES: tuple[int, ...] = (1, 2, 3)
#: The order in which ``all`` applies the shifts: geometry, optics, illumination, sensor, file.
ALL_ORDER: tuple[str, ...] = ("scale", "defocus", "vignetting", "colour", "low_light", "jpeg")

#: Cell-size factor of ``scale`` per severity: farther from 1 in log scale as severity grows.
SCALE_FACTORS: dict[int, float] = {1: 1.6, 2: 0.6, 3: 0.4}
#: Mean log-attenuation of the colour channels (white-balance error) per severity.
WHITE_BALANCE_ERROR: dict[int, float] = {1: 0.10, 2: 0.20, 3: 0.35}
#: Weight of the coloured veil (colour cast) per severity.
COLOUR_CAST: dict[int, float] = {1: 0.04, 2: 0.08, 3: 0.15}
#: Defocus disk radius as a fraction of the image's short side per severity.
DEFOCUS_RADIUS: dict[int, float] = {1: 0.004, 2: 0.008, 3: 0.014}
#: Smallest defocus radius in pixels.
MIN_DEFOCUS_RADIUS: float = 1.0
#: Relative illumination at the image corners (cos^4 vignetting) per severity.
CORNER_ILLUMINATION: dict[int, float] = {1: 0.75, 2: 0.55, 3: 0.35}
#: Largest shift of the optical centre, as a fraction of each side.
VIGNETTING_CENTRE_JITTER: float = 0.05
#: Exposure factor of ``low_light`` per severity.
EXPOSURE: dict[int, float] = {1: 0.5, 2: 0.25, 3: 0.12}
#: Gaussian read noise in electrons per severity.
READ_NOISE_ELECTRONS: dict[int, float] = {1: 2.0, 2: 3.0, 3: 5.0}
#: Electrons of a white pixel at full exposure (sets the shot noise).
FULL_WELL_ELECTRONS: float = 1000.0
#: PIL JPEG quality per severity.
JPEG_QUALITY: dict[int, int] = {1: 30, 2: 15, 3: 8}
#: A box cut by ``scale``'s crop is kept when at least this fraction of it stays in the image.
MIN_VISIBLE_FRACTION: float = 0.5
#: sRGB approximated as a power law, for the linear-light shifts.
GAMMA: float = 2.2


@dataclass
class Shifted:
    """One shifted image and its annotations.

    Attributes:
        image: uint8 ``[H, W, 3]``, the input's size.
        boxes_xyxy: float32 ``[K, 4]`` the kept boxes in the shifted image's pixels.
        labels: int64 ``[K]`` their labels.
        keep: bool ``[N]`` which input boxes were kept (to filter anything else per cell).
        cell_scale: how much bigger cells are in pixels than in the input (1 except ``scale``);
            the pixel size in micrometres is divided by it.
        encoded: the JPEG file when the last step was ``jpeg`` (its decoding is ``image``), so
            a writer can store it without a second compression; None otherwise.
    """

    image: np.ndarray
    boxes_xyxy: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    cell_scale: float = 1.0
    encoded: bytes | None = None


def shift_seed(name: str, severity: int, index: int, base_seed: int = 0) -> int:
    """The seed of one (shift, severity, image index), stable across runs and machines."""
    digest = hashlib.sha256(f"{name}/{severity}/{index}/{base_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def apply_shift(
    name: str,
    severity: int,
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    labels: np.ndarray,
    seed: int,
) -> Shifted:
    """Apply one named shift at one severity; deterministic for a given ``seed``.

    Args:
        name: one of `SHIFTS`.
        severity: one of `SEVERITIES`.
        image: uint8 ``[H, W, 3]`` RGB.
        boxes_xyxy: float ``[N, 4]`` xyxy pixels (pixel ``i`` spans ``[i, i+1]``).
        labels: int ``[N]``.
        seed: e.g. `shift_seed` of the shift, severity and image index.

    Returns:
        The `Shifted` image, the kept boxes and labels, the keep mask and the cell-size factor.

    Raises:
        ValueError: an unknown shift or severity, or arrays of the wrong type or shape.
    """
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)  # [N, 4]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)  # [N]
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} boxes and {len(labels)} labels")
    current = Shifted(image, boxes, labels, np.ones(len(boxes), dtype=bool))
    steps = ALL_ORDER if name == "all" else (name,)
    seeds = np.random.SeedSequence(seed).generate_state(len(steps), dtype=np.uint64)
    for step, step_seed in zip(steps, seeds, strict=True):
        current = _step(step, severity, current, np.random.default_rng(int(step_seed)))
    return current


def _step(name: str, severity: int, previous: Shifted, rng: np.random.Generator) -> Shifted:
    if name == "scale":
        image, boxes, keep, factor = _scale(
            previous.image, previous.boxes_xyxy, SCALE_FACTORS[severity]
        )
        indices = np.flatnonzero(previous.keep)
        combined = np.zeros_like(previous.keep)
        combined[indices[keep]] = True
        return Shifted(image, boxes, previous.labels[keep], combined, previous.cell_scale * factor)
    if name == "jpeg":
        encoded = jpeg_bytes(previous.image, JPEG_QUALITY[severity])
        with Image.open(io.BytesIO(encoded)) as decoded:
            image = np.asarray(decoded.convert("RGB")).copy()
        return Shifted(
            image, previous.boxes_xyxy, previous.labels, previous.keep, previous.cell_scale, encoded
        )
    photometric: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
        "colour": _colour,
        "defocus": _defocus,
        "vignetting": _vignetting,
        "low_light": _low_light,
    }
    linear = photometric[name](_to_linear(previous.image), severity, rng)
    return Shifted(
        _to_uint8(linear), previous.boxes_xyxy, previous.labels, previous.keep, previous.cell_scale
    )


# ----------------------------------------------------------------------------------- helpers
def _to_linear(image: np.ndarray) -> np.ndarray:
    """uint8 sRGB ``[H, W, 3]`` -> float64 linear light in ``[0, 1]``."""
    return (image.astype(np.float64) / 255.0) ** GAMMA


def _to_uint8(linear: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(linear, 0.0, 1.0) ** (1.0 / GAMMA) * 255.0).astype(np.uint8)


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the border pixels, uint8 ``[3]``: the slide's background."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])  # [2W + 2H, 3]
    return np.median(border, axis=0).round().astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """The JPEG file of a uint8 ``[H, W, 3]`` image at PIL ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _hue_direction(rng: np.random.Generator) -> np.ndarray:
    """Non-negative per-channel weights ``[3]`` of mean 1, zero on one channel, seeded hue.

    A unit vector at a random angle in the plane of zero-sum RGB offsets, shifted so its largest
    channel is 0 and scaled to mean 1: every hue gets the same mean attenuation.
    """
    angle = rng.uniform(0.0, 2.0 * np.pi)
    e1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
    e2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)
    direction = np.cos(angle) * e1 + np.sin(angle) * e2
    deficit = direction.max() - direction
    return deficit / deficit.mean()


# ------------------------------------------------------------------------------------ shifts
def _scale(
    image: np.ndarray, boxes: np.ndarray, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Zoom about the image centre by ``factor`` at the same pixel size.

    Returns:
        image, kept boxes ``[K, 4]``, keep ``[N]``, the factor actually applied (zoom-out rounds
        the shrunk field to whole pixels).
    """
    height, width = image.shape[:2]
    pil = Image.fromarray(image)
    if factor < 1.0:
        new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        # Area averaging, as a lower-magnification objective integrates over each pixel.
        small = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BOX))
        out = np.empty_like(image)
        out[:] = background_colour(image)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        out[top : top + new_h, left : left + new_w] = small
        sx, sy = new_w / width, new_h / height
        moved = boxes * np.array([sx, sy, sx, sy], dtype=np.float32) + np.array(
            [left, top, left, top], dtype=np.float32
        )
        return out, moved.astype(np.float32), np.ones(len(boxes), dtype=bool), (sx + sy) / 2
    crop_w, crop_h = width / factor, height / factor
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    # PIL's float ``box`` maps the continuous crop onto the whole output exactly.
    out = pil.resize(
        (width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h)
    )
    moved = (boxes - np.array([left, top, left, top], dtype=np.float32)) * factor  # [N, 4]
    clipped = np.clip(moved, 0.0, np.array([width, height, width, height], dtype=np.float32))
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    visible = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(
        clipped[:, 3] - clipped[:, 1], 0, None
    )
    keep = (visible > 0) & (visible >= MIN_VISIBLE_FRACTION * np.maximum(area, 1e-12))
    return np.asarray(out), clipped[keep].astype(np.float32), keep, float(factor)


def _colour(linear: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """White-balance error (per-channel gains <= 1, so white never clips) and a coloured veil."""
    gains = np.exp(-WHITE_BALANCE_ERROR[severity] * _hue_direction(rng))  # [3]
    tint = np.exp(-0.7 * _hue_direction(rng))  # [3] a pale colour, brightest channel 1
    weight = COLOUR_CAST[severity]
    return linear * gains * (1.0 - weight) + weight * tint


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Pillbox kernel ``[2R+1, 2R+1]`` (``R = ceil(radius)``), each weight the pixel's area
    covered by the disk, summing to 1."""
    radius = max(float(radius), 0.5)
    half = int(np.ceil(radius))
    size = 2 * half + 1
    # [size * supersample] sub-pixel centres per axis, pixel i spanning [i - 0.5, i + 0.5].
    sub = (np.arange(size * supersample) + 0.5) / supersample - 0.5 - half
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2) <= radius**2
    coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return coverage / coverage.sum()


def _convolve(linear: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``linear`` ``[H, W, C]`` convolved with an odd, symmetric ``kernel``; reflected borders."""
    half = kernel.shape[0] // 2
    height, width = linear.shape[:2]
    padded = np.pad(linear, ((half, half), (half, half), (0, 0)), mode="reflect")
    shape = padded.shape[:2]
    spectrum = (
        np.fft.rfft2(padded, s=shape, axes=(0, 1))
        * np.fft.rfft2(kernel, s=shape, axes=(0, 1))[..., None]
    )
    full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
    # The circular convolution is exact from 2 * half on (no wrap-around there).
    return full[2 * half : 2 * half + height, 2 * half : 2 * half + width]


def _defocus(linear: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    # At least a pixel: a smaller disk would leave a small image untouched.
    radius = max(DEFOCUS_RADIUS[severity] * min(linear.shape[:2]), MIN_DEFOCUS_RADIUS)
    return _convolve(linear, disk_kernel(radius))


def _vignetting(linear: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Natural vignetting ``cos^4(theta)``, the focal length chosen so that the corners of a
    centred field receive `CORNER_ILLUMINATION`."""
    height, width = linear.shape[:2]
    centre_x = width / 2 + rng.uniform(-1, 1) * VIGNETTING_CENTRE_JITTER * width
    centre_y = height / 2 + rng.uniform(-1, 1) * VIGNETTING_CENTRE_JITTER * height
    cos_corner = CORNER_ILLUMINATION[severity] ** 0.25
    focal = (np.hypot(width, height) / 2) / np.sqrt(1.0 / cos_corner**2 - 1.0)
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    radius_sq = (xs[None, :] - centre_x) ** 2 + (ys[:, None] - centre_y) ** 2  # [H, W]
    falloff = (focal**2 / (focal**2 + radius_sq)) ** 2  # cos^4 = (f^2 / (f^2 + r^2))^2
    return linear * falloff[..., None]


def _low_light(linear: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Fewer photons: the exposure scales the expected electrons, then shot and read noise."""
    expected = linear * EXPOSURE[severity] * FULL_WELL_ELECTRONS
    electrons = rng.poisson(expected) + rng.normal(
        0.0, READ_NOISE_ELECTRONS[severity], expected.shape
    )
    return electrons / FULL_WELL_ELECTRONS
