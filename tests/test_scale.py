"""Physical scale: pixel sizes from the data, resampling to a working resolution, predicting at one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lld_lightning.data.datamodule import LldDataModule, PixelSize, ReadOptions
from lld_lightning.data.errors import DataError
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sample import collate
from lld_lightning.data.transforms import Augmentation, DeviceAugmentation, invert_boxes
from lld_lightning.predictor import Predictor, collate_images
from tests.conftest import TXL_PBC

WORKING = 0.1  # micrometres per pixel of the model in these tests
#: A PBC test image of TXL-PBC (one neutrophil in the middle of red cells).
PBC_IMAGE = TXL_PBC / "images" / "test" / "0e7d7e94-bb72-5813-92cd-df08a161f8b1.jpg"


def _record(domain: str, pixel_size: float | None = None) -> ImageRecord:
    return ImageRecord(Path("x.png"), 10, 10, domain=domain, pixel_size_um=pixel_size)


def test_pixel_size_comes_from_the_image_then_domain_then_objective_then_default() -> None:
    sizes = PixelSize(working=0.1, by_domain={"scope_a": 0.2}, default=0.5)
    assert sizes.of(_record("scope_a", 0.3)) == 0.3
    assert sizes.of(_record("scope_a")) == 0.2
    assert sizes.of(_record("H_40x_C1")) == 0.525
    assert sizes.of(_record("H_100x_C2")) == 0.21
    assert sizes.of(_record("elsewhere")) == 0.5
    assert PixelSize().of(_record("elsewhere")) is None
    with pytest.raises(ValueError, match="pixel_size.working"):
        PixelSize(working=0.0)


def _yolo_set(root: Path, rows: list[str], pixel_sizes: list[str]) -> Path:
    """Two 64x48 fully annotated images (train, test) and a manifest with a pixel-size column."""
    lines = ["split,file,source,pixel_size_um"]
    for i, (split, size) in enumerate(zip(["train", "test"], pixel_sizes, strict=True)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), (200, 150, 160)).save(root / "images" / split / f"im{i}.png")
        (root / "labels" / split / f"im{i}.txt").write_text(rows[i] + "\n")
        lines.append(f"{split},im{i}.png,scope,{size}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _datamodule(root: Path, **kwargs) -> LldDataModule:
    return LldDataModule(
        root=str(root),
        format="yolo",
        class_names=["WBC"],
        num_workers=0,
        reading=ReadOptions(manifest="manifest.csv"),
        **kwargs,
    )


def test_a_manifest_column_gives_each_image_its_pixel_size(tmp_path: Path) -> None:
    root = _yolo_set(tmp_path, ["0 0.5 0.5 0.2 0.2"] * 2, ["0.25", ""])
    records = {r.split: r for r in _datamodule(root).load_all_records()}
    assert records["train"].pixel_size_um == 0.25
    assert records["test"].pixel_size_um is None
    by_domain = _datamodule(root, pixel_size=PixelSize(by_domain={"scope": 0.4}))
    assert {r.split: r.pixel_size_um for r in by_domain.load_all_records()} == {
        "train": 0.25,
        "test": 0.4,
    }


def test_a_bad_pixel_size_names_the_manifest_line(tmp_path: Path) -> None:
    root = _yolo_set(tmp_path, ["0 0.5 0.5 0.2 0.2"] * 2, ["0.25", "-1"])
    with pytest.raises(DataError, match=r"manifest.csv:3: pixel size must be a positive"):
        _datamodule(root).load_all_records()


def test_training_images_without_a_pixel_size_are_refused_at_a_working_resolution(
    tmp_path: Path,
) -> None:
    root = _yolo_set(tmp_path, ["0 0.5 0.5 0.2 0.2"] * 2, ["", "0.2"])
    datamodule = _datamodule(root, pixel_size=PixelSize(working=WORKING))
    with pytest.raises(DataError, match=r"domain\(s\) \['scope'\] have no pixel size"):
        datamodule.setup("fit")


def test_coco_keeps_the_pixel_size_field(tmp_path: Path) -> None:
    from lld_lightning.data.errors import DataReport
    from lld_lightning.data.formats.coco import read_coco, write_coco
    from lld_lightning.data.formats.options import FormatOptions

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    record = ImageRecord(tmp_path / "a.png", 32, 32, pixel_size_um=0.17)
    record.regions_xyxy = record.whole_image_region()
    record.attributes = np.zeros((0, 0), dtype=np.int64)
    options = FormatOptions(num_classes=1, class_names=("WBC",), attribute_spec={})
    write_coco([record], tmp_path / "test.json", tmp_path, ["WBC"], {})
    document = json.loads((tmp_path / "test.json").read_text())
    assert document["images"][0]["pixel_size_um"] == 0.17
    back = read_coco(tmp_path / "test.json", tmp_path, options, DataReport())
    assert back[0].pixel_size_um == pytest.approx(0.17)
    document["images"][0]["pixel_size_um"] = "wide"
    (tmp_path / "test.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match="image id 0: pixel size must be a positive"):
        read_coco(tmp_path / "test.json", tmp_path, options, DataReport(on_error="raise"))


def _batch(images: list[torch.Tensor], pixel_sizes: list[float]) -> dict:
    batch = collate_images(images, 0)
    batch["pixel_size_um"] = torch.tensor(pixel_sizes)
    return batch


def test_resampling_puts_the_working_resolution_on_a_canvas_that_holds_the_image() -> None:
    transform = DeviceAugmentation(64, train=False, working_pixel_size=WORKING)
    images = [torch.zeros(3, 40, 100, dtype=torch.uint8), torch.zeros(3, 30, 30, dtype=torch.uint8)]
    out = transform(_batch(images, [0.2, math.nan]))
    # 100 px at 0.2 um = 200 working px: the canvas grows to 224 (steps of 32); the second image,
    # of unknown size, is letterboxed to the 64-pixel image_size.
    assert out["image"].shape[-1] == 224
    assert out["transform"][0, 0, 0].item() == pytest.approx(2.0)
    assert out["transform"][1, 0, 0].item() == pytest.approx(64 / 30)
    box = torch.tensor([[[10.0, 5.0, 30.0, 25.0]]])
    moved = out["transform"][0, :2, :2] @ box[0, 0, :2] + out["transform"][0, :2, 2]
    assert moved.tolist() == pytest.approx([20.0, 10.0])
    back = invert_boxes(torch.tensor([[[20.0, 10.0, 60.0, 50.0]]]), out["transform"][:1])
    assert back[0, 0].tolist() == pytest.approx(box[0, 0].tolist())


def test_training_crops_are_taken_at_the_working_resolution() -> None:
    transform = DeviceAugmentation(
        64,
        train=True,
        augmentation=Augmentation(crop_size=32, scale=(1.0, 1.0), translate=0.0),
        working_pixel_size=WORKING,
    )
    images = [torch.zeros(3, 50, 50, dtype=torch.uint8)] * 2
    batch = _batch(images, [0.05, 0.3])
    batch["regions"] = torch.tensor([[[0.0, 0.0, 50.0, 50.0]]] * 2)
    batch["region_valid"] = torch.ones(2, 1, dtype=torch.bool)
    out = transform(batch, generator=torch.Generator().manual_seed(0))
    assert out["image"].shape[-1] == 32
    linear = out["transform"][:, :2, :2].abs().sum(dim=-1)[:, 0]  # any flip or turn: |a| + |b|
    assert linear.tolist() == pytest.approx([0.5, 3.0])


# --------------------------------------------------------------------------- real image, 3 scales
def _nuclei(view: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The box around the dark purple nucleus in a working view (a stand-in for a trained model,
    which these tests cannot afford: it exercises the resampling, not detection)."""
    mask = (view[1] < 0.3) & (view[0] < 0.75)  # green low, red not high: haematoxylin
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < 20:
        return torch.zeros(0, 4), 0.0
    # The 1st and 99th percentiles: a few dark pixels elsewhere do not move the box.
    low = torch.quantile(torch.stack([xs, ys]).float(), 0.01, dim=1)
    high = torch.quantile(torch.stack([xs, ys]).float(), 0.99, dim=1) + 1
    return torch.cat([low, high])[None], 1.0


