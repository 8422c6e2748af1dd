"""Microscope optics and camera augmentation: what a different microscope does to the same smear.

`apply_optics` runs on a float batch ``[B, 3, H, W]`` in ``[0, 1]`` on any device and draws one set
of parameters per image from an optional CPU `torch.Generator` (so a seed reproduces a run). The
operations, in the order light meets them:

1. vignetting: radial falloff of the illumination, ``1 - strength * r^2`` (``r = 1`` at the corners
   of the image when the centre is the image centre), the centre shifted at random;
2. defocus: Gaussian point-spread function (kornia ``gaussian_blur2d``);
3. motion blur: a straight uniform streak at a random angle (kornia ``get_motion_kernel2d``),
   e.g. stage drift or vibration during the exposure;
4. exposure: one gain on all channels, highlights clip;
5. low light: a dimmer lamp at the same camera gain, with Poisson shot noise (photon counting) and
   Gaussian read noise;
6. white balance: per-channel gains (a colour cast), divided by their geometric mean so that the
   cast changes colour, not brightness (brightness is the exposure's job);
7. gamma: the camera's tone curve ``x ** gamma``;
8. JPEG: lossy compression at a random quality (kornia ``jpeg_codec_differentiable``).

Lengths are in pixels of the batch, i.e. of the working resolution the images were resampled to,
so a blur in pixels is a blur in micrometres. An operation with probability 0 costs nothing: no
compute and no random draws, so `Optics.off` reproduces the augmentation without this module
exactly. Operations only run on the images their coin chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import filter2d, gaussian_blur2d, get_motion_kernel2d
from torch import Tensor

#: The probability fields of `Optics`, in the order `apply_optics` runs the operations.
OPERATIONS: tuple[str, ...] = (
    "vignetting",
    "defocus",
    "motion_blur",
    "exposure",
    "low_light",
    "white_balance",
    "gamma",
    "jpeg",
)


@dataclass(frozen=True)
class Optics:
    """Random optics and camera changes per training image (probability and strength of each).

    Ranges are ``(low, high)``; a gain or exponent range is sampled log-uniformly (so ``(0.5, 2)``
    darkens as often as it brightens), the others uniformly. The defaults are moderate: every
    operation on a quarter of the images or so, at strengths a real microscope shows.

    Args:
        vignetting: probability of vignetting (radial falloff of the illumination) per image.
        vignetting_strength: fraction of light lost at the corners, range in [0, 1] (0.1 to 0.4 is typical of a camera port).
        vignetting_shift: largest offset of the falloff centre from the image centre, as a fraction of the half side.
        defocus: probability of a defocus blur (Gaussian point-spread function) per image.
        defocus_sigma: standard deviation range of the defocus blur in pixels (about 1 to 3 px is a visibly soft image).
        motion_blur: probability of a straight motion streak per image (stage drift, vibration).
        motion_length: streak length range in pixels, odd integers of at least 3.
        exposure: probability of an exposure change (one gain on all channels, highlights clip) per image.
        exposure_gain: exposure gain range, log-uniform (0.7 to 1.4 is about half a stop either way).
        low_light: probability of a dim lamp with shot and read noise per image.
        low_light_level: fraction of the light that remains, range in (0, 1].
        photons: photons a white pixel collects at full light, range, log-uniform (100 is a noisy camera, 1000s a good one).
        read_noise: standard deviation range of the Gaussian read noise, in units of full scale.
        white_balance: probability of a colour cast (per-channel gains) per image.
        white_balance_gain: largest per-channel gain ``g``; gains are log-uniform in ``[1/g, g]``, then divided by their geometric mean.
        gamma: probability of a tone curve ``x ** gamma`` per image.
        gamma_range: exponent range, log-uniform (the camera's gamma differs from ours by up to about 1.4x).
        jpeg: probability of JPEG compression per image.
        jpeg_quality: JPEG quality range in [1, 100] (web and older capture software save at 50 to 90).
    """

    vignetting: float = 0.3
    vignetting_strength: tuple[float, float] = (0.1, 0.4)
    vignetting_shift: float = 0.3
    defocus: float = 0.2
    defocus_sigma: tuple[float, float] = (0.8, 2.5)
    motion_blur: float = 0.2
    motion_length: tuple[int, int] = (3, 7)
    exposure: float = 0.3
    exposure_gain: tuple[float, float] = (0.7, 1.4)
    low_light: float = 0.2
    low_light_level: tuple[float, float] = (0.5, 0.9)
    photons: tuple[float, float] = (100.0, 1000.0)
    read_noise: tuple[float, float] = (0.0, 0.01)
    white_balance: float = 0.3
    white_balance_gain: float = 1.2
    gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.4)
    jpeg: float = 0.2
    jpeg_quality: tuple[float, float] = (40.0, 90.0)

    @classmethod
    def off(cls) -> Optics:
        """Every operation at probability 0 (the augmentation as it was before this module)."""
        return cls(**dict.fromkeys(OPERATIONS, 0.0))

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):  # jsonargparse and YAML give lists
                object.__setattr__(self, item.name, tuple(value))
        for name in OPERATIONS:
            _check_between(name, getattr(self, name), 0.0, 1.0)
        _check_range("vignetting_strength", self.vignetting_strength, 0.0, 1.0)
        _check_between("vignetting_shift", self.vignetting_shift, 0.0, 1.0)
        _check_range("defocus_sigma", self.defocus_sigma, 0.0, math.inf, open_low=True)
        low, high = _check_range("motion_length", self.motion_length, 3, math.inf)
        if low != int(low) or high != int(high) or low % 2 == 0 or high % 2 == 0:
            raise ValueError(f"motion_length must be odd integers, got {self.motion_length}")
        _check_range("exposure_gain", self.exposure_gain, 0.0, math.inf, open_low=True)
        _check_range("low_light_level", self.low_light_level, 0.0, 1.0, open_low=True)
        _check_range("photons", self.photons, 0.0, math.inf, open_low=True)
        _check_range("read_noise", self.read_noise, 0.0, math.inf)
        _check_between("white_balance_gain", self.white_balance_gain, 1.0, math.inf)
        _check_range("gamma_range", self.gamma_range, 0.0, math.inf, open_low=True)
        _check_range("jpeg_quality", self.jpeg_quality, 1.0, 100.0)


def apply_optics(
    images: Tensor, optics: Optics, generator: torch.Generator | None = None
) -> Tensor:
    """Apply the enabled operations of ``optics`` with fresh parameters per image.

    Args:
        images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``, on any device.
        optics: the probabilities and strengths (`Optics`).
        generator: CPU generator for reproducible randomness (default: global RNGs).

    Returns:
        float ``[B, 3, H, W]`` in ``[0, 1]``, same dtype and device; ``images`` itself when no
        operation is enabled.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"apply_optics needs float images [B, 3, H, W], got {images.dtype} {list(images.shape)}"
        )
    if not any(getattr(optics, name) > 0 for name in OPERATIONS):
        return images
    # kornia's filters and codec have no half-precision CPU kernels everywhere: work in float32.
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    batch_size = images.shape[0]
    for name in OPERATIONS:
        probability = getattr(optics, name)
        if probability <= 0:
            continue
        chosen = _coin(probability, batch_size, generator)
        # One parameter set per image, chosen or not: the op then runs on the chosen ones only.
        params = _SAMPLERS[name](optics, batch_size, generator)
        index = chosen.nonzero()[:, 0]
        if index.numel() == 0:
            continue
        index_on_device = index.to(images.device)
        picked = [p[index] for p in params]
        if name == "low_light":
            changed = low_light(work[index_on_device], *picked, generator=generator)
        else:
            changed = _APPLY[name](work[index_on_device], *picked)
        work = work.index_copy(0, index_on_device, changed.clamp(0.0, 1.0).to(work.dtype))
    return work.to(images.dtype)


