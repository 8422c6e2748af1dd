"""DeviceAugmentation: geometry against hand-computed boxes and pixels, filtering, photometry."""

from __future__ import annotations

import math

import pytest
import torch

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.sample import collate
from lld_lightning.data.transforms import (
    Augmentation,
    DeviceAugmentation,
    GeometryParams,
    geometry_matrix,
    invert_boxes,
    stain_jitter,
    transform_boxes,
)

NUM_ATTRIBUTES = 7
FILL = 0.5


def make_batch(
    image: torch.Tensor,
    boxes: list[list[float]],
    regions: list[list[float]] | None = None,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """One-image batch: ``image`` uint8 [3, H, W]; labels 0..n-1; attributes = label."""
    n = len(boxes)
    labels = torch.arange(n, dtype=torch.int64)
    regions = regions if regions is not None else [[0.0, 0.0, image.shape[2], image.shape[1]]]
    size = image_size if image_size is not None else (image.shape[1], image.shape[2])
    return {
        "image": image[None],
        "image_size": torch.tensor([size], dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(1, n, 4),
        "labels": labels[None],
        "attributes": labels[None, :, None].repeat(1, 1, NUM_ATTRIBUTES),
        "regions": torch.tensor(regions, dtype=torch.float32)[None],
        "region_valid": torch.ones(1, len(regions), dtype=torch.bool),
        "domain": ["d"],
        "image_id": torch.tensor([0]),
        "path": ["x.png"],
    }


def single_pixel_batch() -> dict:
    """A 4x6 (h x w) black image with one white pixel at row 1, column 2, boxed by [2, 1, 3, 2]."""
    image = torch.zeros(3, 4, 6, dtype=torch.uint8)
    image[:, 1, 2] = 255
    return make_batch(image, [[2.0, 1.0, 3.0, 2.0]], regions=[[0.0, 0.0, 3.0, 2.0]])


def params(**overrides) -> GeometryParams:
    p = GeometryParams.identity(1)
    for name, value in overrides.items():
        setattr(p, name, torch.as_tensor(value).reshape(getattr(p, name).shape))
    return p


def augment(image_size: int, train: bool = True, **options) -> DeviceAugmentation:
    """`DeviceAugmentation` letterboxing to ``image_size`` (no crops unless asked) with ``options``."""
    return DeviceAugmentation(image_size, train, Augmentation(**{"crop_size": None, **options}))


def geometric_only(image_size: int, **kwargs) -> DeviceAugmentation:
    """Train mode without photometry, so pixels can be compared exactly."""
    return augment(
        image_size,
        color_jitter=0.0,
        stain_jitter=0.0,
        blur=0.0,
        noise=0.0,
        fill=FILL,
        **{"min_size": 0.5, **kwargs},
    )


def box_mean(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mean of [C, H, W] over the pixels whose centres lie inside the xyxy box."""
    h, w = image.shape[-2:]
    ys = torch.arange(h) + 0.5
    xs = torch.arange(w) + 0.5
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None]
    return image[:, inside].mean()


# --- geometry, by hand: the 4x6 image, white pixel at (row 1, col 2), box [2, 1, 3, 2] -------


@pytest.mark.parametrize(
    ("overrides", "pixel", "box", "region", "content_hw"),
    [
        # hflip: x -> W - x = 6 - x, column c -> W - 1 - c = 3.
        ({"hflip": True}, (1, 3), [3, 1, 4, 2], [3, 0, 6, 2], (4, 6)),
        # vflip: y -> H - y = 4 - y, row r -> H - 1 - r = 2.
        ({"vflip": True}, (2, 2), [2, 2, 3, 3], [0, 2, 3, 4], (4, 6)),
        # 90 deg counter-clockwise: (x, y) -> (y, W - x); pixel (r, c) -> (W - 1 - c, r) = (3, 1).
        ({"quarter_turns": 1}, (3, 1), [1, 3, 2, 4], [0, 3, 2, 6], (6, 4)),
        # 90 deg clockwise: (x, y) -> (H - y, x); pixel (r, c) -> (c, H - 1 - r) = (2, 2).
        ({"quarter_turns": 3}, (2, 2), [2, 2, 3, 3], [2, 0, 4, 3], (6, 4)),
        # translate (+1, +2) output pixels.
        ({"translate": [1.0, 2.0]}, (3, 3), [3, 3, 4, 4], [1, 2, 4, 4], (4, 6)),
    ],
)
def test_geometry_moves_pixel_box_and_region_by_hand(overrides, pixel, box, region, content_hw):
    batch = single_pixel_batch()
    out = geometric_only(image_size=6)(batch, params=params(**overrides))
    image = out["image"][0]

    expected = torch.zeros(6, 6)
    expected[pixel] = 1.0
    if "translate" not in overrides:
        h, w = content_hw
        expected[h:, :] = FILL
        expected[:, w:] = FILL
    else:
        expected[:2, :] = FILL
        expected[:, :1] = FILL
    for channel in range(3):
        torch.testing.assert_close(image[channel], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"][0, 0], torch.tensor(box, dtype=torch.float32))
    torch.testing.assert_close(out["regions"][0, 0], torch.tensor(region, dtype=torch.float32))
    assert out["labels"].tolist() == [[0]]
    assert bool(out["region_valid"][0, 0])
    # The box holds the pixel: mean inside the moved box = mean inside the original box = 1.
    assert box_mean(image, out["boxes"][0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_flips_and_turns_match_torch_on_a_random_square_image():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    batch = make_batch(image, [[1.0, 0.0, 3.0, 4.0]])
    reference = image.float() / 255
    cases = [
        ({"hflip": True}, reference.flip(-1)),
        ({"vflip": True}, reference.flip(-2)),
        ({"quarter_turns": 1}, torch.rot90(reference, 1, (-2, -1))),
        ({"quarter_turns": 3}, torch.rot90(reference, -1, (-2, -1))),
        ({"quarter_turns": 2}, torch.rot90(reference, 2, (-2, -1))),
        # Flips first, then the turn.
        ({"hflip": True, "quarter_turns": 1}, torch.rot90(reference.flip(-1), 1, (-2, -1))),
    ]
    for overrides, expected in cases:
        out = geometric_only(image_size=5)(batch, params=params(**overrides))
        torch.testing.assert_close(out["image"][0], expected, atol=1e-5, rtol=0)
        # Pixel content: the mean inside the moved box equals the mean inside the original box.
        assert box_mean(out["image"][0], out["boxes"][0, 0]) == pytest.approx(
            float(box_mean(reference, batch["boxes"][0, 0])), abs=1e-5
        )


def test_letterbox_100x50_to_64_by_hand():
    image = torch.zeros(3, 100, 50, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 200  # a uniform block exactly under the box
    batch = make_batch(image, [[10.0, 20.0, 30.0, 40.0]])
    out = augment(64, train=False, fill=FILL)(batch)

    scale = 64 / 100  # the longer side (h = 100) becomes 64
    expected_transform = torch.tensor([[scale, 0, 0], [0, scale, 0], [0, 0, 1.0]])
    torch.testing.assert_close(out["transform"][0], expected_transform)
    torch.testing.assert_close(out["boxes"][0, 0], torch.tensor([6.4, 12.8, 19.2, 25.6]))
    torch.testing.assert_close(out["regions"][0, 0], torch.tensor([0.0, 0.0, 32.0, 64.0]))
    assert out["image"].shape == (1, 3, 64, 64)
    # Content is 32 wide (50 * 0.64) at the top-left; the rest is padding at `fill`.
    assert torch.all(out["image"][0, :, :, 32:] == FILL)
    # Interior of the moved box (1 px away from its edges, where bilinear blends) is the block.
    inner = out["image"][0, :, 14:25, 8:18]
    torch.testing.assert_close(inner, torch.full_like(inner, 200 / 255), atol=1e-5, rtol=0)
    assert box_mean(out["image"][0], out["boxes"][0, 0]) == pytest.approx(200 / 255, abs=0.05)


def test_zoom_about_centre_keeps_box_content():
    # A smooth 20x20 image (horizontal ramp) so bilinear interpolation is nearly exact.
    ramp = torch.linspace(0, 255, 20).round().to(torch.uint8)
    image = ramp[None, None, :].expand(3, 20, 20).contiguous()
    batch = make_batch(image, [[4.0, 6.0, 12.0, 14.0]])
    out = geometric_only(image_size=20)(batch, params=params(scale=1.5, translate=[1.0, -2.0]))
    # x' = 1.5 (x - 10) + 10 + 1, y' = 1.5 (y - 10) + 10 - 2.
    torch.testing.assert_close(out["boxes"][0, 0], torch.tensor([2.0, 2.0, 14.0, 14.0]))
    original = box_mean(image.float() / 255, batch["boxes"][0, 0])
    assert box_mean(out["image"][0], out["boxes"][0, 0]) == pytest.approx(float(original), abs=0.01)


# --- clipping and dropping ------------------------------------------------------------------


def test_box_leaving_the_image_is_dropped_and_half_visible_box_is_clipped():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    boxes = [[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 3.0, 3.0]]
    batch = make_batch(image, boxes, regions=[[0.0, 0.0, 3.0, 8.0], [4.0, 0.0, 8.0, 8.0]])
    # Shift right by 4: box 0 -> [6, 2, 10, 6], half visible -> [6, 2, 8, 6]; box 1 -> [4, 0, 7, 3].
    out = geometric_only(image_size=8, min_size=2.0)(batch, params=params(translate=[4.0, 0.0]))
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[6.0, 2, 8, 6], [4, 0, 7, 3]]))
    assert out["labels"].tolist() == [[0, 1]]
    torch.testing.assert_close(
        out["regions"][0],
        # Region 1 -> [8, 0, 12, 8], clipped to the empty [8, 0, 8, 8]: invalid and zeroed.
        torch.tensor([[4.0, 0, 7, 8], [0, 0, 0, 0]]),
    )
    assert out["region_valid"].tolist() == [[True, False]]

    # Visible half (0.5) < 0.6 of its area -> dropped; shifted out entirely -> dropped.
    out = geometric_only(image_size=8, min_visibility=0.6)(
        batch, params=params(translate=[4.0, 0.0])
    )
    assert out["labels"].tolist() == [[IGNORE_INDEX, 1]]
    assert out["attributes"][0, 0].tolist() == [IGNORE_INDEX] * NUM_ATTRIBUTES
    assert out["attributes"][0, 1].tolist() == [1] * NUM_ATTRIBUTES
    torch.testing.assert_close(out["boxes"][0, 0], torch.zeros(4))

    out = geometric_only(image_size=8)(batch, params=params(translate=[20.0, 0.0]))
    assert out["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX]]
    assert out["region_valid"].tolist() == [[False, False]]
    assert torch.all(out["boxes"] == 0) and torch.all(out["regions"] == 0)


def test_small_boxes_are_dropped_by_min_size():
    image = torch.zeros(3, 10, 10, dtype=torch.uint8)
    batch = make_batch(image, [[1.0, 1.0, 2.5, 5.0], [4.0, 4.0, 8.0, 8.0]])
    out = augment(10, train=False, min_size=2.0)(batch)
    assert out["labels"].tolist() == [[IGNORE_INDEX, 1]]


def test_padding_cells_stay_padding_and_empty_batches_work():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    batch = make_batch(image, [[1.0, 1.0, 5.0, 5.0]])
    # A padding slot with a stale non-empty box must stay padding, and its box is zeroed.
    batch["boxes"] = torch.cat([batch["boxes"], torch.tensor([[[2.0, 2.0, 6.0, 6.0]]])], 1)
    batch["labels"] = torch.tensor([[2, IGNORE_INDEX]])
    batch["attributes"] = torch.full((1, 2, NUM_ATTRIBUTES), IGNORE_INDEX)
    out = geometric_only(image_size=8)(batch, params=params(hflip=True))
    assert out["labels"].tolist() == [[2, IGNORE_INDEX]]
    torch.testing.assert_close(out["boxes"][0], torch.tensor([[3.0, 1, 7, 5], [0, 0, 0, 0]]))

    empty = make_batch(image, [])
    out = augment(8)(empty, generator=torch.Generator().manual_seed(0))
    assert out["boxes"].shape == (1, 0, 4) and out["labels"].shape == (1, 0)
    assert out["attributes"].shape == (1, 0, NUM_ATTRIBUTES)


# --- transform matrix, inverse, determinism -------------------------------------------------


def test_transform_maps_original_to_output_and_invert_recovers_boxes():
    generator = torch.Generator().manual_seed(3)
    sizes = torch.tensor([[30, 40], [50, 20], [64, 64], [10, 90]])
    aug = augment(64)
    p = aug.sample_geometry(4, generator)
    matrix = geometry_matrix(sizes, 64, p)
    boxes = torch.rand(4, 5, 4, generator=generator) * 10
    boxes[..., 2:] += boxes[..., :2] + 1
    torch.testing.assert_close(invert_boxes(transform_boxes(boxes, matrix), matrix), boxes)

    # Through forward: the kept output boxes map back to the original boxes.
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    original = [[10.0, 12.0, 20.0, 18.0], [25.0, 5.0, 33.0, 30.0]]
    batch = make_batch(image, original)
    aug = augment(64, translate=0.0, scale=(0.9, 1.1), min_visibility=0.0)
    for seed in range(6):
        out = aug(batch, generator=torch.Generator().manual_seed(seed))
        assert out["labels"].tolist() == [[0, 1]]
        torch.testing.assert_close(
            invert_boxes(out["boxes"], out["transform"])[0],
            torch.tensor(original),
            atol=1e-4,
            rtol=0,
        )


def test_eval_is_deterministic_and_train_is_reproducible_with_a_generator():
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8)
    batch = make_batch(image, [[4.0, 4.0, 12.0, 12.0]])
    evaluator = augment(32, train=False)
    first, second = evaluator(batch), evaluator(batch, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(first["image"], second["image"], atol=0, rtol=0)
    torch.testing.assert_close(first["boxes"], second["boxes"], atol=0, rtol=0)
    # Eval with a 24x32 image at 32: scale 1, identity.
    torch.testing.assert_close(first["transform"][0], torch.eye(3))
    torch.testing.assert_close(first["image"][0, :, :24], image.float() / 255)

    trainer = augment(32, color_jitter=1.0, noise=1.0)
    a = trainer(batch, generator=torch.Generator().manual_seed(5))
    b = trainer(batch, generator=torch.Generator().manual_seed(5))
    c = trainer(batch, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a["image"], b["image"], atol=0, rtol=0)
    torch.testing.assert_close(a["transform"], b["transform"], atol=0, rtol=0)
    assert not torch.equal(a["image"], c["image"])


def test_probability_one_always_flips():
    aug = augment(640, hflip=1.0, vflip=0.0, rot90=0.0)
    p = aug.sample_geometry(16, torch.Generator().manual_seed(0))
    assert p.hflip.all() and not p.vflip.any() and (p.quarter_turns == 0).all()
    p = augment(640, rot90=1.0).sample_geometry(64, torch.Generator().manual_seed(0))
    assert set(p.quarter_turns.tolist()) == {1, 3}


# --- whole batch, photometry ----------------------------------------------------------------


def _sample(h: int, w: int, boxes: list[list[float]], seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n = len(boxes)
    return {
        "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.arange(n, dtype=torch.int64),
        "attributes": torch.zeros(n, NUM_ATTRIBUTES, dtype=torch.int64),
        "regions": torch.tensor([[0.0, 0.0, w / 2, h / 2]]),
        "domain": "d",
        "image_id": seed,
        "path": f"{seed}.png",
    }


def test_mixed_size_batch_of_three_full_augmentation():
    samples = [
        _sample(40, 60, [[5.0, 5.0, 15.0, 20.0], [30.0, 10.0, 50.0, 30.0]], 0),
        _sample(64, 32, [[2.0, 40.0, 20.0, 60.0]], 1),
        _sample(20, 20, [], 2),
    ]
    batch = collate(samples)
    aug = augment(48, color_jitter=1.0, stain_jitter=1.0, blur=1.0, noise=1.0, fill=FILL)
    out = aug(batch, generator=torch.Generator().manual_seed(0))
    image = out["image"]
    assert image.dtype == torch.float32 and image.shape == (3, 3, 48, 48)
    assert image.min() >= 0 and image.max() <= 1
    assert out["transform"].shape == (3, 3, 3)
    assert out["boxes"].shape == batch["boxes"].shape
    assert out["image_size"].tolist() == [[40, 60], [64, 32], [20, 20]]
    kept = out["labels"] >= 0
    assert int(kept.sum()) >= 2  # not vacuous: this seed keeps cells
    boxes = out["boxes"][kept]
    assert torch.all(boxes >= 0) and torch.all(boxes <= 48)
    assert torch.all(boxes[:, 2:] - boxes[:, :2] >= aug.options.min_size)
    # Each kept box is its original box moved by that image's transform and clipped.
    expected = transform_boxes(batch["boxes"], out["transform"]).clamp(0, 48)
    torch.testing.assert_close(boxes, expected[kept])
    assert out["labels"][2].numel() == 2 and (out["labels"][2] == IGNORE_INDEX).all()


def test_photometry_leaves_letterbox_padding_at_fill():
    image = torch.full((3, 30, 60), 180, dtype=torch.uint8)
    batch = make_batch(image, [[5.0, 5.0, 20.0, 20.0]])
    aug = augment(
        60,
        hflip=0.0,
        vflip=0.0,
        rot90=0.0,
        scale=(1.0, 1.0),
        translate=0.0,
        color_jitter=1.0,
        stain_jitter=1.0,
        blur=1.0,
        noise=1.0,
        fill=FILL,
    )
    out = aug(batch, generator=torch.Generator().manual_seed(0))
    assert torch.all(out["image"][0, :, 30:, :] == FILL)
    assert not torch.all(out["image"][0, :, :30, :] == 180 / 255)  # the content did change


def test_collate_padding_and_fill_never_blend_into_the_image():
    # Valid 8x12 (h x w) white image inside a zero-padded 16x16 tensor, letterboxed 2x to 24.
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :8, :12] = 255
    batch = make_batch(image, [], image_size=(8, 12))
    out = augment(24, train=False, fill=FILL)(batch)
    assert out["transform"][0, 0, 0] == pytest.approx(2.0)
    torch.testing.assert_close(out["image"][0, :, :16, :], torch.ones(3, 16, 24))
    assert torch.all(out["image"][0, :, 16:, :] == FILL)
    # Same with a zoom that puts the content edge between pixel centres.
    out = geometric_only(image_size=24)(batch, params=params(scale=0.9, translate=[0.3, 0.7]))
    values = out["image"][0]
    assert torch.all(((values - 1.0).abs() < 1e-5) | (values == FILL))
    assert (values == FILL).any()


def test_stain_jitter_by_hand():
    # A pixel holding only haematoxylin, concentration c: rgb = exp(-c h) with h the unit
    # H stain vector. Doubling the H concentration squares each channel.
    h_vector = torch.tensor([0.65, 0.70, 0.29])
    h_vector = h_vector / h_vector.norm()
    rgb = torch.exp(-0.8 * h_vector)[None, :, None, None]  # [1, 3, 1, 1]
    alpha = torch.tensor([[2.0, 1.0, 1.0]])
    beta = torch.zeros(1, 3)
    torch.testing.assert_close(stain_jitter(rgb, alpha, beta), rgb**2, atol=1e-5, rtol=0)
    # Identity parameters change nothing; a shift of +b in H on white gives exp(-b h).
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    torch.testing.assert_close(
        stain_jitter(image, torch.ones(1, 3), beta), image, atol=1e-5, rtol=0
    )
    white = torch.ones(1, 3, 1, 1)
    shifted = stain_jitter(white, torch.ones(1, 3), torch.tensor([[0.1, 0.0, 0.0]]))
    torch.testing.assert_close(shifted[0, :, 0, 0], torch.exp(-0.1 * h_vector), atol=1e-5, rtol=0)


def test_photometric_ops_are_per_image():
    torch.manual_seed(0)
    images = torch.randint(60, 200, (2, 3, 16, 16), dtype=torch.uint8)
    batch = collate([{**_sample(16, 16, [], i), "image": images[i]} for i in range(2)])
    aug = augment(
        16,
        hflip=0,
        vflip=0,
        rot90=0,
        scale=(1, 1),
        translate=0,
        color_jitter=0.5,
        stain_jitter=0,
        blur=0,
        noise=0,
    )
    # With p=0.5 over enough seeds, some calls change exactly one of the two images.
    one_changed = 0
    for seed in range(12):
        out = aug(batch, generator=torch.Generator().manual_seed(seed))
        changed = [
            not torch.allclose(out["image"][i], images[i].float() / 255, atol=1e-4)
            for i in range(2)
        ]
        one_changed += changed[0] != changed[1]
    assert one_changed > 0
    assert math.isfinite(float(out["image"].sum()))


def test_region_crop_keeps_native_resolution_and_centres_the_region() -> None:
    """Training crops: one original pixel = one output pixel, the crop lies on the annotated region."""
    image = torch.zeros(3, 400, 600, dtype=torch.uint8)
    image[:, 300:340, 450:500] = 200  # the labelled cell, inside the region
    sample = {
        "image": image,
        "boxes": torch.tensor([[450.0, 300.0, 500.0, 340.0]]),
        "labels": torch.tensor([3]),
        "attributes": torch.zeros(1, 7, dtype=torch.int64),
        "regions": torch.tensor([[455.0, 305.0, 495.0, 335.0]]),
        "domain": "d",
        "image_id": 0,
        "path": "x.png",
    }
    aug = augment(
        600,
        crop_size=128,
        hflip=0,
        vflip=0,
        rot90=0,
        scale=(1.0, 1.0),
        translate=0.0,
        color_jitter=0,
        stain_jitter=0,
        blur=0,
        noise=0,
    )
    for seed in range(5):
        out = aug(collate([sample]), generator=torch.Generator().manual_seed(seed))
        assert out["image"].shape == (1, 3, 128, 128)
        transform = out["transform"][0]
        torch.testing.assert_close(transform[:2, :2], torch.eye(2))  # native scale, no turn
        region = out["regions"][0, 0]
        assert out["region_valid"][0, 0]
        # the crop centre is a point of the (clipped) region
        assert region[0] <= 64 <= region[2] and region[1] <= 64 <= region[3]
        box = out["boxes"][0, 0]
        assert out["labels"][0, 0] == 3
        torch.testing.assert_close(box[2:] - box[:2], torch.tensor([50.0, 40.0]))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        assert out["image"][0, :, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].min() > 0.7  # the cell's pixels
    # evaluation ignores crop_size
    eval_aug = augment(600, train=False, crop_size=128)
    assert eval_aug(collate([sample]))["image"].shape == (1, 3, 600, 600)


def test_defaults_are_the_recipe_native_crops_in_training_letterbox_in_eval() -> None:
    image = torch.zeros(3, 640, 640, dtype=torch.uint8)
    batch = make_batch(
        image, [[300.0, 300.0, 340.0, 340.0]], regions=[[280.0, 280.0, 360.0, 360.0]]
    )
    out = DeviceAugmentation()(batch, generator=torch.Generator().manual_seed(0))
    assert out["image"].shape == (1, 3, 256, 256)
    # native resolution: one original pixel is scale (0.9 to 1.1) output pixels
    assert 0.9 <= float(out["transform"][0, :2, :2].abs().sum(0).max()) <= 1.1
    assert DeviceAugmentation(train=False)(batch)["image"].shape == (1, 3, 640, 640)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"crop_size": 0}, "crop_size"),
    ],
)
def test_bad_augmentation_settings_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Augmentation(**options)
