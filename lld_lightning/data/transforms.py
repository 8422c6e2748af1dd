"""On-device augmentation and letterbox: pixels, boxes and regions move with one matrix per image.

`DeviceAugmentation` runs on a collated batch (see `sample.py`) after it reaches the accelerator
(the data module calls it from ``on_after_batch_transfer``). It turns the uint8, top-left padded
images into float ``[B, 3, S, S]`` in ``[0, 1]`` at the model size ``S``.

Coordinates. Boxes and regions are *continuous* pixel coordinates: pixel ``i`` spans ``[i, i + 1]``,
an image of width ``W`` spans ``[0, W]``, so a horizontal flip maps ``x -> W - x``. The geometry of
one image is a single 3x3 affine matrix in that convention (``batch["transform"]``), mapping
original pixels to output pixels. Kornia's warp works on pixel *centres* (pixel ``i`` at ``i``), so
the matrix it receives is conjugated by a half-pixel shift: ``T(-0.5) @ M @ T(+0.5)``.

Geometry, composed into that one matrix (all axis-aligned, so a box's transformed corners give its
exact new box):

1. letterbox: scale by ``S / max(h, w)`` (aspect ratio kept), content at the **top-left** of the
   ``S x S`` canvas, the rest filled with ``fill`` (top-left matches the collate padding and makes
   the inverse a pure scale in eval). At a physical working resolution (``working_pixel_size``)
   the scale is instead ``pixel_size_um / working_pixel_size`` of each image, so a cell has the
   same size in output pixels whatever the microscope; an evaluation canvas then grows to hold
   the whole resampled image (a square, in steps of `CANVAS_STEP`);
2. (train) flips and quarter turns of the content about its own centre, re-anchored at the top-left;
3. (train) zoom about the content centre and a translation in output pixels; with ``crop_size``
   a crop (at the images' own or the working resolution) centred in an annotated region instead
   of the whole-image letterbox.

Eval (``train=False``) is step 1 only and deterministic.

Photometric (train only, per image, vectorised): colour jitter (kornia.enhance), stain jitter in
Ruifrok-Johnston HED space, Gaussian blur (kornia.filters), Gaussian noise.

Padding never leaks into the image: the collate padding is overwritten with each image's edge
pixels and the warp replicates the border, so bilinear sampling and the blur at the content edge
read image pixels only; at the end every output pixel whose centre lies outside the content is
set to ``fill``, whatever the warp or the photometric ops put there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import warp_affine
from torch import Tensor, nn

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.optics import Optics, apply_optics
from lld_lightning.data.sample import Batch

#: Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB, one per row
#: (normalised to unit length below). ``od_rgb = concentrations_hed @ RGB_FROM_HED``.
_STAIN_VECTORS: tuple[tuple[float, float, float], ...] = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)
#: Smallest intensity before taking the optical density (log of 0 is undefined).
_MIN_INTENSITY: float = 1e-6
#: Range of the blur's sigma in output pixels (the blur's probability is `Augmentation.blur`).
BLUR_SIGMA: tuple[float, float] = (0.1, 1.5)
#: An evaluation canvas at a physical resolution grows in steps of this many pixels (the
#: detector's coarsest stride).
CANVAS_STEP: int = 32
#: Largest standard deviation of the additive noise, images in [0, 1] (uniform in [0, NOISE_STD]).
NOISE_STD: float = 0.03

# Quarter turns k -> (cos, sin) of a visual counter-clockwise rotation by k * 90 degrees.
_QUARTER_COS: tuple[float, ...] = (1.0, 0.0, -1.0, 0.0)
_QUARTER_SIN: tuple[float, ...] = (0.0, 1.0, 0.0, -1.0)


@dataclass
class GeometryParams:
    """Per-image geometric parameters of one call (all tensors have batch size ``B``).

    Attributes:
        hflip: bool ``[B]``, mirror left-right.
        vflip: bool ``[B]``, mirror top-bottom.
        quarter_turns: int64 ``[B]`` in ``{0, 1, 2, 3}``: visual counter-clockwise turns by 90
            degrees, applied after the flips (``1`` equals ``torch.rot90(img, 1, (-2, -1))``).
        scale: float ``[B]``, zoom about the content centre (1 = none).
        translate: float ``[B, 2]``, shift ``(dx, dy)`` in output pixels.
    """

    hflip: Tensor
    vflip: Tensor
    quarter_turns: Tensor
    scale: Tensor
    translate: Tensor

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str | None = None) -> GeometryParams:
        """Parameters that leave the letterboxed image unchanged (what eval mode uses)."""
        return cls(
            hflip=torch.zeros(batch_size, dtype=torch.bool, device=device),
            vflip=torch.zeros(batch_size, dtype=torch.bool, device=device),
            quarter_turns=torch.zeros(batch_size, dtype=torch.int64, device=device),
            scale=torch.ones(batch_size, device=device),
            translate=torch.zeros(batch_size, 2, device=device),
        )

    def to(self, device: torch.device | str) -> GeometryParams:
        """The same parameters on ``device``."""
        return GeometryParams(
            hflip=self.hflip.to(device),
            vflip=self.vflip.to(device),
            quarter_turns=self.quarter_turns.to(device),
            scale=self.scale.to(device),
            translate=self.translate.to(device),
        )


def geometry_matrix(
    image_size: Tensor,
    output_size: int,
    params: GeometryParams,
    resample: Tensor | None = None,
) -> Tensor:
    """Compose letterbox (or resampling), flips, quarter turns, zoom and shift into one matrix.

    Args:
        image_size: int ``[B, 2]`` valid ``(h, w)`` of each original image.
        output_size: side ``S`` of the square output.
        params: the per-image parameters (use `GeometryParams.identity` for a plain letterbox).
        resample: float ``[B]`` output pixels per original pixel in place of the letterbox's
            ``S / max(h, w)`` (a physical working resolution, or 1 for native crops); a NaN
            entry letterboxes that image. None letterboxes every image.

    Returns:
        float32 ``[B, 3, 3]`` affine matrices mapping original continuous pixel coordinates
        ``(x, y, 1)`` to output ones.
    """
    device = image_size.device
    params = params.to(device)
    height, width = image_size[:, 0].float(), image_size[:, 1].float()
    letterbox = output_size / torch.maximum(height, width).clamp(min=1.0)  # [B]
    if resample is not None:
        resample = resample.to(device=device, dtype=letterbox.dtype)
        letterbox = torch.where(torch.isnan(resample), letterbox, resample)
    content_w, content_h = width * letterbox, height * letterbox
    odd_turn = params.quarter_turns % 2 == 1
    turned_w = torch.where(odd_turn, content_h, content_w)
    turned_h = torch.where(odd_turn, content_w, content_h)

    turns = params.quarter_turns % 4
    cos = torch.tensor(_QUARTER_COS, device=device)[turns]
    sin = torch.tensor(_QUARTER_SIN, device=device)[turns]
    # A visual counter-clockwise turn in y-down coordinates: (dx, dy) -> (c dx + s dy, -s dx + c dy).
    rotation = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    flip = torch.diag_embed(
        torch.stack([1.0 - 2.0 * params.hflip.float(), 1.0 - 2.0 * params.vflip.float()], -1)
    )
    linear = params.scale.float()[:, None, None] * rotation @ flip  # [B, 2, 2], after the letterbox

    # Rotate/flip/zoom about the content centre, then put that centre where the re-anchored
    # (top-left) content has its centre, then shift: x' = A (s x - c0) + c1 + t.
    centre_in = torch.stack([content_w, content_h], -1) / 2  # [B, 2]
    centre_out = torch.stack([turned_w, turned_h], -1) / 2  # [B, 2]
    offset = centre_out + params.translate.float() - (linear @ centre_in[..., None])[..., 0]

    matrix = torch.zeros(image_size.shape[0], 3, 3, device=device)
    matrix[:, :2, :2] = linear * letterbox[:, None, None]
    matrix[:, :2, 2] = offset
    matrix[:, 2, 2] = 1.0
    return matrix


def transform_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Map xyxy boxes through affine matrices (exact for axis-aligned maps, else the hull).

    Args:
        boxes: float ``[B, N, 4]`` xyxy.
        matrix: float ``[B, 3, 3]`` affine matrices.

    Returns:
        float ``[B, N, 4]``: the min/max box of the four transformed corners.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    corners = torch.stack(
        [
            torch.stack([x1, y1], -1),
            torch.stack([x2, y1], -1),
            torch.stack([x2, y2], -1),
            torch.stack([x1, y2], -1),
        ],
        dim=-2,
    )  # [B, N, 4 corners, 2]
    linear = matrix[:, None, None, :2, :2].to(boxes.dtype)
    offset = matrix[:, None, None, :2, 2].to(boxes.dtype)
    moved = (linear @ corners[..., None])[..., 0] + offset  # [B, N, 4, 2]
    return torch.cat([moved.amin(dim=-2), moved.amax(dim=-2)], dim=-1)


def invert_boxes(boxes: Tensor, transform: Tensor) -> Tensor:
    """Map boxes from output pixels back to original image pixels (e.g. predictions).

    Args:
        boxes: float ``[B, N, 4]`` xyxy in output pixels.
        transform: float ``[B, 3, 3]``, the ``batch["transform"]`` that produced the output.

    Returns:
        float ``[B, N, 4]`` xyxy in original pixels (not clipped).
    """
    return transform_boxes(boxes, torch.linalg.inv(transform.double()).to(transform.dtype))


def clip_boxes(boxes: Tensor, bounds: Tensor) -> Tensor:
    """Clip xyxy boxes ``[B, N, 4]`` to one xyxy rectangle per image, ``bounds`` ``[B, 4]``."""
    low = bounds[:, None, :2].repeat(1, 1, 2)
    high = bounds[:, None, 2:].repeat(1, 1, 2)
    return torch.maximum(torch.minimum(boxes, high), low)


def content_boxes(image_size: Tensor, matrix: Tensor, output_size: int) -> Tensor:
    """Where each image's pixels land in the output: xyxy ``[B, 4]``, clipped to the canvas.

    Args:
        image_size: int ``[B, 2]`` valid ``(h, w)``.
        matrix: float ``[B, 3, 3]`` from `geometry_matrix`.
        output_size: side ``S`` of the output.
    """
    zeros = torch.zeros_like(image_size[:, 0])
    whole = torch.stack([zeros, zeros, image_size[:, 1], image_size[:, 0]], -1).to(matrix.dtype)
    moved = transform_boxes(whole[:, None], matrix)[:, 0]
    canvas = matrix.new_tensor([0.0, 0.0, output_size, output_size]).expand_as(moved)
    return clip_boxes(moved[:, None], canvas)[:, 0]


def content_mask(bounds: Tensor, output_size: int) -> Tensor:
    """Output pixels whose centre lies inside each image's content box: bool ``[B, S, S]``.

    Args:
        bounds: float ``[B, 4]`` xyxy content boxes (`content_boxes`).
        output_size: side ``S`` of the output.
    """
    centres = torch.arange(output_size, device=bounds.device, dtype=bounds.dtype) + 0.5
    inside_x = (centres[None] >= bounds[:, 0, None]) & (centres[None] < bounds[:, 2, None])
    inside_y = (centres[None] >= bounds[:, 1, None]) & (centres[None] < bounds[:, 3, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def replicate_padding(images: Tensor, image_size: Tensor) -> Tensor:
    """Overwrite the collate padding of each image with its nearest valid pixel.

    Bilinear sampling at the content edge then reads image pixels, never padding.

    Args:
        images: ``[B, C, H, W]``, image ``b`` valid in its top-left ``image_size[b]``.
        image_size: int ``[B, 2]`` valid ``(h, w)``.

    Returns:
        ``[B, C, H, W]``.
    """
    batch_size, _, height, width = images.shape
    device = images.device
    rows = torch.minimum(
        torch.arange(height, device=device)[None], (image_size[:, 0, None] - 1).clamp(min=0)
    )  # [B, H]
    cols = torch.minimum(
        torch.arange(width, device=device)[None], (image_size[:, 1, None] - 1).clamp(min=0)
    )  # [B, W]
    index = torch.arange(batch_size, device=device)[:, None, None]
    return images.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def warp_images(images: Tensor, matrix: Tensor, output_size: int) -> Tensor:
    """Warp a batch with one kornia call (bilinear, border values replicated outside).

    Args:
        images: float ``[B, C, H, W]``.
        matrix: float ``[B, 3, 3]`` in continuous coordinates (`geometry_matrix`).
        output_size: side ``S`` of the output.

    Returns:
        float ``[B, C, S, S]``; pixels outside the source hold replicated border values (mask
        them with `content_mask`).
    """
    to_continuous = torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    to_continuous[:2, 2] = 0.5
    to_centres = torch.eye(3, device=matrix.device, dtype=matrix.dtype)
    to_centres[:2, 2] = -0.5
    # Kornia puts pixel i at coordinate i (its centre), our boxes at i + 0.5: conjugate.
    centred = to_centres @ matrix @ to_continuous
    return warp_affine(
        images,
        centred[:, :2, :].to(images.dtype),
        dsize=(output_size, output_size),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )


def _stain_matrices(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    rgb_from_hed = torch.tensor(_STAIN_VECTORS, device=device, dtype=torch.float64)
    rgb_from_hed = rgb_from_hed / rgb_from_hed.norm(dim=1, keepdim=True)
    return rgb_from_hed.to(dtype), torch.linalg.inv(rgb_from_hed).to(dtype)


def stain_jitter(images: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Perturb stain concentrations in HED space (colour deconvolution, Ruifrok & Johnston).

    Each pixel's optical density ``-log(rgb)`` is unmixed into haematoxylin, eosin and DAB
    concentrations, each scaled by ``alpha`` and shifted by ``beta``, and mixed back.

    Args:
        images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``.
        alpha: float ``[B, 3]`` per-stain scale (1 = unchanged).
        beta: float ``[B, 3]`` per-stain shift in optical-density units (0 = unchanged).

    Returns:
        float ``[B, 3, H, W]`` in ``[0, 1]``.
    """
    rgb_from_hed, hed_from_rgb = _stain_matrices(images.device, images.dtype)
    density = -torch.log(images.clamp(min=_MIN_INTENSITY)).movedim(1, -1)  # [B, H, W, 3]
    stains = density @ hed_from_rgb
    stains = stains * alpha[:, None, None, :] + beta[:, None, None, :]
    return torch.exp(-(stains @ rgb_from_hed)).movedim(-1, 1).clamp(0.0, 1.0)


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None):
    return low + (high - low) * torch.rand(shape, generator=generator)