def vignette(images: Tensor, strength: Tensor, centre: Tensor) -> Tensor:
    """Darken towards the edges: multiply by ``1 - strength * r^2`` (at least 0).

    Args:
        images: float ``[B, 3, H, W]``.
        strength: float ``[B]``, the light lost at distance ``r = 1``.
        centre: float ``[B, 2]`` ``(x, y)`` of the falloff centre, in ``[-1, 1]`` image units.

    Returns:
        float ``[B, 3, H, W]``. ``r`` is measured in half sides, divided by ``sqrt(2)``, so the
        corners of the image are at ``r = 1`` when the centre is the image centre.
    """
    height, width = images.shape[-2:]
    # Pixel centres in [-1, 1] along each axis.
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) + 0.5) / width * 2 - 1
    centre = centre.to(images.device, images.dtype)
    dx = xs[None, None, :] - centre[:, 0, None, None]  # [B, 1, W]
    dy = ys[None, :, None] - centre[:, 1, None, None]  # [B, H, 1]
    radius2 = (dx**2 + dy**2) / 2  # [B, H, W]
    falloff = (1 - _per_image(strength, images)[:, 0] * radius2).clamp(min=0.0)
    return images * falloff[:, None]


def defocus(images: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur with one standard deviation ``sigma`` ``[B]`` (pixels) per image."""
    kernel_size = 2 * math.ceil(3 * float(sigma.max())) + 1
    sigma = sigma.to(images.device, images.dtype)[:, None].expand(-1, 2)  # [B, 2] (y, x)
    # Replicate, not reflect: reflect padding fails on images smaller than the kernel.
    return gaussian_blur2d(images, kernel_size, sigma, border_type="replicate")


def motion_blur(images: Tensor, length: Tensor, angle: Tensor) -> Tensor:
    """A uniform straight streak per image.

    Args:
        images: float ``[B, 3, H, W]``.
        length: int ``[B]`` streak lengths in pixels (odd, at least 3).
        angle: float ``[B]`` streak directions in degrees (counter-clockwise as displayed).

    Returns:
        float ``[B, 3, H, W]``.
    """
    largest = int(length.max())
    kernels = torch.zeros(images.shape[0], largest, largest)  # [B, K, K]
    for size in length.unique().tolist():
        same = length == size
        line = get_motion_kernel2d(
            size, angle[same].float(), torch.zeros(int(same.sum())), mode="bilinear"
        )  # [n, size, size]
        pad = (largest - size) // 2
        kernels[same, pad : pad + size, pad : pad + size] = line
    kernels = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    return filter2d(images, kernels.to(images.device, images.dtype), border_type="replicate")


def expose(images: Tensor, gain: Tensor) -> Tensor:
    """Multiply each image by its exposure ``gain`` ``[B]`` (the caller clips the highlights)."""
    return images * _per_image(gain, images)


def low_light(
    images: Tensor,
    level: Tensor,
    photons: Tensor,
    read_noise: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dim the light to ``level`` and count photons: Poisson shot noise plus Gaussian read noise.

    Args:
        images: float ``[B, 3, H, W]`` in ``[0, 1]``.
        level: float ``[B]``, fraction of the light that remains.
        photons: float ``[B]``, photons a white pixel collects at full light.
        read_noise: float ``[B]``, read-noise standard deviation in units of full scale.
        generator: CPU generator for reproducible noise (default: global RNGs).

    Returns:
        float ``[B, 3, H, W]`` with mean ``level * images`` (before clipping).
    """
    full_scale = _per_image(photons, images)
    expected = images.clamp(min=0.0) * _per_image(level, images) * full_scale
    device_generator = _on_device(generator, images.device)
    counted = torch.poisson(expected, generator=device_generator) / full_scale
    noise = torch.randn(
        images.shape, generator=device_generator, device=images.device, dtype=images.dtype
    )
    return counted + _per_image(read_noise, images) * noise


def white_balance(images: Tensor, gains: Tensor) -> Tensor:
    """Multiply each channel by its gain, ``gains`` float ``[B, 3]`` (RGB)."""
    return images * gains.to(images.device, images.dtype)[:, :, None, None]


def gamma_curve(images: Tensor, gamma: Tensor) -> Tensor:
    """Tone curve ``images ** gamma`` with one exponent ``gamma`` ``[B]`` per image."""
    return images.clamp(min=0.0) ** _per_image(gamma, images)


def jpeg(images: Tensor, quality: Tensor) -> Tensor:
    """JPEG compression and decompression at one quality ``[B]`` in [1, 100] per image."""
    return jpeg_codec_differentiable(images, quality.to(images.device, images.dtype))


def _sample_vignetting(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    strength = _uniform(*o.vignetting_strength, (n,), generator)
    centre = _uniform(-o.vignetting_shift, o.vignetting_shift, (n, 2), generator)
    return [strength, centre]


def _sample_defocus(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [_uniform(*o.defocus_sigma, (n,), generator)]


def _sample_motion(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    low, high = (int(v) for v in o.motion_length)
    # Odd lengths only, so every streak is centred on its pixel.
    half = torch.randint(low // 2, high // 2 + 1, (n,), generator=generator)
    angle = _uniform(0.0, 180.0, (n,), generator)
    return [2 * half + 1, angle]


def _sample_exposure(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [_log_uniform(*o.exposure_gain, (n,), generator)]


def _sample_low_light(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    level = _uniform(*o.low_light_level, (n,), generator)
    photons = _log_uniform(*o.photons, (n,), generator)
    read_noise = _uniform(*o.read_noise, (n,), generator)
    return [level, photons, read_noise]


def _sample_white_balance(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    gains = _log_uniform(1 / o.white_balance_gain, o.white_balance_gain, (n, 3), generator)
    return [gains / gains.log().mean(dim=1, keepdim=True).exp()]  # geometric mean 1


def _sample_gamma(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [_log_uniform(*o.gamma_range, (n,), generator)]


def _sample_jpeg(o: Optics, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [_uniform(*o.jpeg_quality, (n,), generator)]


_Sampler = Callable[[Optics, int, torch.Generator | None], list[Tensor]]
_SAMPLERS: dict[str, _Sampler] = {
    "vignetting": _sample_vignetting,
    "defocus": _sample_defocus,
    "motion_blur": _sample_motion,
    "exposure": _sample_exposure,
    "low_light": _sample_low_light,
    "white_balance": _sample_white_balance,
    "gamma": _sample_gamma,
    "jpeg": _sample_jpeg,
}
_APPLY: dict[str, Callable[..., Tensor]] = {
    "vignetting": vignette,
    "defocus": defocus,
    "motion_blur": motion_blur,
    "exposure": expose,
    "white_balance": white_balance,
    "gamma": gamma_curve,
    "jpeg": jpeg,
}


def _per_image(values: Tensor, images: Tensor) -> Tensor:
    """``[B]`` values as ``[B, 1, 1, 1]`` on the images' device and dtype."""
    return values.to(images.device, images.dtype)[:, None, None, None]


def _on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if generator is None or generator.device == device:
        return generator
    # A CPU generator cannot fill a CUDA tensor: seed a device generator from it.
    device_generator = torch.Generator(device=device)
    device_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    return device_generator


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def _log_uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    return _uniform(math.log(low), math.log(high), shape, generator).exp()


def _coin(probability: float, batch_size: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(batch_size, generator=generator) < probability


def _check_between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_range(
    name: str,
    value: tuple[float, float],
    low: float,
    high: float,
    open_low: bool = False,
) -> tuple[float, float]:
    """Check that ``value`` is a ``(low, high)`` pair inside ``[low, high]`` (``(low`` if open)."""
    bracket = "(" if open_low else "["
    if (
        len(value) != 2
        or not value[0] <= value[1]
        or value[0] < low
        or (open_low and value[0] == low)
        or value[1] > high
    ):
        raise ValueError(
            f"{name} must be a (low, high) range within {bracket}{low}, {high}], got {value}"
        )
    return value[0], value[1]
