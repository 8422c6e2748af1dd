"""`Predictor`: the cells ``lld predict`` writes, from paths, PIL images and arrays, with names."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC, LLD_ATTRIBUTE_VALUES, LLD_CLASSES
from lld_lightning.data.errors import DataError
from lld_lightning.predictor import Cell, Predictor, attribute_value_names, select_cells
from tests.test_export import IMAGE_SIZE, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("predictor") / "tiny.ckpt", tiny_synthetic)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    """The checkpoint's predictor, with ``lld predict``'s batch size below."""
    return Predictor.from_checkpoint(checkpoint, batch_size=2)


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> list[Path]:
    """Three synthetic test images in a folder of their own, one cropped to 160x112 (not
    square: the letterbox pads it and its boxes map back through a non-trivial inverse)."""
    folder = tmp_path_factory.mktemp("films")
    sources = sorted(
        p for p in tiny_synthetic.rglob("images/test/*") if p.suffix in (".png", ".jpg")
    )
    sources = sources[:3]
    assert len(sources) == 3
    for source in sources:
        shutil.copy(source, folder / source.name)
    first = folder / sources[0].name
    Image.open(first).crop((0, 0, 160, 112)).save(first)
    return sorted(folder.iterdir())


def _lld_predict(checkpoint: Path, data_root: Path, folder: Path, workdir: Path) -> list[dict]:
    from lld_lightning.cli import main

    out = workdir / "pred"
    main(
        [
            "predict",
            "--ckpt_path",
            str(checkpoint),
            "--data.root",
            str(data_root),
            "--data.image_size",
            str(IMAGE_SIZE),
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--data.predict_root",
            str(folder),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(workdir / "run"),
            "--predict_writer.output_dir",
            str(out),
            "--predict_writer.overlays",
            "false",
        ]
    )
    with open(out / "detections.csv") as handle:
        return list(csv.DictReader(handle))


def test_cells_are_the_ones_lld_predict_writes(
    checkpoint: Path,
    predictor: Predictor,
    films: list[Path],
    tiny_synthetic: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = _lld_predict(checkpoint, tiny_synthetic, films[0].parent, tmp_path)
    assert predictor.image_size == IMAGE_SIZE  # the checkpoint's own evaluation size
    per_image = predictor(films)
    assert len(per_image) == len(films)
    for path, cells in zip(films, per_image, strict=True):
        # Until the writer keeps cells with `select_cells` too, it also writes the boxes the
        # detector found in the letterbox padding (below or right of the image), clipped to no
        # area on the image's edge; they are not cells.
        width, height = Image.open(path).size
        written = [
            row
            for row in rows
            if row["image"] == str(path) and float(row["x1"]) < width and float(row["y1"]) < height
        ]
        assert cells, f"{path.name}: no cells"
        assert [c.class_name for c in cells] == [row["class"] for row in written]
        for cell, row in zip(cells, written, strict=True):
            assert cell.score == pytest.approx(float(row["score"]), abs=1e-4)
            assert cell.box == pytest.approx(
                [float(row[k]) for k in ("x1", "y1", "x2", "y2")], abs=0.01
            )
            for name, (value, probability) in cell.attributes.items():
                assert value == row[name]
                assert probability == pytest.approx(float(row[f"{name}_prob"]), abs=1e-4)


def test_paths_pil_images_arrays_and_tensors_give_the_same_cells(
    predictor: Predictor, films: list[Path]
) -> None:
    path = films[0]
    by_path = predictor(path)
    assert len(by_path) == 1 and by_path[0]  # one image in, one list of cells out
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    assert predictor(str(path)) == by_path
    assert predictor(pil) == by_path
    assert predictor(array) == by_path
    assert predictor(torch.from_numpy(array.copy()).permute(2, 0, 1)) == by_path
    # In a batch with another image: the same cells, up to the float noise of a larger batch.
    in_batch = predictor([pil, films[1]])[0]
    assert [c.class_name for c in in_batch] == [c.class_name for c in by_path[0]]
    for cell, alone in zip(in_batch, by_path[0], strict=True):
        assert cell.box == pytest.approx(alone.box, abs=1e-3)


def test_cells_have_named_classes_attributes_and_a_differential_count(
    predictor: Predictor, films: list[Path]
) -> None:
    for path, cells in zip(films, predictor(films), strict=True):
        width, height = Image.open(path).size
        assert [c.score for c in cells] == sorted((c.score for c in cells), reverse=True)
        for cell in cells:
            assert isinstance(cell, Cell) and cell.class_name == LLD_CLASSES[cell.label]
            assert cell.score >= 0.3
            x1, y1, x2, y2 = cell.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert list(cell.attributes) == list(LLD_ATTRIBUTE_SPEC)
            for name, (value, probability) in cell.attributes.items():
                assert value in LLD_ATTRIBUTE_VALUES[name] and 0 < probability <= 1
        count = predictor.differential_count(cells)
        assert list(count) == list(LLD_CLASSES)
        assert sum(count.values()) == len(cells)
        assert count[cells[0].class_name] == sum(c.class_name == cells[0].class_name for c in cells)


def test_exported_model_predicts_the_same_cells(
    checkpoint: Path, predictor: Predictor, films: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra (pip install -e '.[export]')")
    from lld_lightning.tools.export import export_checkpoint

    path = export_checkpoint(checkpoint, "onnx", out=tmp_path / "tiny.onnx")
    exported = Predictor.from_exported(path, batch_size=2)
    assert exported.image_size == IMAGE_SIZE and exported.class_names == list(LLD_CLASSES)
    for got, expected in zip(exported(films), predictor(films), strict=True):
        assert [c.class_name for c in got] == [c.class_name for c in expected]
        for g, e in zip(got, expected, strict=True):
            assert g.box == pytest.approx(e.box, rel=1e-3, abs=1e-3)
            assert {k: v for k, (v, _) in g.attributes.items()} == {
                k: v for k, (v, _) in e.attributes.items()
            }


def test_bad_inputs_are_one_line_errors(predictor: Predictor, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected a uint8 \[H, W, 3\].*float32 \[8, 8, 3\]"):
        predictor(np.zeros((8, 8, 3), dtype=np.float32))
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match="missing.png"):
        predictor(missing)
    with pytest.raises(FileNotFoundError, match="none.ckpt: no checkpoint there"):
        Predictor.from_checkpoint(tmp_path / "none.ckpt")


def test_value_names_come_from_the_data_then_lld_then_indices() -> None:
    spec = {"cell_size": 3, "granules": 2, "nucleolus": 3}
    names = attribute_value_names(spec, {"granules": ["none", "many"]})
    assert names == {
        "cell_size": ["small", "medium", "large"],
        "granules": ["none", "many"],
        "nucleolus": ["0", "1", "2"],  # LLD's nucleolus has 2 values, this data 3
    }


def test_select_cells_keeps_the_best_of_overlapping_cells() -> None:
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [5, 60, 9, 60]]
    )
    scores = torch.tensor([0.5, 0.9, 0.2, 0.4, 0.95])  # the last box has no area: not a cell
    assert select_cells(boxes, scores, min_score=0.3, cell_iou=0.5).tolist() == [1, 3]
    assert select_cells(boxes, scores, min_score=0.3, cell_iou=None).tolist() == [0, 1, 3]
