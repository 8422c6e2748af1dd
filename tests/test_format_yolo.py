"""Plain YOLO: parsing, malformed rows, the attribute-CSV join, manifest domains and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lld_lightning.constants import DEFAULT_DOMAIN, IGNORE_INDEX
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats import FormatOptions, load_records
from lld_lightning.data.records import ImageRecord

W, H = 200, 100
COLUMNS = {"size": ["small", "big"], "shape": ["round", "irregular", "lobed"]}
SPEC = {"size": 2, "colour": 4, "shape": 3}  # "colour" has no CSV column: always ignored


def make_sample(root: Path, label: str | None, name: str = "a", split: str = "train") -> Path:
    image = root / "images" / split / f"{name}.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (W, H)).save(image)
    label_path = root / "labels" / split / f"{name}.txt"
    if label is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.write_text(label)
    return label_path


def options(**kw) -> FormatOptions:
    base = dict(num_classes=3, class_names=("WBC", "RBC", "Platelets"), attribute_spec=SPEC)
    return FormatOptions(**{**base, **kw})


def load(root: Path, on_error: str = "raise", **kw) -> tuple[list[ImageRecord], DataReport]:
    report = DataReport(on_error=on_error)
    return load_records(root, "yolo", options(**kw), report), report


def test_plain_rows_fully_annotated(tmp_path: Path) -> None:
    make_sample(tmp_path, "0 0.5 0.5 0.1 0.2\n2 0.25 0.75 0.5 0.5\n")
    (record,), _ = load(tmp_path)
    np.testing.assert_allclose(record.boxes_xyxy, [[90, 40, 110, 60], [0, 50, 100, 100]])
    np.testing.assert_array_equal(record.labels, [0, 2])
    np.testing.assert_array_equal(record.attributes, np.full((2, 3), IGNORE_INDEX))
    np.testing.assert_array_equal(record.regions_xyxy, [[0, 0, W, H]])
    assert record.domain == DEFAULT_DOMAIN


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("0 0.5 0.5 0.1", "expected 5 numbers, got 4"),
        ("0 0.5 0.5 0.1 0.1 1", "expected 5 numbers, got 6"),
        ("3 0.5 0.5 0.1 0.1", "class id 3 out of range [0, 3)"),
        ("0 0.5 0.5 0.1 -inf", "is not finite"),
        ("0 0.5 0.5 1.2 0.1", "box outside the image"),
        ("0 0.5 0.5 0.0 0.1", "zero or negative size"),
        ("0 0.5 0.5 5e-12 0.1", "degenerate size"),  # 1e-9 of a pixel (W = 200)
        ("x 0.5 0.5 0.1 0.1", "column 1: 'x' is not a number"),
    ],
)
def test_malformed_rows(tmp_path: Path, row: str, expected: str) -> None:
    label = make_sample(tmp_path, f"0 0.5 0.5 0.1 0.1\n{row}\n")
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert f"{label}:2:" in str(info.value) and expected in str(info.value)


def write_csv(root: Path, rows: list[str]) -> Path:
    path = root / "attributes.csv"
    path.write_text("txl_file,center_wbc_label_line,size,shape\n" + "".join(r + "\n" for r in rows))
    return path


def test_attribute_join_zero_based_line_through_duplicates(tmp_path: Path) -> None:
    # Line 0 is duplicated on line 2; the described cell is on 0-based line 3.
    make_sample(
        tmp_path, "1 0.1 0.1 0.1 0.1\n0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n0 0.7 0.7 0.2 0.2\n"
    )
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n", name="b")
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n", name="c")
    write_csv(tmp_path, ["a.jpg,3,big,lobed", "b.jpg,0,small,", "c.jpg,,big,round"])
    (a, b, c), report = load(
        tmp_path, attribute_csv=Path("attributes.csv"), attribute_columns=COLUMNS
    )
    assert a.num_cells == 3 and report.dropped_duplicates == 1
    np.testing.assert_array_equal(a.attributes, [[-1, -1, -1], [-1, -1, -1], [1, IGNORE_INDEX, 2]])
    np.testing.assert_array_equal(b.attributes, [[0, IGNORE_INDEX, IGNORE_INDEX]])  # "" = missing
    np.testing.assert_array_equal(c.attributes, [[-1, -1, -1]])  # no described cell


def test_attribute_duplicate_line_maps_to_its_first_copy(tmp_path: Path) -> None:
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n0 0.5 0.5 0.2 0.2\n")
    write_csv(tmp_path, ["a.jpg,2,big,round"])
    (a,), _ = load(tmp_path, attribute_csv=Path("attributes.csv"), attribute_columns=COLUMNS)
    np.testing.assert_array_equal(a.attributes, [[1, -1, 0], [-1, -1, -1]])


def test_attribute_unknown_value_names_csv_line(tmp_path: Path) -> None:
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n", name="b")
    csv_path = write_csv(tmp_path, ["a.jpg,0,big,round", "b.jpg,0,huge,round"])
    with pytest.raises(DataError, match="column 'size': unknown value 'huge'") as info:
        load(tmp_path, attribute_csv=csv_path, attribute_columns=COLUMNS)
    assert f"{csv_path}:3:" in str(info.value)
    records, report = load(
        tmp_path, on_error="skip", attribute_csv=csv_path, attribute_columns=COLUMNS
    )
    assert [r.path.name for r in records] == ["a.jpg"]
    assert report.skipped == {"invalid attribute row": 1}


def test_attribute_line_without_row(tmp_path: Path) -> None:
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    csv_path = write_csv(tmp_path, ["a.jpg,1,big,round", "ghost.jpg,0,big,round"])
    with pytest.raises(DataError, match="0-based label line 1 holds no row") as info:
        load(tmp_path, attribute_csv=csv_path, attribute_columns=COLUMNS)
    assert f"{csv_path}:2:" in str(info.value)
    csv_path.write_text(
        "txl_file,center_wbc_label_line,size,shape\na.jpg,0,big,round\nghost.jpg,0,big,round\n"
    )
    _, report = load(tmp_path, attribute_csv=csv_path, attribute_columns=COLUMNS)
    assert report.skipped == {"attribute row without image": 1}


def test_attribute_csv_missing_column(tmp_path: Path) -> None:
    make_sample(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    csv_path = tmp_path / "attributes.csv"
    csv_path.write_text("txl_file,size\na.jpg,big\n")
    with pytest.raises(DataError, match="missing column"):
        load(tmp_path, attribute_csv=csv_path, attribute_columns=COLUMNS)


def test_attribute_columns_must_match_spec() -> None:
    with pytest.raises(ValueError, match="attribute_spec says 2 values"):
        options(attribute_columns={"size": ["a", "b", "c"]})


def test_manifest_domain_by_split_and_name(tmp_path: Path) -> None:
    make_sample(tmp_path, "", name="a", split="train")
    make_sample(tmp_path, "", name="a", split="val")
    (tmp_path / "map.csv").write_text("split,file,source\ntrain,a.jpg,BCCD\nval,a.jpg,PBC\n")
    records, _ = load(tmp_path, manifest=Path("map.csv"))
    assert [(r.split, r.domain) for r in records] == [("train", "BCCD"), ("val", "PBC")]


def test_manifest_gives_split_when_folder_has_none(tmp_path: Path) -> None:
    make_sample(tmp_path, "", name="a", split="")
    (tmp_path / "map.csv").write_text("split,file,source\ntest,a.jpg,Raabin\n")
    (record,), _ = load(tmp_path, manifest=tmp_path / "map.csv")
    assert (record.split, record.domain) == ("test", "Raabin")


def test_manifest_duplicate_row(tmp_path: Path) -> None:
    make_sample(tmp_path, "")
    manifest = tmp_path / "map.csv"
    manifest.write_text("file,source\na.jpg,X\na.jpg,Y\n")
    with pytest.raises(DataError, match="already on line 2") as info:
        load(tmp_path, manifest=manifest)
    assert f"{manifest}:3:" in str(info.value)