def _stand_in_detect(images: torch.Tensor) -> list[dict]:
    results = []
    for view in images:
        boxes, score = _nuclei(view)
        results.append(
            {
                "boxes": boxes,
                "scores": torch.full((boxes.shape[0],), score),
                "labels": torch.zeros(boxes.shape[0], dtype=torch.int64),
                "attributes": torch.zeros(boxes.shape[0], 0, dtype=torch.int64),
                "attribute_scores": torch.zeros(boxes.shape[0], 0),
            }
        )
    return results


def _copies() -> dict[float, np.ndarray]:
    if not PBC_IMAGE.is_file():
        pytest.skip("TXL-PBC is not beside the checkout")
    image = Image.open(PBC_IMAGE).convert("RGB")
    return {
        factor: np.asarray(
            image.resize(
                (round(image.width * factor), round(image.height * factor)), Image.BICUBIC
            )
        )
        for factor in (0.5, 1.0, 2.0)
    }


def _predictor() -> Predictor:
    return Predictor(
        _stand_in_detect, ["WBC"], {}, image_size=64, min_score=0.0, working_pixel_size=WORKING
    )


def test_the_same_cell_is_found_at_half_one_and_twice_the_resolution() -> None:
    predictor = _predictor()
    pixel_size = 0.1  # of the original PBC image, in this test's units
    found = {}
    for factor, copy in _copies().items():
        cells = predictor(copy, pixel_size_um=pixel_size / factor)[0]
        assert len(cells) == 1
        found[factor] = np.array(cells[0].box) / factor  # back to the original image's pixels
    # The nucleus is about 60 px across: a few pixels of resampling blur at most.
    assert np.abs(found[0.5] - found[1.0]).max() < 4.0
    assert np.abs(found[2.0] - found[1.0]).max() < 4.0