def _coin(probability: float, batch_size: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(batch_size, generator=generator) < probability


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation; its defaults are the shipped recipe (``configs/sparse.yaml``).

    Cells are rotation invariant, so every symmetry of the square is used; colour is evidence
    (basophilia), so colour and stain are jittered gently. ``min_visibility``, ``min_size`` and
    ``fill`` apply to evaluation too.

    Args:
        hflip: probability of a left-right flip.
        vflip: probability of a top-bottom flip.
        rot90: probability of a quarter turn, either way; with both flips at 0.5 the eight symmetries are equally likely.
        scale: zoom range (low, high), uniform, about the content centre.
        translate: largest shift per axis, as a fraction of the output side.
        crop_size: train on squares of this side at the images' own resolution, centred in an annotated region; null letterboxes the whole image.
        color_jitter: probability of colour jitter (brightness, contrast, saturation, hue) per image.
        brightness: brightness factor range ``[1 - b, 1 + b]``.
        contrast: contrast factor range ``[1 - c, 1 + c]``.
        saturation: saturation factor range ``[1 - s, 1 + s]``.
        hue: hue shift range ``[-h, h]`` in turns of the colour wheel.
        stain_jitter: probability of haematoxylin-eosin-DAB stain jitter per image.
        stain_alpha: per-stain concentration scale range ``[1 - a, 1 + a]``.
        stain_beta: per-stain concentration shift range ``[-b, b]`` (optical density).
        blur: probability of a Gaussian blur (sigma 0.1 to 1.5 pixels) per image.
        noise: probability of Gaussian noise (standard deviation up to 0.03) per image.
        optics: what another microscope and camera do (vignetting, defocus, motion blur, exposure, low light, white balance, gamma, JPEG), each with its probability and strength.
        min_visibility: drop a cell whose visible part is less than this fraction of it.
        min_size: drop a cell whose visible width or height is below this many output pixels.
        fill: grey level in [0, 1] of the output outside the image content.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    crop_size: int | None = 256
    color_jitter: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.0
    stain_jitter: float = 0.3
    stain_alpha: float = 0.03
    stain_beta: float = 0.03
    blur: float = 0.1
    noise: float = 0.1
    optics: Optics = field(default_factory=Optics.off)
    min_visibility: float = 0.3
    min_size: float = 2.0
    fill: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        if isinstance(self.optics, dict):  # as a checkpoint's data hyper-parameters hold it
            object.__setattr__(self, "optics", Optics(**self.optics))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a positive (low, high) range, got {self.scale}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")


class DeviceAugmentation(nn.Module):
    """Letterbox (or resampling to a physical resolution) plus (train) random geometry and
    photometry, on the device, for a whole batch.

    Args:
        image_size: side ``S`` of the square output (of evaluation; training outputs
            ``augmentation.crop_size`` when it is set).
        train: random augmentation; ``False`` = deterministic top-left letterbox only.
        augmentation: the random augmentation and the cell filter (`Augmentation`).
        working_pixel_size: micrometres per output pixel; each image is resampled from its own
            pixel size (the batch's ``pixel_size_um``; unknown = letterboxed) instead of being
            letterboxed, and an evaluation canvas grows (in steps of `CANVAS_STEP`) to hold the
            whole resampled image. None letterboxes every image to ``S``.
    """

    def __init__(
        self,
        image_size: int = 640,
        train: bool = True,
        augmentation: Augmentation = Augmentation(),  # noqa: B008 (frozen, never mutated)
        working_pixel_size: float | None = None,
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if working_pixel_size is not None and not working_pixel_size > 0:
            raise ValueError(f"working_pixel_size must be positive, got {working_pixel_size}")
        self.image_size = image_size
        self.train_mode = train
        self.options = augmentation
        self.working_pixel_size = working_pixel_size

    @property
    def output_size(self) -> int:
        """Side of the output: ``crop_size`` when training on crops, else ``image_size`` (an
        evaluation canvas at a physical resolution may be larger: see `canvas_size`)."""
        crop_size = self.options.crop_size
        return crop_size if self.train_mode and crop_size else self.image_size

    def resample_factors(self, batch: Batch) -> Tensor | None:
        """Output pixels per original pixel of each image, float ``[B]`` (an image of unknown
        pixel size: its letterbox factor), or None when every image is letterboxed."""
        batch_size = int(batch["image_size"].shape[0])
        if self.working_pixel_size is not None:
            pixel_size = batch.get("pixel_size_um")
            if pixel_size is None:
                pixel_size = torch.full((batch_size,), float("nan"))
            factors = pixel_size.float().cpu() / self.working_pixel_size
            # An image of unknown pixel size is letterboxed to `output_size`, never to a canvas
            # grown for the other images of its batch.
            longest = batch["image_size"].float().cpu().max(dim=1).values.clamp(min=1.0)
            return torch.where(torch.isnan(factors), self.output_size / longest, factors)
        if self.train_mode and self.options.crop_size:
            return torch.ones(batch_size)  # crops at the images' own resolution
        return None

    def canvas_size(self, image_size: Tensor, resample: Tensor | None) -> int:
        """Side of the output for these images: `output_size`, grown in evaluation to hold the
        largest resampled image."""
        if self.train_mode or resample is None:
            return self.output_size
        longest = image_size.float().cpu().max(dim=1).values * resample.cpu()
        longest = longest[~torch.isnan(longest)]
        if longest.numel() == 0:
            return self.output_size
        needed = math.ceil(float(longest.max()) / CANVAS_STEP - 1e-6) * CANVAS_STEP
        return max(self.output_size, needed)

    def sample_geometry(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> GeometryParams:
        """Random geometric parameters for ``batch_size`` images (identity in eval mode)."""
        if not self.train_mode:
            return GeometryParams.identity(batch_size)
        o = self.options
        turn = _coin(o.rot90, batch_size, generator)
        clockwise = _coin(0.5, batch_size, generator)
        quarter_turns = torch.where(turn, torch.where(clockwise, 3, 1), 0).to(torch.int64)
        return GeometryParams(
            hflip=_coin(o.hflip, batch_size, generator),
            vflip=_coin(o.vflip, batch_size, generator),
            quarter_turns=quarter_turns,
            scale=_uniform(*o.scale, (batch_size,), generator),
            translate=_uniform(-1.0, 1.0, (batch_size, 2), generator)
            * o.translate
            * self.output_size,
        )

    def region_crop(
        self,
        batch: Batch,
        params: GeometryParams,
        resample: Tensor,
        generator: torch.Generator | None = None,
    ) -> GeometryParams:
        """Turn letterbox parameters into a crop centred in an annotated region.

        The images are resampled by ``resample`` (1 = their own resolution), zoomed by
        ``scale``, and shifted so that a uniformly drawn point of a randomly chosen valid region
        (the whole image when there is none) lands at the crop centre, plus the sampled shift.
        """
        crop_size = self.output_size
        image_size = batch["image_size"].float()  # [B, 2] (h, w)
        batch_size = image_size.shape[0]
        regions = batch["regions"].float().cpu()  # [B, R, 4]
        valid = batch["region_valid"].cpu()  # [B, R]
        whole = torch.cat([torch.zeros(batch_size, 2), image_size.cpu().flip(-1)], -1)  # [B, 4]
        weights = valid.float() + (~valid.any(dim=1, keepdim=True)).float()  # none valid: any row
        choice = torch.multinomial(weights, 1, generator=generator)[:, 0]  # [B]
        chosen = regions[torch.arange(batch_size), choice]  # [B, 4]
        chosen = torch.where(valid.any(dim=1, keepdim=True), chosen, whole)
        u = _uniform(0.0, 1.0, (batch_size, 2), generator)
        point = chosen[:, :2] + u * (chosen[:, 2:] - chosen[:, :2])  # [B, 2] original pixels
        centred = GeometryParams(
            params.hflip, params.vflip, params.quarter_turns, params.scale, torch.zeros(batch_size, 2)
        )
        matrix = geometry_matrix(batch["image_size"].cpu(), crop_size, centred, resample.cpu())
        mapped = (matrix[:, :2, :2] @ point[..., None])[..., 0] + matrix[:, :2, 2]  # [B, 2]
        shift = crop_size / 2 - mapped + params.translate.cpu()
        return GeometryParams(params.hflip, params.vflip, params.quarter_turns, params.scale, shift)

    def forward(
        self,
        batch: Batch,
        generator: torch.Generator | None = None,
        params: GeometryParams | None = None,
    ) -> Batch:
        """Augment (train) or letterbox (eval) a collated batch.

        Args:
            batch: the `sample.collate` batch (``image`` uint8 or float in [0, 1]
                ``[B, 3, H, W]``, ``image_size``, ``boxes``, ``labels``, ``attributes``,
                ``regions``, ``region_valid``), on any device.
            generator: CPU generator for reproducible randomness (default: global RNGs).
            params: fixed geometric parameters instead of random ones (tests, TTA).

        Returns:
            A new dict with the other keys unchanged and ``image`` float ``[B, 3, S, S]`` in
            ``[0, 1]``; ``boxes`` ``[B, M, 4]`` and ``regions`` ``[B, R, 4]`` in output pixels,
            clipped; dropped cells get ``labels``/``attributes`` = ``IGNORE_INDEX`` and a zero box;
            empty regions get ``region_valid`` False and a zero box; ``transform`` float
            ``[B, 3, 3]`` maps original pixels to output pixels (see `invert_boxes`).
            ``image_size`` is kept: it still gives the original ``(h, w)``.
        """
        image_size = batch["image_size"].to(batch["image"].device)
        resample = self.resample_factors(batch)
        output_size = self.canvas_size(image_size, resample)
        geometry = self._geometry(batch, generator, params, resample)
        matrix = geometry_matrix(image_size, output_size, geometry, resample)
        bounds = content_boxes(image_size, matrix, output_size)
        out = batch.copy()
        out["image"] = self._render(
            batch["image"], image_size, matrix, bounds, output_size, generator
        )
        out.update(self._move_cells(batch, matrix, bounds))
        out["transform"] = matrix
        return out

    def _geometry(
        self,
        batch: Batch,
        generator: torch.Generator | None,
        params: GeometryParams | None,
        resample: Tensor | None,
    ) -> GeometryParams:
        if params is not None:
            return params
        params = self.sample_geometry(batch["image"].shape[0], generator)
        if self.train_mode and self.options.crop_size and resample is not None:
            params = self.region_crop(batch, params, resample, generator)
        return params

    def _render(
        self,
        images: Tensor,
        image_size: Tensor,
        matrix: Tensor,
        bounds: Tensor,
        output_size: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Warped, (train) photometrically jittered images, ``fill`` outside the content."""
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        image = warp_images(replicate_padding(images, image_size), matrix, output_size)
        if self.train_mode:
            image = self._photometric(image, generator)
        # Outside the content is `fill`, whatever the warp or the photometric ops put there.
        inside = content_mask(bounds, output_size)[:, None]  # [B, 1, S, S]
        return torch.where(inside, image.clamp(0.0, 1.0), image.new_tensor(self.options.fill))

    def _move_cells(self, batch: Batch, matrix: Tensor, bounds: Tensor) -> dict[str, Tensor]:
        device = matrix.device
        labels = batch["labels"].to(device)
        moved = transform_boxes(batch["boxes"].to(device).float(), matrix)  # [B, M, 4]
        clipped = clip_boxes(moved, bounds)
        full_area = _width(moved) * _height(moved)
        visible_w, visible_h = _width(clipped), _height(clipped)
        keep = (
            (labels != IGNORE_INDEX)
            & (full_area > 0)
            & (visible_w * visible_h >= self.options.min_visibility * full_area)
            & (visible_w >= self.options.min_size)
            & (visible_h >= self.options.min_size)
        )  # [B, M]
        attributes = batch["attributes"].to(device)

        region_valid = batch["region_valid"].to(device)
        regions = clip_boxes(transform_boxes(batch["regions"].to(device).float(), matrix), bounds)
        region_valid = region_valid & (_width(regions) > 0) & (_height(regions) > 0)
        return {
            "boxes": torch.where(keep[..., None], clipped, 0.0),
            "labels": torch.where(keep, labels, IGNORE_INDEX),
            "attributes": torch.where(keep[..., None], attributes, IGNORE_INDEX),
            "regions": torch.where(region_valid[..., None], regions, 0.0),
            "region_valid": region_valid,
        }

    def _photometric(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        # An operation with probability 0 is skipped outright (no compute, no random draws).
        o = self.options
        if o.color_jitter > 0:
            images = self._colour(images, generator)
        if o.stain_jitter > 0:
            images = self._stain(images, generator)
        if o.blur > 0:
            images = self._blur(images, generator)
        if o.noise > 0:
            images = self._noise(images, generator)
        return apply_optics(images, o.optics, generator)

    def _colour(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        # Factors are sampled here (not by a kornia.augmentation module) so that `generator`
        # makes them reproducible; the adjustments are kornia's, as in its ColorJitter.
        batch_size, device = images.shape[0], images.device
        apply = _coin(self.options.color_jitter, batch_size, generator)

        def factor(neutral: float, low: float, high: float) -> Tensor:
            value = _uniform(low, high, (batch_size,), generator)
            return torch.where(apply, value, neutral).to(device=device, dtype=images.dtype)

        b, c, s = self.options.brightness, self.options.contrast, self.options.saturation
        images = adjust_brightness_accumulative(images, factor(1.0, max(0.0, 1 - b), 1 + b))
        images = adjust_contrast_with_mean_subtraction(images, factor(1.0, max(0.0, 1 - c), 1 + c))
        images = adjust_saturation_with_gray_subtraction(
            images, factor(1.0, max(0.0, 1 - s), 1 + s)
        )
        if self.options.hue > 0:
            # kornia's hue factor is in radians; ours in turns.
            hue = self.options.hue
            images = adjust_hue(images, factor(0.0, -hue, hue) * 2 * math.pi)
        return images.clamp(0.0, 1.0)

    def _stain(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch_size, device = images.shape[0], images.device
        a, b = self.options.stain_alpha, self.options.stain_beta
        alpha = _uniform(1 - a, 1 + a, (batch_size, 3), generator).to(device)
        beta = _uniform(-b, b, (batch_size, 3), generator).to(device)
        stained = _coin(self.options.stain_jitter, batch_size, generator).to(device)
        return torch.where(stained[:, None, None, None], stain_jitter(images, alpha, beta), images)

    def _blur(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch_size, device = images.shape[0], images.device
        sigma = _uniform(*BLUR_SIGMA, (batch_size, 1), generator).expand(-1, 2)
        blurred = _coin(self.options.blur, batch_size, generator).to(device)
        kernel = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
        # Replicate, not reflect: reflect padding fails on images smaller than the kernel.
        smooth = gaussian_blur2d(
            images, kernel, sigma.to(device=device, dtype=images.dtype), border_type="replicate"
        )
        return torch.where(blurred[:, None, None, None], smooth, images)

    def _noise(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch_size = images.shape[0]
        std = _uniform(0.0, NOISE_STD, (batch_size,), generator)
        std = torch.where(_coin(self.options.noise, batch_size, generator), std, 0.0)
        return images + std.to(images.device)[:, None, None, None] * self._normal(images, generator)

    @staticmethod
    def _normal(images: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is None or generator.device == images.device:
            return torch.randn(
                images.shape, generator=generator, device=images.device, dtype=images.dtype
            )
        # A CPU generator cannot fill a CUDA tensor: seed a device generator from it.
        device_generator = torch.Generator(device=images.device)
        device_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return torch.randn(
            images.shape, generator=device_generator, device=images.device, dtype=images.dtype
        )

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, train={self.train_mode}, {self.options}"


def _width(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0)


def _height(boxes: Tensor) -> Tensor:
    return (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
