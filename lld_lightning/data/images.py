"""Robust image reading: any common PIL mode -> RGB uint8, with a size limit.

Conversions (each counted by the loaders in ``DataReport.converted[mode]``):

- ``1``, ``L``: gray replicated to three channels;
- ``I;16*`` (16-bit) and ``I`` (PIL's mode for some 16-bit files): scaled ``v -> round(v / 257)``
  so that 65535 maps to 255 (never clipped); an ``I`` value outside ``[0, 65535]`` is an error;
- ``RGBA``, ``LA``, ``PA`` and palette images with transparency: **composited onto white**
  (blood-film background is bright, so a transparent margin reads as background, not as a
  black object);
- ``P`` (palette) without transparency, ``CMYK``, ``YCbCr``, ``RGBX``: PIL's conversion to RGB.

Pixels are taken as stored: EXIF orientation is not applied, because label files give boxes in
the stored pixel grid. Truncated files are errors (PIL's global ``LOAD_TRUNCATED_IMAGES`` is left
alone).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lld_lightning.data.errors import DataError

#: Default limit on ``width * height`` of one image (a decompression-bomb guard).
DEFAULT_MAX_IMAGE_PIXELS: int = 50_000_000

#: Image file extensions the loaders look for (lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_PIL_CONVERTED_MODES = frozenset({"P", "CMYK", "YCbCr", "RGBX", "1", "L"})
SUPPORTED_MODES: frozenset[str] = _SIXTEEN_BIT_MODES | _ALPHA_MODES | _PIL_CONVERTED_MODES | {"RGB"}
#: Largest value of a 16-bit sample; ``/ 257`` maps it onto 255 exactly.
_UINT16_MAX = 65535


def _open(path: Path, max_image_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only) and enforce the size limit."""
    try:
        with warnings.catch_warnings():
            # The explicit size check below replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError.at(path, f"image too large: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError.at(path, f"cannot read image: {err}") from err
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise DataError.at(path, f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        image.close()
        raise DataError.at(
            path,
            f"image too large: {width}x{height} = {width * height} pixels > "
            f"max_image_pixels {max_image_pixels}",
        )
    if image.mode not in SUPPORTED_MODES:
        image.close()
        raise DataError.at(path, f"unsupported image mode {image.mode!r}")
    return image


def probe_image(
    path: str | Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[int, int, str]:
    """Read only the header of an image.

    Args:
        path: image file.
        max_image_pixels: limit on ``width * height``.

    Returns:
        ``(width, height, mode)``, mode as PIL names it (``"RGB"``, ``"L"``, ``"I;16"``...).

    Raises:
        DataError: unreadable header, unsupported mode or too many pixels.
    """
    path = Path(path)
    with _open(path, max_image_pixels) as image:
        return image.size[0], image.size[1], image.mode


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``[H, W, 4]`` uint8 -> ``[H, W, 3]`` uint8, alpha-blended over a white background."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    # Rounded integer blend: rgb * a + 255 * (255 - a), divided by 255.
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _sixteen_bit_to_gray(path: Path, image: Image.Image) -> np.ndarray:
    """16-bit gray (``I;16*`` or ``I``) -> ``[H, W]`` uint8, scaled, never clipped."""
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _UINT16_MAX):
        raise DataError.at(
            path,
            f"mode {image.mode!r} values span [{values.min()}, {values.max()}], outside the "
            f"16-bit range [0, {_UINT16_MAX}]",
        )
    return ((values * 255 + _UINT16_MAX // 2) // _UINT16_MAX).astype(np.uint8)


def _to_rgb_array(path: Path, image: Image.Image) -> np.ndarray:
    """Decoded PIL image of any supported mode -> ``[H, W, 3]`` uint8."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_bit_to_gray(path, image)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def read_image(path: str | Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image into RGB uint8.

    Args:
        path: image file (jpg, png, bmp, tif...).
        max_image_pixels: limit on ``width * height``.

    Returns:
        uint8 ``[3, H, W]`` RGB tensor.

    Raises:
        DataError: unreadable, truncated or corrupt file, unsupported mode, too many pixels.
    """
    path = Path(path)
    with _open(path, max_image_pixels) as image:
        try:
            image.load()
            array = _to_rgb_array(path, image)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError.at(path, f"corrupt or truncated image: {err}") from err
    # copy: the array may be a read-only view of PIL's buffer.
    return torch.from_numpy(np.ascontiguousarray(array).copy()).permute(2, 0, 1).contiguous()


def needs_conversion(mode: str) -> bool:
    """Whether images of this PIL mode are converted (i.e. are not plain RGB)."""
    return mode != "RGB"
