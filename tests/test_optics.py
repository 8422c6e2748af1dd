"""Optics augmentation: each operation does what it claims, seeds reproduce, probability 0 is free."""

from __future__ import annotations

import re
from dataclasses import fields, replace

import pytest
import torch

from lld_lightning.data.optics import (
    OPERATIONS,
    Optics,
    apply_optics,
    defocus,
    expose,
    gamma_curve,
    jpeg,
    low_light,
    motion_blur,
    vignette,
    white_balance,
)


def smooth_image(batch_size: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Float [B, 3, size, size] in [0.2, 0.9]: a bright background with soft dark blobs, like a smear."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, size // 8, size // 8, generator=generator)
    blobs = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return 0.2 + 0.7 * blobs


def only(name: str, **strengths) -> Optics:
    """Every operation off except ``name`` at probability 1."""
    return replace(Optics.off(), **{name: 1.0}, **strengths)


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference of horizontal and vertical neighbours."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return float(dx.pow(2).mean() + dy.pow(2).mean())


def test_a_seed_reproduces_the_output_and_another_seed_changes_it() -> None:
    images = smooth_image(4)
    strong = replace(Optics(), **dict.fromkeys(OPERATIONS, 0.7))
    first = apply_optics(images, strong, torch.Generator().manual_seed(3))
    again = apply_optics(images, strong, torch.Generator().manual_seed(3))
    other = apply_optics(images, strong, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "options", [Optics.off(), replace(Optics(), **dict.fromkeys(OPERATIONS, 0.0))]
)
def test_probability_zero_changes_nothing_and_draws_nothing(options: Optics) -> None:
    images = smooth_image()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = apply_optics(images, options, generator)
    assert torch.equal(out, images)
    assert torch.equal(generator.get_state(), state)


def test_operations_at_probability_zero_draw_nothing_beside_an_enabled_one() -> None:
    """Gamma alone draws a coin and an exponent per image; the seven others draw nothing."""
    images = smooth_image(4)
    generator = torch.Generator().manual_seed(0)
    apply_optics(images, only("gamma"), generator)
    reference = torch.Generator().manual_seed(0)
    torch.rand(2 * 4, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


@pytest.mark.parametrize("name", OPERATIONS)
def test_each_operation_alone_keeps_shape_dtype_range_and_is_per_image(name: str) -> None:
    images = smooth_image(4).expand(4, -1, -1, -1).contiguous()  # four copies of one image
    images[:] = images[0]
    out = apply_optics(images, only(name), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.equal(out, images)
    assert not torch.allclose(out[0], out[1])  # each image gets its own parameters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_every_operation_at_full_strength_keeps_dtype_and_range(dtype: torch.dtype) -> None:
    extreme = replace(
        Optics(),
        **dict.fromkeys(OPERATIONS, 1.0),
        exposure_gain=(2.0, 3.0),
        low_light_level=(0.05, 0.1),
        photons=(5.0, 10.0),
        read_noise=(0.1, 0.2),
        jpeg_quality=(1.0, 5.0),
    )
    images = smooth_image(3, size=20).to(dtype)  # not a multiple of the JPEG block size
    out = apply_optics(images, extreme, torch.Generator().manual_seed(0))
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.isfinite(out.float()).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_probability_half_changes_some_images_and_keeps_the_others_bit_identical() -> None:
    images = smooth_image(16)
    out = apply_optics(images, replace(Optics.off(), gamma=0.5), torch.Generator().manual_seed(0))
    unchanged = [torch.equal(out[i], images[i]) for i in range(16)]
    assert 0 < sum(unchanged) < 16


def test_white_balance_changes_the_channel_ratio_by_the_gains() -> None:
    images = smooth_image()
    gains = torch.tensor([[1.2, 1.0, 1 / 1.2], [1.0, 1.0, 1.0]])
    out = white_balance(images, gains)
    ratio_before = images[:, 0].mean((1, 2)) / images[:, 2].mean((1, 2))
    ratio_after = out[:, 0].mean((1, 2)) / out[:, 2].mean((1, 2))
    torch.testing.assert_close(ratio_after / ratio_before, torch.tensor([1.44, 1.0]))
    # Sampled gains are a cast, not a brightness change: their geometric mean is 1.
    grey = torch.full((8, 3, 4, 4), 0.5)
    cast = apply_optics(grey, only("white_balance"), torch.Generator().manual_seed(0))
    channel = cast.mean((2, 3))  # [8, 3]
    assert (channel.amax(1) / channel.amin(1)).max() > 1.05
    torch.testing.assert_close(channel.log().mean(1).exp(), torch.full((8,), 0.5))


def test_vignetting_darkens_corners_more_than_the_centre_and_follows_its_centre() -> None:
    flat = torch.full((2, 3, 33, 33), 0.8)
    centre = torch.tensor([[0.0, 0.0], [0.5, 0.0]])  # the second one right of centre
    out = vignette(flat, torch.tensor([0.4, 0.4]), centre)
    middle = out[0, :, 16, 16]
    corners = out[0, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    torch.testing.assert_close(middle, torch.full((3,), 0.8), atol=1e-3, rtol=0)
    assert (corners < 0.8 * 0.7).all()  # about 40 % lost at the corners
    assert out[1, 0, 16, 0] < out[1, 0, 16, -1]  # left edge is further from the shifted centre
    sampled = apply_optics(flat, only("vignetting"), torch.Generator().manual_seed(0))
    assert (sampled[:, :, 0, 0] < sampled[:, :, 16, 16]).all()


def test_defocus_lowers_high_frequencies_and_keeps_the_mean() -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = defocus(images, torch.tensor([1.0, 2.5]))
    energy = [high_frequency_energy(out[i]) for i in range(2)]
    assert energy[1] < energy[0] < 0.2 * high_frequency_energy(images)
    torch.testing.assert_close(out.mean(), images.mean(), atol=0.01, rtol=0)


def test_motion_blur_smears_along_its_angle_only() -> None:
    columns = torch.zeros(2, 3, 16, 16)
    columns[..., ::2] = 1.0  # vertical stripes: change along x only
    rows = columns.transpose(-1, -2).contiguous()  # horizontal stripes
    length, angle = torch.tensor([5, 3]), torch.tensor([0.0, 0.0])  # horizontal streaks
    torch.testing.assert_close(motion_blur(rows, length, angle), rows)
    smeared = motion_blur(columns, length, angle)
    assert high_frequency_energy(smeared) < 0.2 * high_frequency_energy(columns)
    # Turned by 90 degrees the roles swap.
    vertical = torch.tensor([90.0, 90.0])
    torch.testing.assert_close(motion_blur(columns, length, vertical), columns)
    assert high_frequency_energy(motion_blur(rows, length, vertical)) < 0.2 * high_frequency_energy(
        rows
    )


def test_jpeg_introduces_error_but_keeps_the_mean_and_lower_quality_errs_more() -> None:
    images = smooth_image(1, size=32).expand(2, -1, -1, -1) + 0.05 * torch.rand(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    out = jpeg(images.clamp(0, 1), torch.tensor([20.0, 90.0]))
    error = (out - images).abs().mean((1, 2, 3))
    assert error[1] > 1e-3 and error[0] > error[1]
    torch.testing.assert_close(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=0.01, rtol=0)


def test_low_light_lowers_the_mean_and_adds_shot_noise_of_the_right_size() -> None:
    flat = torch.full((2, 3, 64, 64), 0.8)
    level, photons = torch.tensor([0.5, 0.5]), torch.tensor([50.0, 5000.0])
    out = low_light(flat, level, photons, torch.zeros(2), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.mean((1, 2, 3)), torch.full((2,), 0.4), atol=0.01, rtol=0)
    # Poisson: variance of count / photons is mean / photons.
    expected_std = (0.4 / photons).sqrt()
    torch.testing.assert_close(out.std((1, 2, 3)), expected_std, rtol=0.1, atol=0)
    with_read = low_light(flat, level, photons, torch.full((2,), 0.05), torch.Generator())
    assert with_read[1].std() > 0.04  # read noise dominates the bright camera


def test_exposure_scales_and_gamma_bends_the_tone_curve() -> None:
    grey = torch.tensor([0.0, 0.25, 0.5, 1.0]).reshape(1, 1, 1, 4).expand(2, 3, 1, 4)
    torch.testing.assert_close(
        expose(grey, torch.tensor([2.0, 0.5]))[:, 0, 0],
        torch.tensor([[0.0, 0.5, 1.0, 2.0], [0.0, 0.125, 0.25, 0.5]]),
    )
    bent = gamma_curve(grey, torch.tensor([2.0, 0.5]))[:, 0, 0]
    torch.testing.assert_close(
        bent, torch.tensor([[0.0, 0.0625, 0.25, 1.0], [0.0, 0.5, 0.5**0.5, 1.0]])
    )
    clipped = apply_optics(grey, only("exposure", exposure_gain=(2.0, 2.0)))
    assert float(clipped.max()) == 1.0


def test_every_option_has_a_one_line_docstring() -> None:
    """jsonargparse shows these as the help of --data.augmentation.optics.<field>."""
    documented = set(re.findall(r"^        (\w+): \S", Optics.__doc__ or "", flags=re.MULTILINE))
    assert documented == {f.name for f in fields(Optics)}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"jpeg": 1.5}, "jpeg must be in"),
        ({"gamma": -0.1}, "gamma must be in"),
        ({"vignetting_strength": (0.5, 0.2)}, "vignetting_strength"),
        ({"vignetting_strength": (0.2, 1.5)}, "vignetting_strength"),
        ({"defocus_sigma": (0.0, 1.0)}, "defocus_sigma"),
        ({"motion_length": (4, 7)}, "motion_length must be odd"),
        ({"motion_length": (1, 5)}, "motion_length"),
        ({"exposure_gain": (0.0, 1.0)}, "exposure_gain"),
        ({"low_light_level": (0.5, 1.2)}, "low_light_level"),
        ({"photons": (-1.0, 10.0)}, "photons"),
        ({"read_noise": (0.1,)}, "read_noise"),
        ({"white_balance_gain": 0.8}, "white_balance_gain"),
        ({"gamma_range": (1.4, 0.7)}, "gamma_range"),
        ({"jpeg_quality": (0.0, 90.0)}, "jpeg_quality"),
    ],
)
def test_bad_optics_settings_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Optics(**options)


def test_lists_from_a_config_become_tuples() -> None:
    assert Optics(gamma_range=[0.8, 1.2]).gamma_range == (0.8, 1.2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "images", [torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8)]
)
def test_images_that_are_not_float_rgb_are_refused(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"float images \[B, 3, H, W\]"):
        apply_optics(images, Optics())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_with_a_cpu_generator_is_reproducible_and_stays_on_the_device() -> None:
    images = smooth_image(4).cuda()
    strong = replace(Optics(), **dict.fromkeys(OPERATIONS, 1.0))
    first = apply_optics(images, strong, torch.Generator().manual_seed(0))
    again = apply_optics(images, strong, torch.Generator().manual_seed(0))
    assert first.is_cuda and first.dtype == images.dtype
    assert torch.equal(first, again)
    # The same parameters as on the CPU, up to floating point (the noise streams differ).
    cpu = apply_optics(
        images.cpu(), replace(strong, low_light=0.0), torch.Generator().manual_seed(0)
    )
    gpu = apply_optics(images, replace(strong, low_light=0.0), torch.Generator().manual_seed(0))
    # JPEG's rounding can flip a coefficient on a last-bit difference, so compare on average.
    assert float((gpu.cpu() - cpu).abs().mean()) < 1e-3
