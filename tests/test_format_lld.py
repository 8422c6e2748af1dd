"""LLD sparse YOLO format: parsing, every malformed case, skip policy, writer, layout, domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lld_lightning.constants import DEFAULT_DOMAIN, IGNORE_INDEX
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats import (
    FormatOptions,
    format_lld_rows,
    load_records,
    parse_lld_label_file,
    write_lld_label_file,
)
from lld_lightning.data.records import ImageRecord

W, H = 100, 80
# cls xc yc w h | region x1 y1 x2 y2 (pixels) | 7 attributes
ROW = "3 0.5 0.5 0.2 0.25 10 20 90 70 1 0 1 2 0 1 0"
ROW2 = "0 0.25 0.5 0.1 0.1 10 20 90 70 2 2 2 2 2 2 2"


def make_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 0).save(path)
    return path


def make_sample(
    root: Path, label: str | bytes | None, name: str = "a", split: str = "train", **image_kw
) -> tuple[Path, Path]:
    """An image ``root/images/<split>/<name>.png`` and (unless None) its label file."""
    image = make_image(root / "images" / split / f"{name}.png", **image_kw)
    label_path = root / "labels" / split / f"{name}.txt"
    if label is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        data = label if isinstance(label, bytes) else label.encode()
        label_path.write_bytes(data)
    return image, label_path


def load(root: Path, on_error: str = "raise", **options) -> tuple[list[ImageRecord], DataReport]:
    report = DataReport(on_error=on_error)
    return load_records(root, "lld", FormatOptions(**options), report), report


def test_parse_valid_rows(tmp_path: Path) -> None:
    _, label = make_sample(tmp_path, ROW + "\n" + ROW2 + "\n")
    report = DataReport()
    record = parse_lld_label_file(label, tmp_path / "a.png", W, H, FormatOptions(), report)
    # xc .5*100=50, w .2*100=20 -> x 40..60; yc .5*80=40, h .25*80=20 -> y 30..50.
    np.testing.assert_allclose(record.boxes_xyxy, [[40, 30, 60, 50], [20, 36, 30, 44]], atol=1e-4)
    np.testing.assert_array_equal(record.labels, [3, 0])
    # Value 2 on a binary attribute = missing; on cell_size (3 values) it is "large".
    np.testing.assert_array_equal(
        record.attributes,
        [
            [1, 0, 1, IGNORE_INDEX, 0, 1, 0],
            [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        ],
    )
    np.testing.assert_array_equal(record.regions_xyxy, [[10, 20, 90, 70]])
    assert record.boxes_xyxy.dtype == np.float32 and record.attributes.dtype == np.int64


def test_region_order_xxyy(tmp_path: Path) -> None:
    _, label = make_sample(tmp_path, "3 0.5 0.5 0.2 0.25 10 90 20 70 1 0 1 0 0 1 0\n")
    options = FormatOptions(region_order="xxyy")
    record = parse_lld_label_file(label, tmp_path / "a.png", W, H, options, DataReport())
    np.testing.assert_array_equal(record.regions_xyxy, [[10, 20, 90, 70]])


def test_several_regions_kept_unique_and_sorted(tmp_path: Path) -> None:
    rows = [
        "3 0.8 0.5 0.1 0.1 60 0 100 80 1 0 1 0 0 1 0",
        "3 0.2 0.5 0.1 0.1 0 0 40 80 1 0 1 0 0 1 0",
        "4 0.3 0.5 0.1 0.1 0 0 40 80 1 0 1 0 0 1 0",
    ]
    _, label = make_sample(tmp_path, "\n".join(rows))
    record = parse_lld_label_file(label, tmp_path / "a.png", W, H, FormatOptions(), DataReport())
    np.testing.assert_array_equal(record.regions_xyxy, [[0, 0, 40, 80], [60, 0, 100, 80]])


def test_empty_label_file_is_a_fully_annotated_image_without_cells(tmp_path: Path) -> None:
    make_sample(tmp_path, "")
    (record,), _ = load(tmp_path)
    assert record.num_cells == 0 and record.attributes.shape == (0, 7)
    np.testing.assert_array_equal(record.regions_xyxy, [[0, 0, W, H]])


def test_box_within_tolerance_is_clipped(tmp_path: Path) -> None:
    # x2 = 0.9 + 0.1004 = 1.0004 normalised: rounding, clipped to the image edge.
    make_sample(tmp_path, "3 0.9502 0.5 0.1 0.1 10 20 100 70 1 0 1 0 0 1 0")
    (record,), _ = load(tmp_path)
    assert record.boxes_xyxy[0, 2] == pytest.approx(100.0)
    assert record.boxes_xyxy[0, 0] == pytest.approx(90.02, abs=1e-3)


MALFORMED = {
    "columns": ("3 0.5 0.5 0.2 0.25 10 20 90 70 1 0 1 0 0 1", "expected 16 numbers, got 15"),
    "non-numeric": ("3 0.5 abc 0.2 0.25 10 20 90 70 1 0 1 0 0 1 0", "'abc' is not a number"),
    "nan": ("3 0.5 0.5 nan 0.25 10 20 90 70 1 0 1 0 0 1 0", "is not finite"),
    "inf": ("3 0.5 0.5 0.2 0.25 10 20 inf 70 1 0 1 0 0 1 0", "is not finite"),
    "box outside": ("3 0.95 0.5 0.2 0.25 10 20 90 70 1 0 1 0 0 1 0", "box outside the image"),
    "box zero size": ("3 0.5 0.5 0 0.25 10 20 90 70 1 0 1 0 0 1 0", "zero or negative size"),
    "box negative": ("3 0.5 0.5 0.2 -0.1 10 20 90 70 1 0 1 0 0 1 0", "zero or negative size"),
    # 1e-11 of 100 pixels: a box of 1e-9 pixels.
    "box degenerate": ("3 0.5 0.5 1e-11 0.25 10 20 90 70 1 0 1 0 0 1 0", "degenerate size"),
    # Centred at x = 95: outside its own region (x 10..30) and the other row's (x 10..90).
    "box outside regions": (
        "3 0.95 0.5 0.05 0.25 10 20 30 70 1 0 1 0 0 1 0",
        "centred outside every annotated region",
    ),
    "class range": ("14 0.5 0.5 0.2 0.25 10 20 90 70 1 0 1 0 0 1 0", "class id 14 out of range"),
    "class negative": ("-1 0.5 0.5 0.2 0.25 10 20 90 70 1 0 1 0 0 1 0", "out of range"),
    "class fraction": ("1.5 0.5 0.5 0.2 0.25 10 20 90 70 1 0 1 0 0 1 0", "not an integer"),
    "binary attr 3": (
        "3 0.5 0.5 0.2 0.25 10 20 90 70 1 3 1 0 0 1 0",
        "nuclear_chromatin = 3 out of range [0, 2)",
    ),
    "cell_size 3": (
        "3 0.5 0.5 0.2 0.25 10 20 90 70 3 0 1 0 0 1 0",
        "cell_size = 3 out of range [0, 3)",
    ),
    "attr fraction": ("3 0.5 0.5 0.2 0.25 10 20 90 70 1 0.5 1 0 0 1 0", "not an integer"),
    "region reversed": ("3 0.5 0.5 0.2 0.25 90 20 10 70 1 0 1 0 0 1 0", "reversed"),
    "region empty": ("3 0.5 0.5 0.2 0.25 10 20 90 20 1 0 1 0 0 1 0", "reversed or empty"),
    "region outside": ("3 0.5 0.5 0.2 0.25 10 20 190 70 1 0 1 0 0 1 0", "outside the 100x80"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_names_file_and_line(tmp_path: Path, case: str) -> None:
    row, expected = MALFORMED[case]
    _, label = make_sample(tmp_path, f"{ROW}\n\n{row}\n")  # bad row on line 3
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert f"{label}:3:" in str(info.value)
    assert expected in str(info.value)


def test_non_utf8_label_names_file_and_line(tmp_path: Path) -> None:
    _, label = make_sample(tmp_path, ROW.encode() + b"\n3 0.5 \xff\n")
    with pytest.raises(DataError, match="not UTF-8") as info:
        load(tmp_path)
    assert f"{label}:2:" in str(info.value)


def test_duplicate_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    _, label = make_sample(tmp_path, f"{ROW}\n{ROW2}\n{ROW}\n{ROW}\n")
    (record,), report = load(tmp_path)
    assert record.num_cells == 2
    assert report.dropped_duplicates == 2 and report.duplicate_files[str(label)] == 2
    assert report.num_skipped == 0


def test_missing_label_error_and_unlabelled(tmp_path: Path) -> None:
    image, _ = make_sample(tmp_path, None)
    with pytest.raises(DataError, match="no label file") as info:
        load(tmp_path)
    assert str(image) in str(info.value)
    (record,), _ = load(tmp_path, missing_labels="unlabelled")
    assert record.regions_xyxy.shape == (0, 4) and record.num_cells == 0
    assert not record.is_labelled and record.attributes.shape == (0, 7)


def test_corrupt_image_names_the_image(tmp_path: Path) -> None:
    image, _ = make_sample(tmp_path, ROW)
    image.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image") as info:
        load(tmp_path)
    assert str(image) in str(info.value)


def test_truncated_image_found_by_full_check(tmp_path: Path) -> None:
    image, _ = make_sample(tmp_path, ROW)
    Image.effect_noise((W, H), 50).convert("RGB").save(image)
    image.write_bytes(image.read_bytes()[:300])
    assert len(load(tmp_path)[0]) == 1  # the header is intact
    with pytest.raises(DataError, match="truncated") as info:
        load(tmp_path, check_images="full")
    assert str(image) in str(info.value)


def test_image_too_large(tmp_path: Path) -> None:
    image, _ = make_sample(tmp_path, ROW)
    with pytest.raises(DataError, match="too large") as info:
        load(tmp_path, max_image_pixels=W * H - 1)
    assert str(image) in str(info.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_converted_modes_are_counted(tmp_path: Path, mode: str) -> None:
    make_sample(tmp_path, ROW, mode=mode)
    (record,), report = load(tmp_path)
    assert report.converted == {mode: 1} and record.num_cells == 1


def test_label_without_image_is_counted_not_raised(tmp_path: Path) -> None:
    make_sample(tmp_path, ROW)
    orphan = tmp_path / "labels" / "train" / "ghost.txt"
    orphan.write_text(ROW)
    (tmp_path / "labels" / "train" / "classes.txt").write_text("a\nb\n")  # a YOLO name list
    records, report = load(tmp_path)
    assert len(records) == 1 and report.skipped == {"label without image": 1}
    assert str(orphan) in report.examples["label without image"][0]


def test_skip_policy_skips_whole_images_and_counts(tmp_path: Path) -> None:
    make_sample(tmp_path, f"{ROW}\n{ROW2}\n", name="good")
    make_sample(tmp_path, f"{ROW}\n{MALFORMED['class range'][0]}\n", name="bad_row")
    bad_image, _ = make_sample(tmp_path, ROW, name="bad_image")
    bad_image.write_bytes(b"garbage")
    make_sample(tmp_path, None, name="no_label")
    records, report = load(tmp_path, on_error="skip")
    assert [r.path.stem for r in records] == ["good"]
    assert records[0].num_cells == 2  # no row of a bad file leaks in as a partial image
    assert report.skipped == {"invalid label": 1, "invalid image": 1, "missing label": 1}
    assert report.num_skipped == 3


def test_splits_ids_and_order(tmp_path: Path) -> None:
    make_sample(tmp_path, ROW, name="b", split="val")
    make_sample(tmp_path, ROW, name="a", split="train")
    make_image(tmp_path / "images" / "c.png")  # directly under images/: split ""
    (tmp_path / "labels").mkdir(exist_ok=True)
    (tmp_path / "labels" / "c.txt").write_text("")
    make_image(tmp_path / "other" / "d.png")  # not under images/: ignored
    records, _ = load(tmp_path)
    assert [(r.path.name, r.split, r.image_id) for r in records] == [
        ("c.png", "", 0),
        ("a.png", "train", 1),
        ("b.png", "val", 2),
    ]


def test_domain_from_folder_name_then_manifest_then_default(tmp_path: Path) -> None:
    make_sample(tmp_path / "H_100x_C1", ROW, name="x")
    make_sample(tmp_path / "L_40x_C2", ROW, name="y")
    make_sample(tmp_path / "misc", ROW, name="z")
    make_sample(tmp_path / "misc", ROW, name="w")
    (tmp_path / "manifest.csv").write_text("file,split,source\nz.png,train,phone\n")
    records, report = load(tmp_path, manifest=Path("manifest.csv"))
    domains = {r.path.stem: r.domain for r in records}
    assert domains == {"x": "H_100x_C1", "y": "L_40x_C2", "z": "phone", "w": DEFAULT_DOMAIN}
    assert report.skipped == {"image not in manifest": 3}  # counted, never raised


def test_domain_when_root_is_the_domain_folder(tmp_path: Path) -> None:
    make_sample(tmp_path / "H_10x_C2", ROW)
    (record,), _ = load(tmp_path / "H_10x_C2")
    assert record.domain == "H_10x_C2"


def make_record(**kw) -> ImageRecord:
    fields = dict(
        path=Path("a.png"),
        width=W,
        height=H,
        boxes_xyxy=np.array([[40, 30, 60, 50], [5, 10, 15, 20]], dtype=np.float32),
        labels=np.array([3, 0]),
        attributes=np.array([[1, 0, 1, 0, 0, 1, 0], [IGNORE_INDEX] * 7]),
        regions_xyxy=np.array([[0, 0, 70.5, 80]], dtype=np.float32),
    )
    fields.update(kw)
    return ImageRecord(**fields)


def test_format_lld_rows_exact_text() -> None:
    text = format_lld_rows(make_record())
    assert text == (
        "3 0.500000 0.500000 0.200000 0.250000 0 0 70.5 80 1 0 1 0 0 1 0\n"
        "0 0.100000 0.187500 0.100000 0.125000 0 0 70.5 80 -1 2 2 2 2 2 2\n"
    )
    assert format_lld_rows(make_record(), region_order="xxyy").split()[5:9] == [
        "0",
        "70.5",
        "0",
        "80",
    ]


def test_writer_assigns_rows_to_their_region_and_refuses_empty_regions() -> None:
    two = np.array([[50, 0, 100, 80], [0, 0, 20, 40]], dtype=np.float32)
    rows = format_lld_rows(make_record(regions_xyxy=two)).splitlines()
    assert rows[0].split()[5:9] == ["50", "0", "100", "80"]
    assert rows[1].split()[5:9] == ["0", "0", "20", "40"]
    three = np.concatenate([two, [[0, 60, 10, 70]]]).astype(np.float32)
    with pytest.raises(DataError, match=r"region \[0 60 10 70\] holds no cell"):
        format_lld_rows(make_record(regions_xyxy=three))


def test_writer_without_cells() -> None:
    no_cells = dict(
        boxes_xyxy=np.zeros((0, 4), np.float32),
        labels=np.zeros(0, np.int64),
        attributes=np.zeros((0, 7), np.int64),
    )
    whole = np.array([[0, 0, W, H]], dtype=np.float32)
    assert format_lld_rows(make_record(regions_xyxy=whole, **no_cells)) == ""
    with pytest.raises(DataError, match="holds no cell.*write COCO"):
        format_lld_rows(make_record(**no_cells))
    with pytest.raises(DataError, match="unlabelled"):
        format_lld_rows(make_record(regions_xyxy=np.zeros((0, 4), np.float32), **no_cells))


def test_write_parse_write_is_byte_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x1y1 = rng.uniform(0, 50, (6, 2))
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(3, 30, (6, 2))], 1).astype(np.float32)
    record = make_record(
        boxes_xyxy=boxes,
        labels=rng.integers(0, 14, 6),
        attributes=np.concatenate([rng.integers(-1, 3, (6, 1)), rng.integers(-1, 2, (6, 6))], 1),
        regions_xyxy=np.array([[0, 0, 41.25, 80], [40.5, 0, 100, 80]], dtype=np.float32),
    )
    first = tmp_path / "first.txt"
    write_lld_label_file(record, first)
    parsed = parse_lld_label_file(first, record.path, W, H, FormatOptions(), DataReport())
    second = tmp_path / "second.txt"
    write_lld_label_file(parsed, second)
    assert first.read_bytes() == second.read_bytes()
    np.testing.assert_array_equal(parsed.labels, record.labels)
    np.testing.assert_array_equal(parsed.attributes, record.attributes)
    np.testing.assert_allclose(parsed.boxes_xyxy, record.boxes_xyxy, atol=1e-3)


def test_a_cell_centred_in_another_rows_region_or_on_a_rounded_border_is_accepted(
    tmp_path: Path,
) -> None:
    # Row 2 carries region x 60..100 but its cell (x 20..30) lies in row 1's region x 0..40; row 3
    # is centred at x 40.5, half a pixel past the region that label files round to 2 decimals.
    rows = [
        "3 0.15 0.5 0.1 0.25 0 0 40 80 1 0 1 0 0 1 0",
        "3 0.25 0.5 0.1 0.25 60 0 100 80 1 0 1 0 0 1 0",
        "3 0.405 0.5 0.05 0.25 0 0 40 80 1 0 1 0 0 1 0",
    ]
    make_sample(tmp_path, "\n".join(rows) + "\n")
    (record,), report = load(tmp_path)
    assert record.num_cells == 3 and report.num_skipped == 0


def test_degenerate_box_and_cell_outside_its_regions_are_skipped_and_counted(
    tmp_path: Path,
) -> None:
    make_sample(tmp_path, f"{ROW}\n", name="good")
    make_sample(tmp_path, f"{ROW}\n{MALFORMED['box degenerate'][0]}\n", name="tiny")
    make_sample(tmp_path, f"{MALFORMED['box outside regions'][0]}\n", name="outside")
    records, report = load(tmp_path, on_error="skip")
    assert [r.path.stem for r in records] == ["good"]
    assert report.skipped == {"invalid label": 2}
