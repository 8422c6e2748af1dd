"""Mosaic: tiles, cells and regions against a hand-worked case; sampling; the training path."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lld_lightning.cli import main
from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data import transforms
from lld_lightning.data.mosaic import MosaicParams, apply_mosaic, quadrants, sample_mosaic
from lld_lightning.data.transforms import DeviceAugmentation
from lld_lightning.pseudo import PseudoLabeller
from tests.conftest import REPO

S = 8
IGN = IGNORE_INDEX


def augmented_batch() -> dict:
    """Two 8x8 'augmented' images whose pixel (b, y, x) holds 100 b + 8 y + x, with cells
    (attribute = 10 b + cell index) and regions in output pixels."""
    pixels = torch.arange(S * S, dtype=torch.float32).reshape(S, S)
    image = torch.stack([pixels, pixels + 100])[:, None].repeat(1, 3, 1, 1)
    boxes = torch.tensor([
        [[2, 1, 4, 3], [6, 6, 8, 8], [0, 0, 0, 0]],  # image 0: A, B, padding
        [[0, 3, 2, 5], [4, 4, 7, 7], [0, 0, 1, 1]],  # image 1: C, D, E
    ], dtype=torch.float32)
    labels = torch.tensor([[0, 1, IGN], [2, 0, 1]])
    attributes = (10 * torch.arange(2)[:, None] + torch.arange(3)[None])[..., None].repeat(1, 1, 2)
    attributes[0, 2] = IGN
    return {
        "image": image,
        "boxes": boxes,
        "labels": labels,
        "attributes": attributes,
        "regions": torch.tensor([[[0, 0, 8, 8], [0, 0, 0, 0]], [[0, 0, 4, 8], [4, 4, 8, 8]]],
                                dtype=torch.float32),
        "region_valid": torch.tensor([[True, False], [True, True]]),
        "domain": ["a", "b"],
    }


def hand_params() -> MosaicParams:
    """Row 0: a mosaic meeting at (3, 5) of images 0, 1, 1, 0; row 1 passes through."""
    return MosaicParams(
        use=torch.tensor([True, False]),
        partners=torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]),
        centre=torch.tensor([[3, 5], [S, S]]),
        source=torch.tensor([[[2, 1], [0, 3], [5, 5], [1, 0]], [[0, 0]] * 4]),
    )


def test_tiles_cells_and_regions_by_hand() -> None:
    batch = augmented_batch()
    out = apply_mosaic(batch, hand_params(), min_visibility=0.3, min_size=0.5)
    image, source = out["image"], batch["image"]
    # Quadrants (x0, y0, x1, y1): [0,0,3,5] [3,0,8,5] [0,5,3,8] [3,5,8,8]; windows from source.
    assert torch.equal(image[0, :, 0:5, 0:3], source[0, :, 1:6, 2:5])
    assert torch.equal(image[0, :, 0:5, 3:8], source[1, :, 3:8, 0:5])
    assert torch.equal(image[0, :, 5:8, 0:3], source[1, :, 5:8, 5:8])
    assert torch.equal(image[0, :, 5:8, 3:8], source[0, :, 0:3, 1:6])
    assert torch.equal(image[1], source[1])  # not a mosaic: untouched
    assert out["mosaic"].tolist() == [True, False]

    # Row 0, quadrant order. q0 (image 0, shift -2,-1): A. q1 (image 1, shift 3,-3): C, and D
    # cut to a third of its area. q2 (image 1, shift -5,0): D, 4/9 visible. q3 (image 0, shift
    # 2,5): A again. B and E fall outside every window.
    expected_boxes = torch.tensor([
        [0, 0, 2, 2], [3, 0, 5, 2], [7, 1, 8, 4], [0, 5, 2, 7], [4, 6, 6, 8],
    ], dtype=torch.float32)
    torch.testing.assert_close(out["boxes"][0], expected_boxes)
    assert out["labels"][0].tolist() == [0, 2, 0, 0, 0]
    assert out["attributes"][0, :, 0].tolist() == [0, 10, 11, 11, 0]
    # Row 1 keeps its three cells in order, padded to the longest row.
    torch.testing.assert_close(out["boxes"][1, :3], batch["boxes"][1])
    assert out["labels"][1].tolist() == [2, 0, 1, IGN, IGN]
    assert out["attributes"][1, :, 0].tolist() == [10, 11, 12, IGN, IGN]
    assert out["boxes"][1, 3:].abs().sum() == 0

    # Regions: the pieces of each tile's regions, clipped to the quadrant.
    expected_regions = torch.tensor([
        [0, 0, 3, 5], [3, 0, 7, 5], [7, 1, 8, 5], [0, 5, 3, 8], [3, 5, 8, 8],
    ], dtype=torch.float32)
    torch.testing.assert_close(out["regions"][0], expected_regions)
    assert out["region_valid"][0].all()
    torch.testing.assert_close(out["regions"][1, :2], batch["regions"][1])
    assert out["region_valid"][1].tolist() == [True, True, False, False, False]


def test_cut_cells_follow_visibility_and_size_rules() -> None:
    # D shows a third of itself (1 x 3 px) in quadrant 1: dropped at min_visibility 0.4 and
    # at min_size 2; the rest of row 0 stays.
    for kwargs in ({"min_visibility": 0.4, "min_size": 0.5}, {"min_visibility": 0.3, "min_size": 2.0}):
        out = apply_mosaic(augmented_batch(), hand_params(), **kwargs)
        kept = out["labels"][0] != IGN
        assert out["labels"][0][kept].tolist() == [0, 2, 0, 0]


def test_data_without_attributes_or_cells_is_tiled() -> None:
    batch = augmented_batch()
    no_attributes = dict(batch, attributes=batch["attributes"][..., :0])
    out = apply_mosaic(no_attributes, hand_params(), min_visibility=0.3, min_size=0.5)
    assert out["attributes"].shape == (2, 5, 0) and out["labels"][0].tolist() == [0, 2, 0, 0, 0]
    no_cells = dict(
        batch,
        boxes=batch["boxes"][:, :0],
        labels=batch["labels"][:, :0],
        attributes=batch["attributes"][:, :0],
    )
    out = apply_mosaic(no_cells, hand_params(), min_visibility=0.3, min_size=0.5)
    assert out["boxes"].shape == (2, 0, 4) and out["labels"].shape == (2, 0)
    assert out["region_valid"][0].sum() == 5


def test_no_mosaic_row_is_the_identity() -> None:
    batch = augmented_batch()
    params = MosaicParams(
        use=torch.tensor([False, False]),
        partners=torch.tensor([[0] * 4, [1] * 4]),
        centre=torch.full((2, 2), S),
        source=torch.zeros(2, 4, 2, dtype=torch.int64),
    )
    out = apply_mosaic(batch, params, min_visibility=0.3, min_size=0.5)
    for key in ("image", "boxes", "labels", "attributes", "regions", "region_valid"):
        assert torch.equal(out[key], batch[key]), key


def test_sampled_windows_stay_in_the_canvas_and_in_the_content() -> None:
    size, batch_size = 64, 200
    generator = torch.Generator().manual_seed(0)
    # Half the images fill the canvas, half only its left 20 columns (a tall letterbox).
    bounds = torch.tensor([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 20.0, 64.0]]).repeat(batch_size // 2, 1)
    params = sample_mosaic(0.5, bounds, size, (0.25, 0.75), generator)
    rows = torch.arange(batch_size)
    assert torch.equal(params.partners[:, 0], rows)
    assert 60 < int(params.use.sum()) < 140
    off = ~params.use
    assert (params.partners[off] == rows[off, None]).all() and (params.centre[off] == size).all()
    assert (params.source[off] == 0).all()
    on = params.use
    assert ((params.centre[on] >= 16) & (params.centre[on] <= 48)).all()
    rect = quadrants(params.centre, size)
    window = rect[..., 2:] - rect[..., :2]
    assert (params.source >= 0).all() and (params.source + window <= size).all()
    # A window at most as wide as an image's content lies inside it; a wider one covers it.
    right = bounds[params.partners][..., 2]  # [B, 4]
    x0, width = params.source[..., 0].float(), window[..., 0].float()
    narrow = on[:, None] & (width <= right)
    assert (x0[narrow] + width[narrow] <= right[narrow]).all()
    wide = on[:, None] & (width > right)
    assert (x0[wide] <= 0).all()


def test_augmentation_with_mosaic_is_reproducible_and_consistent() -> None:
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 3, 48, 64, generator=generator) * 255).to(torch.uint8)
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 10.0, 50.0, 40.0]]).repeat(4, 1, 1)
    batch = {
        "image": images,
        "image_size": torch.tensor([[48, 64]] * 4),
        "boxes": boxes,
        "labels": torch.tensor([[0, 1]] * 4),
        "attributes": torch.zeros(4, 2, 3, dtype=torch.int64),
        "regions": torch.tensor([[[0.0, 0.0, 64.0, 48.0]]] * 4),
        "region_valid": torch.ones(4, 1, dtype=torch.bool),
    }
    augmentation = DeviceAugmentation(image_size=32, mosaic=1.0)
    first = augmentation(batch, generator=torch.Generator().manual_seed(1))
    second = augmentation(batch, generator=torch.Generator().manual_seed(1))
    for key in ("image", "boxes", "labels", "regions", "region_valid", "mosaic"):
        assert torch.equal(first[key], second[key]), key
    assert first["mosaic"].all() and first["image"].shape == (4, 3, 32, 32)
    real = first["labels"] != IGN
    assert real.any()
    kept = first["boxes"][real]
    assert (kept >= 0).all() and (kept <= 32).all()
    assert ((kept[:, 2] - kept[:, 0]) >= augmentation.min_size).all()
    # Every kept cell lies inside one of its image's region pieces.
    for row in range(4):
        pieces = first["regions"][row][first["region_valid"][row]]
        for box in first["boxes"][row][real[row]]:
            inside = (box[:2] >= pieces[:, :2] - 1e-4).all(-1) & (box[2:] <= pieces[:, 2:] + 1e-4).all(-1)
            assert inside.any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mosaic": -0.1},
        {"mosaic": 1.5},
        {"mosaic_centre": (0.0, 0.5)},
        {"mosaic_centre": (0.6, 0.4)},
        {"mosaic_until": 0.0},
        {"mosaic_until": 1.2},
    ],
)
def test_bad_mosaic_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="mosaic"):
        DeviceAugmentation(**kwargs)


def test_the_pseudo_labeller_refuses_mosaics() -> None:
    datamodule = SimpleNamespace(train_augmentation=DeviceAugmentation(mosaic=0.5), teacher_view=False)
    trainer = SimpleNamespace(datamodule=datamodule)
    with pytest.raises(ValueError, match="mosaic"):
        PseudoLabeller().setup(trainer, None, "fit")


def test_mosaics_stop_at_mosaic_until() -> None:
    batch = {
        "image": torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        "image_size": torch.tensor([[16, 16]] * 2),
        "boxes": torch.tensor([[[2.0, 2.0, 8.0, 8.0]]] * 2),
        "labels": torch.tensor([[0], [1]]),
        "attributes": torch.zeros(2, 1, 1, dtype=torch.int64),
        "regions": torch.tensor([[[0.0, 0.0, 16.0, 16.0]]] * 2),
        "region_valid": torch.ones(2, 1, dtype=torch.bool),
    }
    augmentation = DeviceAugmentation(image_size=16, mosaic=1.0, mosaic_until=0.5)
    for progress, tiled in ((None, True), (0.0, True), (0.49, True), (0.5, False), (1.0, False)):
        out = augmentation(batch, generator=torch.Generator().manual_seed(0), progress=progress)
        assert ("mosaic" in out) is tiled, progress


def test_fit_trains_on_mosaics_until_the_given_fraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return apply_mosaic(*args, **kwargs)

    monkeypatch.setattr(transforms, "apply_mosaic", counting)
    monkeypatch.chdir(tmp_path)
    cli = main([
        "fit",
        "--config", str(REPO / "configs" / "tiny.yaml"),
        "--data.synthetic_dir", str(tmp_path / "data"),
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.augmentation.mosaic", "1.0",
        "--data.augmentation.mosaic_until", "0.5",
    ])
    assert cli.datamodule.train_augmentation.mosaic == 1.0
    assert cli.trainer.global_step == 2
    assert cli.model.training_progress == 1.0
    # Step 0 (progress 0) trains on mosaics; step 1 (progress 0.5) on plain images.
    assert len(calls) == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
