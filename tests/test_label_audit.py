"""The label audit: labels a model confidently contradicts, named by file and line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.formats.yolo import parse_yolo_label_file
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sparse import restrict_to_region
from lld_lightning.predictor import Predictor
from lld_lightning.tools.label_audit import (
    AUDIT_CSV,
    AUDIT_PNG,
    CLASS,
    UNLABELLED,
    audit,
    audit_image,
    contact_sheet,
    main,
)
from tests.test_adapt import save_tiny_checkpoint

NAMES = ["WBC", "RBC", "Platelets"]
WBC, RBC = 0, 1


def _record(boxes: list[list[float]], labels: list[int], regions=None, path="a.png") -> ImageRecord:
    record = ImageRecord(
        path=Path(path),
        width=200,
        height=200,
        boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        label_path=Path("a.txt"),
        label_lines=np.arange(1, len(labels) + 1) * 2,  # lines 2, 4, ...: not row indices
        domain="scope",
    )
    record.regions_xyxy = (
        record.whole_image_region() if regions is None else np.asarray(regions, np.float32)
    )
    return record


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_a_cell_the_model_sees_as_another_class_is_named_by_its_line() -> None:
    record = _record([[10, 10, 60, 60], [100, 100, 150, 150]], [RBC, RBC])
    found = audit_image(
        record,
        _detections(
            [[12, 11, 61, 60], [10, 10, 60, 60], [100, 100, 150, 150]],
            [0.9, 0.05, 0.8],
            [WBC, RBC, RBC],
        ),
        NAMES,
    )
    assert len(found) == 1
    (suspect,) = found
    assert (suspect.kind, suspect.line, suspect.labelled, suspect.seen) == (CLASS, 2, "RBC", "WBC")
    assert suspect.score == pytest.approx(0.9) and suspect.labelled_score == pytest.approx(0.05)
    assert suspect.box == (10.0, 10.0, 60.0, 60.0)  # the labelled box, to find it by
    assert suspect.where() == "a.txt:2"


@pytest.mark.parametrize(
    ("scores", "why"),
    [
        ([0.9, 0.3], "the labelled class scores above the doubt there too"),
        ([0.45, 0.0], "the other class is below min_score"),
    ],
)
def test_no_class_suspect_when_the_model_is_unsure(scores: list[float], why: str) -> None:
    record = _record([[10, 10, 60, 60]], [RBC])
    detections = _detections([[10, 10, 60, 60], [10, 10, 60, 60]], scores, [WBC, RBC])
    assert audit_image(record, detections, NAMES, min_score=0.5, doubt=0.2) == [], why


def test_a_box_overlapping_below_iou_one_half_is_not_the_cell() -> None:
    record = _record([[10, 10, 60, 60]], [RBC])
    shifted = _detections([[35, 10, 85, 60]], [0.9], [WBC])  # IoU 1/3 with the cell
    assert [s.kind for s in audit_image(record, shifted, NAMES)] == []  # nor unlabelled (> 0.3)


def test_unlabelled_cells_count_only_inside_the_annotated_regions() -> None:
    record = _record([[10, 10, 40, 40]], [WBC], regions=[[0, 0, 100, 100]])
    detections = _detections(
        [
            [10, 10, 40, 40],
            [50, 50, 90, 90],
            [51, 50, 90, 91],
            [120, 120, 180, 180],
            [60, 10, 95, 40],
        ],
        [0.9, 0.7, 0.6, 0.95, 0.3],
        [WBC, RBC, WBC, RBC, RBC],
    )
    (suspect,) = audit_image(record, detections, NAMES)
    # Inside the region and alone: reported once, as its best class; outside the region
    # (unknown, not background) or below min_score: not.
    assert (suspect.kind, suspect.seen, suspect.line, suspect.labelled) == (
        UNLABELLED,
        "RBC",
        0,
        "",
    )
    assert suspect.box == (50.0, 50.0, 90.0, 90.0)
    assert suspect.where().endswith("a.png [50, 50, 90, 90]")


def test_an_unannotated_image_has_no_suspects() -> None:
    record = _record([], [], regions=np.zeros((0, 4)))
    assert audit_image(record, _detections([[5, 5, 50, 50]], [0.99], [WBC]), NAMES) == []


def test_yolo_records_carry_each_cell_s_line_past_duplicates_and_blank_lines(
    tmp_path: Path,
) -> None:
    label = tmp_path / "x.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n\n1 0.2 0.2 0.1 0.1\n")
    options = FormatOptions(num_classes=3, class_names=NAMES)
    record = parse_yolo_label_file(label, tmp_path / "x.png", 100, 100, options, DataReport())
    assert record.label_lines.tolist() == [1, 4]
    kept = restrict_to_region(record, np.array([0, 0, 40, 40], dtype=np.float32))
    assert kept.labels.tolist() == [1] and kept.label_lines.tolist() == [4]


def _dark_square_detector(images: torch.Tensor) -> list[dict]:
    """A stand-in model: one WBC at 0.9 on the dark pixels of each letterboxed input."""
    found = []
    for image in images:
        ys, xs = torch.nonzero(image.mean(0) < 0.2, as_tuple=True)
        box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
        found.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([WBC])})
    return found


def test_audit_maps_boxes_back_at_each_image_s_own_pixel_size(tmp_path: Path) -> None:
    # Two microscopes: 0.1 and 0.25 um per pixel, resampled to the model's 0.125. Each image has
    # a dark square at a known place; the first labels it RBC, the second labels nothing there.
    records = []
    for name, pixel_size, square in (
        ("fine", 0.1, (40, 60, 100, 120)),
        ("coarse", 0.25, (20, 30, 44, 54)),
    ):
        pixels = np.full((160, 160, 3), 200, dtype=np.uint8)
        x1, y1, x2, y2 = square
        pixels[y1:y2, x1:x2] = 0
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        labelled = [list(square)] if name == "fine" else [[130, 130, 150, 150]]
        record = _record(labelled, [RBC], path=str(tmp_path / f"{name}.png"))
        record.width = record.height = 160
        record.regions_xyxy = record.whole_image_region()
        record.pixel_size_um, record.domain = pixel_size, name
        records.append(record)
    predictor = Predictor(
        _dark_square_detector, NAMES, {}, image_size=128, working_pixel_size=0.125, batch_size=1
    )
    result = audit(predictor, records)
    by_domain = {s.domain: s for s in result.suspects}
    assert set(by_domain) == {"fine", "coarse"}
    assert (by_domain["fine"].kind, by_domain["fine"].labelled) == (CLASS, "RBC")
    coarse = by_domain["coarse"]
    assert coarse.kind == UNLABELLED
    np.testing.assert_allclose(coarse.box, (20, 30, 44, 54), atol=2.5)  # original pixels
    assert result.images == {"fine": 1, "coarse": 1} and result.cells == {"fine": 1, "coarse": 1}
    assert [s.kind for s in result.suspects] == [CLASS, UNLABELLED]  # wrong classes first
    with pytest.raises(ValueError, match="Eosinophil"):
        audit(predictor, records, classes=["Eosinophil"])
    assert audit(predictor, records, classes=["Platelets"]).suspects == []


def test_contact_sheet_draws_one_tile_per_suspect_and_says_when_there_are_none(
    tmp_path: Path,
) -> None:
    Image.new("RGB", (200, 200), (220, 200, 210)).save(tmp_path / "a.png")
    record = _record([[150, 150, 199, 199]], [RBC], path=str(tmp_path / "a.png"))
    suspects = audit_image(record, _detections([[150, 150, 199, 199]], [0.9], [WBC]), NAMES)
    sheet = contact_sheet(suspects * 3)
    assert sheet.width > 3 * 200 and sheet.height > 200
    # The crop runs past the image's corner: grey there, not black.
    assert contact_sheet(suspects).getpixel((195, 195)) == (128, 128, 128)
    assert contact_sheet([]).size[1] < 100


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("audit") / "tiny.ckpt", tiny_synthetic)


def test_the_command_writes_csv_and_contact_sheet(
    tiny_checkpoint: Path, tiny_synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # An untrained model: the thresholds are set low so that it has something to say.
    args = ["--ckpt_path", str(tiny_checkpoint), "--data.root", str(tiny_synthetic)]
    args += ["--data.image_size", "128", "--data.num_workers", "0", "--split", "test"]
    result = main([*args, "--min_score", "0.001", "--doubt", "0.001", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "suspects per domain" in out
    rows = list(csv.DictReader((tmp_path / AUDIT_CSV).open()))
    assert len(rows) == len(result.suspects) > 0
    assert {"kind", "image", "label_file", "line", "labelled", "seen", "score", "x1"} <= set(
        rows[0]
    )
    assert Image.open(tmp_path / AUDIT_PNG).width > 0
    assert sum(result.images.values()) == len(
        [r for r in LldDataModule(root=str(tiny_synthetic)).load_all_records() if r.split == "test"]
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--split", "nosuch"], "no images in split 'nosuch'"),
        (["--min_score", "0.1", "--doubt", "0.5"], "--doubt <= --min_score"),
        (["--classes", "Erythroblast"], "Erythroblast"),
    ],
)
def test_refusals_are_one_line(
    tiny_checkpoint: Path,
    tiny_synthetic: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
) -> None:
    args = ["--ckpt_path", str(tiny_checkpoint), "--data.root", str(tiny_synthetic)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--data.image_size", "128", "--data.num_workers", "0", *extra])
    assert exit_info.value.code == 2
    out = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in out and "Traceback" not in out


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    predictor = Predictor(_dark_square_detector, NAMES, {}, image_size=128)
    with pytest.raises(DataError, match="broken.png"):
        audit(predictor, [_record([[10, 10, 60, 60]], [RBC], path=str(broken))])