def test_a_letterboxing_model_refuses_a_pixel_size() -> None:
    predictor = Predictor(_stand_in_detect, ["WBC"], {}, image_size=64)
    with pytest.raises(ValueError, match="no working resolution"):
        predictor(np.zeros((8, 8, 3), dtype=np.uint8), pixel_size_um=0.2)


def test_collate_marks_unknown_pixel_sizes_as_nan() -> None:
    sample = {
        "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "attributes": torch.zeros(0, 0, dtype=torch.int64),
        "regions": torch.zeros(0, 4),
        "domain": "",
        "image_id": 0,
        "path": "",
    }
    batch = collate([sample, {**sample, "pixel_size_um": 0.3}])
    assert math.isnan(batch["pixel_size_um"][0]) and batch["pixel_size_um"][1] == pytest.approx(0.3)


# ------------------------------------------------------------------------------ lld predict
def _predict(checkpoint: Path, data_root: Path, folder: Path, workdir: Path, *extra: str) -> list:
    import csv

    from lld_lightning.cli import main
    from tests.test_export import IMAGE_SIZE

    out = workdir / "pred"
    main(
        [
            "predict",
            *("--ckpt_path", str(checkpoint), "--data.root", str(data_root)),
            *("--data.image_size", str(IMAGE_SIZE), "--data.num_workers", "0"),
            *("--data.predict_root", str(folder), "--trainer.accelerator", "cpu"),
            *("--trainer.devices", "1", "--trainer.precision", "32-true"),
            *("--trainer.logger", "false", "--trainer.enable_progress_bar", "false"),
            *("--trainer.default_root_dir", str(workdir / "run")),
            *("--predict_writer.output_dir", str(out), "--predict_writer.overlays", "false"),
            *extra,
        ]
    )
    with open(out / "detections.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> dict[str, Path]:
    """The tiny model, letterboxing and (same weights) working at 0.5 um per pixel."""
    from tests.test_export import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("scale")
    letterbox = make_tiny_checkpoint(folder / "letterbox.ckpt", tiny_synthetic)
    checkpoint = torch.load(letterbox, weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["pixel_size"] = {"working": 0.5}
    torch.save(checkpoint, folder / "working.ckpt")
    return {"letterbox": letterbox, "working": folder / "working.ckpt"}


def test_lld_predict_resamples_to_the_checkpoint_working_resolution(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    film = sorted(p for p in tiny_synthetic.rglob("images/test/*") if p.suffix == ".png")[0]
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / film.name).write_bytes(film.read_bytes())
    # The config does not name the working resolution: the checkpoint's is used.
    rows = _predict(checkpoints["working"], tiny_synthetic, folder, tmp_path, "--pixel_size_um", "0.25")
    predictor = Predictor.from_checkpoint(checkpoints["working"], min_score=0.0, cell_iou=None)
    expected = predictor.detections([folder / film.name], pixel_size_um=0.25)[0]
    letterboxed = predictor.detections([folder / film.name])[0]
    boxes = torch.tensor([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows])
    width, height = Image.open(film).size
    keep = (expected["scores"] >= 0.3) & (expected["boxes"][:, 2] > expected["boxes"][:, 0])
    assert boxes.shape[0] > 0
    best = expected["boxes"][keep][: boxes.shape[0]]
    assert torch.allclose(boxes[:1], best[:1], atol=0.05)
    assert not torch.allclose(expected["boxes"][:1], letterboxed["boxes"][:1], atol=0.5)
    assert width and height


def test_lld_predict_refuses_a_pixel_size_for_a_letterboxing_model(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = next(tiny_synthetic.rglob("images/test"))
    with pytest.raises(SystemExit) as exit_info:
        _predict(checkpoints["letterbox"], tiny_synthetic, folder, tmp_path, "--pixel_size_um", "0.2")
    assert exit_info.value.code == 2
    assert "has no working resolution" in capsys.readouterr().err


def test_an_exported_model_keeps_its_working_resolution(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path
) -> None:
    from lld_lightning.tools.export import export_checkpoint
    from tests.test_export import IMAGE_SIZE

    path = export_checkpoint(checkpoints["working"], "torchscript", out=tmp_path / "m.torchscript")
    metadata = json.loads(Path(f"{path}.json").read_text())
    assert metadata["working_pixel_size_um"] == 0.5
    exported = Predictor.from_exported(path)
    film = sorted(p for p in tiny_synthetic.rglob("images/test/*") if p.suffix == ".png")[0]
    reference = Predictor.from_checkpoint(checkpoints["working"])
    # 160-pixel films at 0.25 um resampled to 0.5 um: 80 pixels, inside the fixed input.
    cells = exported(film, pixel_size_um=0.25)[0]
    assert [c.class_name for c in cells] == [c.class_name for c in reference(film, pixel_size_um=0.25)[0]]
    with pytest.raises(ValueError, match="export it again with a larger --image_size"):
        exported(film, pixel_size_um=0.25 * 4 * IMAGE_SIZE / 160)


def test_a_config_cannot_give_a_letterboxing_checkpoint_a_working_resolution(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = next(tiny_synthetic.rglob("images/test"))
    config = tmp_path / "working.yaml"
    config.write_text("data:\n  pixel_size:\n    working: 0.5\n")
    older = torch.load(checkpoints["letterbox"], weights_only=True)
    del older["datamodule_hyper_parameters"]["pixel_size"]  # as written before pixel sizes
    torch.save(older, tmp_path / "older.ckpt")
    for checkpoint in (checkpoints["letterbox"], tmp_path / "older.ckpt"):
        with pytest.raises(SystemExit):
            _predict(
                checkpoint, tiny_synthetic, folder, tmp_path,
                "--config", str(config), "--pixel_size_um", "0.2",
            )  # fmt: skip
        assert "has no working resolution" in capsys.readouterr().err


def test_a_manifest_gives_predicted_images_their_domain_and_pixel_size(tmp_path: Path) -> None:
    folder = tmp_path / "scope"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(folder / name)
    (tmp_path / "m.csv").write_text("file,source,pixel_size_um\na.png,scope_x,0.3\n")
    datamodule = LldDataModule(
        predict_root=str(folder),
        num_workers=0,
        reading=ReadOptions(manifest=str(tmp_path / "m.csv")),
        pixel_size=PixelSize(working=WORKING, default=0.2),
    )
    datamodule.setup("predict")
    records = {r.path.name: r for r in datamodule.predict_set.records}
    assert (records["a.png"].domain, records["a.png"].pixel_size_um) == ("scope_x", 0.3)
    assert records["b.png"].pixel_size_um == 0.2  # not listed: the default


# ------------------------------------------------------------------- pixel size measured: auto
def test_the_same_cell_is_found_at_three_resolutions_with_the_pixel_size_measured() -> None:
    predictor = _predictor()
    found, measured = {}, {}
    for factor, copy in _copies().items():
        cells = predictor(copy, pixel_size_um="auto")[0]
        assert len(cells) == 1
        found[factor] = np.array(cells[0].box) / factor
        measured[factor] = predictor.pixel_size_estimate.pixel_size_um * factor
    # One physical size within a few percent whatever the resolution: the view differs by that
    # much, so the nucleus box by a few pixels more than with the size given.
    assert measured[0.5] == pytest.approx(measured[1.0], rel=0.06)
    assert measured[2.0] == pytest.approx(measured[1.0], rel=0.06)
    assert np.abs(found[0.5] - found[1.0]).max() < 6.0
    assert np.abs(found[2.0] - found[1.0]).max() < 6.0


def test_a_letterboxing_model_refuses_auto_and_a_bad_size_is_named() -> None:
    predictor = Predictor(_stand_in_detect, ["WBC"], {}, image_size=64)
    with pytest.raises(ValueError, match="no working resolution"):
        predictor(np.zeros((8, 8, 3), dtype=np.uint8), pixel_size_um="auto")
    for bad in ("big", -0.2):
        with pytest.raises(ValueError, match=f"positive number or 'auto', got {bad!r}"):
            _predictor()(np.zeros((8, 8, 3), dtype=np.uint8), pixel_size_um=bad)


def test_lld_predict_measures_each_domain_pixel_size(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "scopes"
    folder.mkdir()
    copies = _copies()
    for factor in (1.0, 2.0):
        Image.fromarray(copies[factor]).save(folder / f"x{factor:g}.png")
    (folder / "given.png").write_bytes((folder / "x1.png").read_bytes())
    manifest = tmp_path / "scopes.csv"
    manifest.write_text(
        "file,source,pixel_size_um\nx1.png,scope_a,\nx2.png,scope_b,\ngiven.png,scope_c,0.3\n"
    )
    _predict(
        checkpoints["working"], tiny_synthetic, folder, tmp_path,
        "--pixel_size_um", "auto", "--data.reading.manifest", str(manifest),
    )  # fmt: skip
    images = json.loads((tmp_path / "pred" / "detections.json").read_text())["images"]
    sizes = {Path(i["file_name"]).name: i["pixel_size_um"] for i in images}
    assert sizes["given.png"] == 0.3  # the manifest's size is kept, not measured
    assert sizes["x2.png"] * 2 == pytest.approx(sizes["x1.png"], rel=0.06)
    assert sizes["x1.png"] == pytest.approx(0.1064, rel=0.15)  # configs/txl.yaml's PBC size


def test_lld_predict_auto_without_red_cells_says_what_to_do(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "blank"
    folder.mkdir()
    Image.new("RGB", (120, 90), (230, 225, 220)).save(folder / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        _predict(checkpoints["working"], tiny_synthetic, folder, tmp_path, "--pixel_size_um", "auto")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no red cells to measure" in err and "--pixel_size_um 0.2" in err


def test_lld_predict_refuses_auto_for_a_letterboxing_model(
    checkpoints: dict[str, Path], tiny_synthetic: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = next(tiny_synthetic.rglob("images/test"))
    with pytest.raises(SystemExit):
        _predict(checkpoints["letterbox"], tiny_synthetic, folder, tmp_path, "--pixel_size_um", "auto")
    assert "has no working resolution" in capsys.readouterr().err
