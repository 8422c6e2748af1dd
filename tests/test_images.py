"""read_image / probe_image: every PIL mode to RGB uint8, errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lld_lightning.data.errors import DataError
from lld_lightning.data.images import probe_image, read_image


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_rgb_is_read_exactly(tmp_path: Path) -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # [H=2, W=3, 3]
    path = save(Image.fromarray(pixels, "RGB"), tmp_path / "a.png")
    out = read_image(path)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 3)
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1))


def test_probe_reads_header_only(tmp_path: Path) -> None:
    path = save(Image.new("L", (7, 5)), tmp_path / "a.png")
    assert probe_image(path) == (7, 5, "L")


@pytest.mark.parametrize("mode", ["L", "1"])
def test_gray_and_bilevel_replicated(tmp_path: Path, mode: str) -> None:
    gray = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert(mode)
    out = read_image(save(gray, tmp_path / "a.png"))
    assert out.tolist() == [[[0, 255]]] * 3


def test_sixteen_bit_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 25700, 32896, 65535, 128]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "a.png")
    assert probe_image(path)[2] == "I;16"
    # v / 257: 25700 -> 100, 32896 -> 128, 65535 -> 255, 128 -> 0.498 -> 0.
    assert read_image(path)[0].tolist() == [[0, 100, 128, 255, 0]]


def test_mode_i_treated_as_sixteen_bit(tmp_path: Path) -> None:
    values = np.array([[0, 2570, 65535]], dtype=np.int32)
    path = save(Image.fromarray(values, "I"), tmp_path / "a.tif")
    assert probe_image(path)[2] == "I"
    assert read_image(path)[1].tolist() == [[0, 10, 255]]
    bad = save(Image.fromarray(np.array([[70000]], dtype=np.int32), "I"), tmp_path / "b.tif")
    with pytest.raises(DataError, match="outside the 16-bit range") as info:
        read_image(bad)
    assert str(bad) in str(info.value)


def test_rgba_composited_onto_white(tmp_path: Path) -> None:
    pixels = np.array([[[100, 50, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    out = read_image(save(Image.fromarray(pixels, "RGBA"), tmp_path / "a.png"))
    # (c * a + 255 * (255 - a)) / 255, rounded: 100,50,0 @128 -> 177, 152, 127.
    assert out.permute(1, 2, 0).tolist() == [[[177, 152, 127], [255, 255, 255], [10, 20, 30]]]


def test_gray_alpha_composited(tmp_path: Path) -> None:
    pixels = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    out = read_image(save(Image.fromarray(pixels, "LA"), tmp_path / "a.png"))
    assert out[:, 0].T.tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    image.putpalette([200, 10, 20, 5, 6, 7] + [0] * 762)
    plain = read_image(save(image, tmp_path / "a.png"))
    assert plain.permute(1, 2, 0).tolist() == [[[200, 10, 20], [5, 6, 7]]]
    image.info["transparency"] = 1
    path = tmp_path / "b.png"
    image.save(path, transparency=1)
    assert read_image(path).permute(1, 2, 0).tolist() == [[[200, 10, 20], [255, 255, 255]]]


def test_cmyk(tmp_path: Path) -> None:
    pixels = np.array([[[0, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8)
    out = read_image(save(Image.fromarray(pixels, "CMYK"), tmp_path / "a.tif"))
    assert out.permute(1, 2, 0).tolist() == [[[255, 255, 255], [255, 0, 0]]]


def test_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\x00\x01 definitely not an image")
    for read in (probe_image, read_image):
        with pytest.raises(DataError, match="cannot read image") as info:
            read(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_is_an_error(tmp_path: Path, suffix: str) -> None:
    path = save(Image.effect_noise((64, 64), 60).convert("RGB"), tmp_path / f"t.{suffix}")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert probe_image(path)[:2] == (64, 64)
    with pytest.raises(DataError, match="truncated") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_too_many_pixels(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (10, 10)), tmp_path / "a.png")
    assert probe_image(path, max_image_pixels=100)[:2] == (10, 10)
    for read in (probe_image, read_image):
        with pytest.raises(DataError, match="100 pixels > max_image_pixels 99") as info:
            read(path, max_image_pixels=99)
        assert str(path) in str(info.value)


def test_unsupported_mode(tmp_path: Path) -> None:
    path = save(Image.new("F", (2, 2)), tmp_path / "a.tif")
    with pytest.raises(DataError, match="unsupported image mode 'F'"):
        probe_image(path)
