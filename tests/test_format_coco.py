"""COCO with attributes: schema, LLD -> COCO -> LLD round trip, malformed cases, skip policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from lld_lightning.constants import IGNORE_INDEX, LLD_ATTRIBUTE_VALUES, LLD_CLASSES
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats import (
    FormatOptions,
    load_records,
    parse_lld_label_file,
    read_coco,
    write_coco,
    write_lld_label_file,
)
from lld_lightning.data.records import ImageRecord

W, H = 120, 90
ATTRS = {
    "cell_size": 1,
    "nuclear_chromatin": 0,
    "nuclear_shape": None,
    "nucleolus": 1,
    "cytoplasm": 0,
    "cytoplasmic_basophilia": 1,
    "cytoplasmic_vacuoles": 0,
}


def make_image(path: Path, size: tuple[int, int] = (W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, 0).save(path)
    return path


def coco_dataset(root: Path, images: list[dict], annotations: list[dict], **extra) -> Path:
    """``root/Annotations/train.json`` with images under ``root/Images/train``."""
    for image in images:
        make_image(
            root / "Images" / "train" / image["file_name"], (image["width"], image["height"])
        )
    document = {
        "attribute_spec": {k: list(v) for k, v in LLD_ATTRIBUTE_VALUES.items()},
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(LLD_CLASSES)],
        "images": images,
        "annotations": annotations,
        **extra,
    }
    path = root / "Annotations" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def image_entry(image_id: int = 7, name: str = "a.png", **kw) -> dict:
    return {"id": image_id, "file_name": name, "width": W, "height": H, **kw}


def annotation(ann_id: int = 3, image_id: int = 7, **kw) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 4,
        "bbox": [10, 20, 30, 40],
        "attributes": dict(ATTRS),
        **kw,
    }


def load(root: Path, on_error: str = "raise") -> tuple[list[ImageRecord], DataReport]:
    report = DataReport(on_error=on_error)
    return load_records(root, "coco", FormatOptions(), report), report


def test_read_valid_file(tmp_path: Path) -> None:
    coco_dataset(
        tmp_path,
        [
            image_entry(domain="H_40x_C1", annotated_regions=[[0, 0, 60, 90]]),
            image_entry(8, "b.png"),
            image_entry(9, "c.png", annotated_regions=[]),
        ],
        [annotation()],
    )
    (a, b, c), report = load(tmp_path)
    np.testing.assert_array_equal(a.boxes_xyxy, [[10, 20, 40, 60]])
    np.testing.assert_array_equal(a.labels, [3])  # category id 4 = class 3
    np.testing.assert_array_equal(a.attributes, [[1, 0, IGNORE_INDEX, 1, 0, 1, 0]])
    np.testing.assert_array_equal(a.regions_xyxy, [[0, 0, 60, 90]])
    assert (a.domain, a.split) == ("H_40x_C1", "train")
    np.testing.assert_array_equal(b.regions_xyxy, [[0, 0, W, H]])  # absent = whole image
    assert b.num_cells == 0 and b.attributes.shape == (0, 7)
    assert not c.is_labelled  # [] = unlabelled
    assert [r.image_id for r in (a, b, c)] == [0, 1, 2] and report.num_skipped == 0


def test_file_name_relative_to_root_also_works(tmp_path: Path) -> None:
    path = coco_dataset(tmp_path, [image_entry(name="Images/train/a.png")], [annotation()])
    # coco_dataset put the image at Images/train/Images/train/a.png; move it to root-relative.
    nested = tmp_path / "Images" / "train" / "Images" / "train" / "a.png"
    nested.rename(tmp_path / "Images" / "train" / "a.png")
    (record,), _ = load(tmp_path)
    assert record.path == tmp_path / "Images" / "train" / "a.png"
    assert path.exists()


def lld_records(tmp_path: Path) -> list[ImageRecord]:
    """Two images with several regions and missing attributes, via the LLD writer + parser.

    Every cell is centred inside a region (the parsers reject one that is not)."""
    rng = np.random.default_rng(1)
    records = []
    for k, regions in enumerate(([[0, 0, 90.5, 90]], [[0, 0, 50, 45.25], [55, 40, 120, 90]])):
        image = make_image(tmp_path / "Images" / "train" / f"im{k}.png")
        x1y1 = np.array([[5, 5], [60, 50], [20, 10]], dtype=np.float64) + rng.uniform(0, 3, (3, 2))
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(4, 25, (3, 2))], 1).astype(np.float32)
        attributes = np.concatenate([rng.integers(-1, 3, (3, 1)), rng.integers(-1, 2, (3, 6))], 1)
        source = ImageRecord(
            path=image,
            width=W,
            height=H,
            boxes_xyxy=boxes,
            labels=rng.integers(0, 14, 3),
            attributes=attributes,
            regions_xyxy=np.asarray(regions, dtype=np.float32),
        )
        label = tmp_path / "lld" / f"im{k}.txt"
        write_lld_label_file(source, label)
        record = parse_lld_label_file(label, image, W, H, FormatOptions(), DataReport())
        record.image_id, record.domain = k + 1, "L_10x_C2"
        records.append(record)
    return records


def test_lld_coco_lld_round_trip_is_exact(tmp_path: Path) -> None:
    records = lld_records(tmp_path)
    json_path = tmp_path / "Annotations" / "train.json"
    write_coco(records, json_path, tmp_path / "Images" / "train", LLD_CLASSES, LLD_ATTRIBUTE_VALUES)
    back = read_coco(json_path, tmp_path / "Images" / "train", FormatOptions(), DataReport())
    assert len(back) == 2
    for record, again in zip(records, back, strict=True):
        for name in ("boxes_xyxy", "labels", "attributes", "regions_xyxy"):
            np.testing.assert_array_equal(getattr(again, name), getattr(record, name))
            assert getattr(again, name).dtype == getattr(record, name).dtype
        assert (again.domain, again.image_id, again.path) == (
            record.domain,
            record.image_id,
            record.path,
        )
        first, second = tmp_path / "1.txt", tmp_path / "2.txt"
        write_lld_label_file(record, first)
        write_lld_label_file(again, second)
        assert first.read_bytes() == second.read_bytes()
        assert record.label_path.read_bytes() == second.read_bytes()


def test_written_file_schema_and_pycocotools(tmp_path: Path) -> None:
    records = lld_records(tmp_path)
    json_path = tmp_path / "out.json"
    write_coco(records, json_path, tmp_path / "Images" / "train", LLD_CLASSES, LLD_ATTRIBUTE_VALUES)
    document = json.loads(json_path.read_text())
    assert document["categories"][0] == {"id": 1, "name": "None"}
    assert document["attribute_spec"]["cell_size"] == ["small", "medium", "large"]
    assert document["images"][1]["file_name"] == "im1.png"
    assert len(document["images"][1]["annotated_regions"]) == 2
    first = document["annotations"][0]
    assert first["category_id"] == int(records[0].labels[0]) + 1
    assert set(first["attributes"]) == set(LLD_ATTRIBUTE_VALUES)
    coco = COCO(str(json_path))
    assert sorted(coco.getImgIds()) == [1, 2] and len(coco.getAnnIds()) == 6


def test_write_refuses_duplicate_image_ids(tmp_path: Path) -> None:
    records = lld_records(tmp_path)
    records[1].image_id = records[0].image_id
    with pytest.raises(DataError, match="image_id 1 already used"):
        write_coco(
            records,
            tmp_path / "x.json",
            tmp_path / "Images" / "train",
            LLD_CLASSES,
            LLD_ATTRIBUTE_VALUES,
        )


MALFORMED = {
    "bbox outside": (annotation(bbox=[100, 20, 30, 40]), "annotation id 3 (image id 7): box"),
    "bbox zero size": (annotation(bbox=[10, 20, 0, 40]), "zero or negative size"),
    "bbox degenerate": (annotation(bbox=[10, 20, 1e-9, 40]), "degenerate size"),
    "bbox nan": (annotation(bbox=[10, 20, "x", 40]), "bbox must be 4 finite numbers"),
    "category range": (annotation(category_id=15), "annotation id 3: category_id 15"),
    "category zero": (annotation(category_id=0), "category_id 0 is not an integer in [1, 15)"),
    "attribute range": (
        annotation(attributes={**ATTRS, "nucleolus": 2}),
        "annotation id 3: attribute nucleolus = 2",
    ),
    "attribute float": (annotation(attributes={**ATTRS, "cell_size": 1.5}), "cell_size = 1.5"),
    "attribute unknown": (annotation(attributes={"colour": 1}), "unknown attribute(s) ['colour']"),
    "unknown image": (annotation(image_id=99), "annotation id 3: unknown image id 99"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_names_file_and_ids(tmp_path: Path, case: str) -> None:
    bad, expected = MALFORMED[case]
    json_path = coco_dataset(tmp_path, [image_entry()], [bad])
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{json_path}: ")
    assert expected in str(info.value)


IMAGE_CASES = {
    "region reversed": (image_entry(annotated_regions=[[50, 0, 10, 90]]), "image id 7: annotated"),
    "region outside": (image_entry(annotated_regions=[[0, 0, 500, 90]]), "outside the 120x90"),
    "cells but no region": (image_entry(annotated_regions=[]), "annotated_regions is []"),
    # The default annotation (x 10..40, y 20..60) is centred at (25, 40).
    "cell outside its regions": (
        image_entry(annotated_regions=[[60, 0, 120, 90], [0, 60, 50, 90]]),
        "annotation id 3 (image id 7): box [10.0, 20.0, 40.0, 60.0] (xyxy) is centred outside "
        "every annotated region",
    ),
    "size mismatch": (image_entry(width=W + 1), "json says 121x90"),
    "duplicate image id": (None, "image id 7 missing or not unique"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_malformed_image_entry_names_file_and_id(tmp_path: Path, case: str) -> None:
    entry, expected = IMAGE_CASES[case]
    images = [image_entry(), image_entry(name="b.png")] if entry is None else [entry]
    json_path = coco_dataset(tmp_path, images, [annotation()])
    if case == "size mismatch":
        make_image(tmp_path / "Images" / "train" / "a.png")  # the real file is 120x90
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{json_path}: ") and expected in str(info.value)


def test_missing_image_file(tmp_path: Path) -> None:
    json_path = coco_dataset(tmp_path, [image_entry()], [])
    (tmp_path / "Images" / "train" / "a.png").unlink()
    with pytest.raises(DataError, match="image id 7: image file 'a.png' not found") as info:
        load(tmp_path)
    assert str(json_path) in str(info.value)


def test_corrupt_image_names_it(tmp_path: Path) -> None:
    coco_dataset(tmp_path, [image_entry()], [])
    image = tmp_path / "Images" / "train" / "a.png"
    image.write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read image") as info:
        load(tmp_path)
    assert str(image) in str(info.value)


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "Annotations" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text('{\n "images": [\n  {"id": 1,,}\n ]\n}')
    with pytest.raises(DataError, match="invalid JSON") as info:
        load(tmp_path)
    assert f"{path}:3:" in str(info.value)


def test_header_mismatch(tmp_path: Path) -> None:
    coco_dataset(tmp_path, [image_entry()], [], attribute_spec={"cell_size": ["a", "b"]})
    with pytest.raises(DataError, match="attribute_spec .* does not match"):
        load(tmp_path)
    coco_dataset(tmp_path, [image_entry()], [], categories=[{"id": 1, "name": "Blast"}])
    with pytest.raises(DataError, match="category id 1 is named 'Blast', expected 'None'"):
        load(tmp_path)


def test_duplicate_annotations_dropped_and_counted(tmp_path: Path) -> None:
    json_path = coco_dataset(
        tmp_path, [image_entry()], [annotation(1), annotation(2), annotation(3, bbox=[1, 1, 5, 5])]
    )
    (record,), report = load(tmp_path)
    assert record.num_cells == 2
    assert report.dropped_duplicates == 1 and report.duplicate_files[str(json_path)] == 1


def test_skip_policy_skips_whole_images(tmp_path: Path) -> None:
    coco_dataset(
        tmp_path,
        [image_entry(1, "good.png"), image_entry(2, "bad.png"), image_entry(3, "gone.png")],
        [annotation(1, 1), annotation(2, 2), annotation(3, 2, category_id=99), annotation(4, 42)],
    )
    (tmp_path / "Images" / "train" / "gone.png").unlink()
    records, report = load(tmp_path, on_error="skip")
    assert [r.path.name for r in records] == ["good.png"]
    # image 2 (one bad annotation) and image 3 (no file) skipped; annotation 4 has no image.
    assert report.skipped == {"invalid annotation": 3}


def test_skip_policy_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "Annotations" / "val.json"
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2")
    records, report = load(tmp_path, on_error="skip")
    assert records == [] and report.skipped == {"invalid annotation file": 1}


def test_attribute_spec_given_as_counts_is_read(tmp_path: Path) -> None:
    counts = {name: len(values) for name, values in LLD_ATTRIBUTE_VALUES.items()}
    coco_dataset(tmp_path, [image_entry()], [annotation()], attribute_spec=counts)
    (record,), _ = load(tmp_path)
    np.testing.assert_array_equal(record.attributes, [[1, 0, IGNORE_INDEX, 1, 0, 1, 0]])
    # Counts that disagree with the configured spec are the same mismatch as value lists.
    coco_dataset(tmp_path, [image_entry()], [], attribute_spec={**counts, "cell_size": 2})
    with pytest.raises(DataError, match="attribute_spec .* does not match"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"cell_size": "three"}, "attribute_spec['cell_size'] = 'three': expected a list"),
        ({"cell_size": 0}, "attribute_spec['cell_size'] = 0"),
        ({"cell_size": True}, "attribute_spec['cell_size'] = True"),
        (["cell_size"], "attribute_spec must map each name"),
    ],
)
def test_attribute_spec_of_no_known_form_names_the_file(
    tmp_path: Path, spec: object, expected: str
) -> None:
    json_path = coco_dataset(tmp_path, [image_entry()], [], attribute_spec=spec)
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert str(info.value).startswith(f"{json_path}: ") and expected in str(info.value)


def test_skipped_file_counts_every_image_it_held(tmp_path: Path) -> None:
    coco_dataset(
        tmp_path,
        [image_entry(1, "a.png"), image_entry(2, "b.png"), image_entry(3, "c.png")],
        [],
        attribute_spec={"cell_size": ["a", "b"]},
    )
    records, report = load(tmp_path, on_error="skip")
    assert records == [] and report.skipped == {"invalid annotation file": 3}


def test_cell_outside_its_regions_skips_its_image_under_skip(tmp_path: Path) -> None:
    coco_dataset(
        tmp_path,
        [image_entry(1, "a.png"), image_entry(2, "b.png", annotated_regions=[[60, 0, 120, 90]])],
        [annotation(1, 1), annotation(2, 2)],
    )
    records, report = load(tmp_path, on_error="skip")
    assert [r.path.name for r in records] == ["a.png"]
    assert report.skipped == {"invalid annotation": 1}
    assert "annotation id 2 (image id 2)" in report.examples["invalid annotation"][0]
