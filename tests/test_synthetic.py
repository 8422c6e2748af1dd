"""Tests of the synthetic LLD-like generator: determinism, layout, sparse regions, pixel cues, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lld_lightning.constants import IGNORE_INDEX, LLD_CLASSES, LLD_MISSING_ATTRIBUTE
from lld_lightning.data import synthetic_cells as cells
from lld_lightning.data.synthetic import (
    DEFAULT_DOMAINS,
    MAX_WHITE_CELLS,
    SyntheticDomain,
    assign_splits,
    generate,
    is_generated,
    main,
    render_image,
    split_counts,
)

SIZE = 160
BACKGROUND = np.asarray(cells.BACKGROUND_COLOUR, dtype=np.float32)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "Annotations" / f"{split}.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    counts = generate(
        out, num_images=12, seed=3, image_size=SIZE, sparse_fraction=0.25, progress=False
    )
    return out, counts


# --- determinism --------------------------------------------------------------------------------


def test_render_is_deterministic_per_seed_and_index():
    image_a, record_a = render_image(5, seed=1, image_size=SIZE, domain=DEFAULT_DOMAINS[2])
    image_b, record_b = render_image(5, seed=1, image_size=SIZE, domain=DEFAULT_DOMAINS[2])
    assert image_a.dtype == np.uint8 and image_a.shape == (SIZE, SIZE, 3)
    assert np.array_equal(image_a, image_b)
    assert np.array_equal(record_a.boxes_xyxy, record_b.boxes_xyxy)
    assert np.array_equal(record_a.attributes, record_b.attributes)
    assert not np.array_equal(
        image_a, render_image(5, seed=2, image_size=SIZE, domain=DEFAULT_DOMAINS[2])[0]
    )
    assert not np.array_equal(
        image_a, render_image(6, seed=1, image_size=SIZE, domain=DEFAULT_DOMAINS[2])[0]
    )


def test_generate_is_byte_identical_for_the_same_arguments(tmp_path, dataset):
    out, _ = dataset
    again = tmp_path / "again"
    generate(again, num_images=12, seed=3, image_size=SIZE, sparse_fraction=0.25, progress=False)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    generate(other, num_images=12, seed=4, image_size=SIZE, sparse_fraction=0.25, progress=False)
    # The split shuffle depends on the seed too: compare images by file name.
    first = {Path(k).name: v for k, v in _files(out).items() if k.endswith((".png", ".jpg"))}
    second = {Path(k).name: v for k, v in _files(other).items() if k.endswith((".png", ".jpg"))}
    assert first.keys() == second.keys() and len(first) == 12
    assert all(first[k] != second[k] for k in first)


def test_workers_do_not_change_the_output(tmp_path, dataset):
    out, _ = dataset
    generate(
        tmp_path,
        num_images=12,
        seed=3,
        image_size=SIZE,
        sparse_fraction=0.25,
        progress=False,
        workers=2,
    )
    assert _files(tmp_path) == _files(out)


# --- layout and counts --------------------------------------------------------------------------


def test_split_counts_hand_computed():
    assert split_counts(10, (0.7, 0.15, 0.15)) == [7, 2, 1]
    assert split_counts(3, (0.7, 0.15, 0.15)) == [1, 1, 1]
    assert split_counts(2, (0.7, 0.15, 0.15)) == [1, 1, 0]
    assert split_counts(1, (0.7, 0.15, 0.15)) == [1, 0, 0]
    assert split_counts(20, (0.5, 0.5, 0.0)) == [10, 10, 0]
    splits = assign_splits(12, 4, (0.7, 0.15, 0.15), seed=0)
    for d in range(4):
        assert sorted(splits[d::4]) == ["test", "train", "val"]


def test_counts_and_files_per_split_and_domain(dataset):
    out, counts = dataset
    assert counts["images"] == {"train": 4, "val": 4, "test": 4}
    names = [d.name for d in DEFAULT_DOMAINS]
    assert counts["domains"] == {n: {"train": 1, "val": 1, "test": 1} for n in names}
    for domain in DEFAULT_DOMAINS:
        for split in ("train", "val", "test"):
            images = sorted((out / domain.name / "images" / split).iterdir())
            labels = sorted((out / domain.name / "labels" / split).iterdir())
            assert len(images) == len(labels) == 1
            assert images[0].suffix == domain.suffix and labels[0].stem == images[0].stem
            assert images[0].stem.startswith(f"{domain.name}_")
            with Image.open(images[0]) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    total_cells = 0
    for split in ("train", "val", "test"):
        coco = _coco(out, split)
        assert len(coco["images"]) == 4
        assert [c["name"] for c in coco["categories"]] == list(LLD_CLASSES)
        assert all((out / image["file_name"]).is_file() for image in coco["images"])
        assert len(coco["annotations"]) == counts["cells"][split]
        total_cells += len(coco["annotations"])
    assert total_cells >= 12  # at least one cell per image
    manifest = json.loads((out / "synthetic.json").read_text())
    assert manifest["counts"] == json.loads(json.dumps(counts))


def test_lld_rows_match_coco_and_missing_is_written_as_2(dataset):
    out, _ = dataset
    for split in ("train", "val", "test"):
        coco = _coco(out, split)
        for image in coco["images"]:
            label = (out / image["file_name"]).with_suffix(".txt")
            label = Path(str(label).replace("/images/", "/labels/"))
            rows = np.loadtxt(label, ndmin=2)
            annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert rows.shape == (len(annotations), 16)
            for row, annotation in zip(rows, annotations, strict=True):
                assert int(row[0]) + 1 == annotation["category_id"]
                x, y, w, h = annotation["bbox"]
                expected = [(x + w / 2) / SIZE, (y + h / 2) / SIZE, w / SIZE, h / SIZE]
                np.testing.assert_allclose(row[1:5], expected, atol=2e-6)
                np.testing.assert_allclose(row[5:9], image["annotated_regions"][0], atol=0.01)
                values = list(annotation["attributes"].values())
                written = [LLD_MISSING_ATTRIBUTE if v is None else v for v in values]
                assert row[9:].astype(int).tolist() == written
                assert values[0] is not None  # cell_size is never missing


def test_boxes_lie_inside_the_image_for_every_domain():
    for index, domain in enumerate(DEFAULT_DOMAINS * 3):
        _, record = render_image(index, seed=0, image_size=SIZE, domain=domain)
        boxes = record.boxes_xyxy
        assert 1 <= record.num_cells <= MAX_WHITE_CELLS
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= SIZE)
        assert np.all(boxes[:, 2:] > boxes[:, :2])
        assert record.attributes.shape == (record.num_cells, 7)
        np.testing.assert_array_equal(record.regions_xyxy, [[0, 0, SIZE, SIZE]])


def test_white_cells_do_not_overlap():
    for index in range(8):
        _, record = render_image(index, seed=7, image_size=320, domain=DEFAULT_DOMAINS[0])
        b = record.boxes_xyxy
        centres, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) / 2
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                # Boxes of placed cells may touch at corners but never share their centre regions.
                assert np.any(np.abs(centres[i] - centres[j]) > (half[i] + half[j]) * 0.5)


# --- sparse regions -----------------------------------------------------------------------------


def test_train_images_have_one_region_of_the_requested_area(dataset):
    out, _ = dataset
    coco = _coco(out, "train")
    for image in coco["images"]:
        assert len(image["annotated_regions"]) == 1
        x1, y1, x2, y2 = image["annotated_regions"][0]
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
        assert abs((x2 - x1) * (y2 - y1) / SIZE**2 - 0.25) < 0.02
        assert 0.5 - 0.02 <= (x2 - x1) / (y2 - y1) <= 2.0 + 0.05
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert annotations, "the region is placed around a cell"
        domain = next(d for d in DEFAULT_DOMAINS if d.name == image["domain"])
        _, full = render_image(image["id"], seed=3, image_size=SIZE, domain=domain)
        centres = (full.boxes_xyxy[:, :2] + full.boxes_xyxy[:, 2:]) / 2
        inside = (
            (centres[:, 0] >= x1)
            & (centres[:, 0] < x2)
            & (centres[:, 1] >= y1)
            & (centres[:, 1] < y2)
        )
        assert len(annotations) == int(inside.sum())  # exactly the cells whose centre is inside
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert x1 <= x + w / 2 < x2 and y1 <= y + h / 2 < y2


def test_val_test_and_unsparse_train_are_fully_annotated(dataset, tmp_path):
    out, _ = dataset
    for split in ("val", "test"):
        for image in _coco(out, split)["images"]:
            assert image["annotated_regions"] == [[0.0, 0.0, SIZE, SIZE]]
    generate(tmp_path, num_images=4, seed=3, image_size=SIZE, sparse_fraction=0.0, progress=False)
    coco = _coco(tmp_path, "train")
    for image in coco["images"]:
        assert image["annotated_regions"] == [[0.0, 0.0, SIZE, SIZE]]
        _, full = render_image(
            image["id"], seed=3, image_size=SIZE, domain=DEFAULT_DOMAINS[image["id"] % 4]
        )
        assert sum(a["image_id"] == image["id"] for a in coco["annotations"]) == full.num_cells


# --- attribute sampling -------------------------------------------------------------------------


def test_priors_are_never_deterministic_and_missing_rate():
    assert np.all((cells.BINARY_PRIORS >= 0.15) & (cells.BINARY_PRIORS <= 0.85))
    assert np.all(cells.SIZE_PRIORS >= 0.15)
    np.testing.assert_allclose(cells.SIZE_PRIORS.sum(axis=1), 1.0)
    rng = np.random.default_rng(0)
    labels = np.arange(4200) % len(LLD_CLASSES)
    values = cells.sample_attributes(rng, labels)
    hidden = cells.hide_attributes(rng, values, 0.05)
    assert not np.any(hidden[:, 0] == IGNORE_INDEX)
    assert abs(np.mean(hidden[:, 1:] == IGNORE_INDEX) - 0.05) < 0.01
    # Sampled frequencies follow the priors (Myeloblast nucleolus 0.8, Lymphocyte 0.15).
    assert abs(values[labels == 1, 3].mean() - 0.80) < 0.06
    assert abs(values[labels == 7, 3].mean() - 0.15) < 0.06
    assert abs(np.mean(values[labels == 7, 0] == 0) - 0.70) < 0.07


def test_every_class_has_its_own_cue_combination():
    assert len(set(cells.CLASS_CUES)) == len(LLD_CLASSES)


# --- the cues are in the pixels -----------------------------------------------------------------


def _draw_cells(scale: float, labels: np.ndarray, seed: int = 0):
    """Draw each cell alone on a plain background; yield (label, attributes, box, image)."""
    rng = np.random.default_rng(seed)
    attributes = cells.sample_attributes(rng, labels)
    for label, values in zip(labels, attributes, strict=True):
        radius = cells.sample_radius(rng, int(values[0]), scale)
        side = int(3.6 * radius) + 8
        canvas = np.empty((side, side, 3), dtype=np.float32)
        canvas[:] = BACKGROUND
        cell = cells.WhiteCell(int(label), values, radius, side / 2, side / 2)
        box = cells.draw_white_cell(canvas, cell, rng)
        yield int(label), values, box, np.clip(np.rint(canvas), 0, 255)


def _separation(feature: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Means for value 0 and 1 and the accuracy of the midpoint threshold (higher = 1)."""
    m0, m1 = feature[truth == 0].mean(), feature[truth == 1].mean()
    return m0, m1, float(np.mean((feature > (m0 + m1) / 2) == (truth == 1)))


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_attribute_cues_are_measurable_in_pixels(scale):
    labels = np.arange(224) % len(LLD_CLASSES)
    rows = []
    for label, _values, box, image in _draw_cells(scale, labels):
        changed = np.any(np.abs(image - BACKGROUND) > 2, axis=2)
        red, green, blue = image[..., 0], image[..., 1], image[..., 2]
        purple = changed & (red - green > 25) & (blue > red)  # chromatin colours
        cytoplasm = changed & ~purple
        nucleolus = np.linalg.norm(image - np.asarray(cells.NUCLEOLUS_COLOUR), axis=2) < 16
        area = changed.sum()
        rows.append(
            {
                "radius": np.sqrt(area / np.pi) / scale,
                "dark": np.sum(changed & (image.sum(axis=2) < 250)) / area,
                "nucleolus": np.sum(changed & nucleolus) / area,
                "nucleus_ratio": purple.sum() / area,
                "blue_minus_red": (blue - red)[cytoplasm].mean(),
                "white": np.sum(changed & (image.min(axis=2) > 240)) / area,
            }
        )
        if label != 0:  # the box is the drawn cell (smudge strands fade out beyond it)
            ys, xs = np.nonzero(changed)
            assert (
                np.abs(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - box).max() <= 2
            )
    values = np.array([v for _, v, _, _ in _draw_cells(scale, labels)])
    feature = {k: np.array([r[k] for r in rows]) for k in rows[0]}

    # cell_size: measured radius ordered and mostly inside its own range (outlines add a little).
    sizes = values[:, 0]
    means = [feature["radius"][sizes == s].mean() for s in range(3)]
    assert means[0] + 8 < means[1] and means[1] + 10 < means[2]
    predicted = np.digitize(feature["radius"], [31.0, 45.0])
    assert np.mean(predicted == sizes) > 0.85
    # Binary attributes: (column, feature, higher-for-1, minimum accuracy).
    checks = [
        (1, "dark", True, 0.8),  # coarse chromatin = dark clumps
        (3, "nucleolus", True, 0.75),  # prominent nucleoli = pale spots
        (4, "nucleus_ratio", False, 0.85),  # abundant cytoplasm = smaller nucleus share
        (5, "blue_minus_red", True, 0.9),  # moderate basophilia = blue cytoplasm
        (6, "white", True, 0.9),  # vacuoles = white holes
    ]
    for column, name, higher, accuracy in checks:
        f = feature[name] if higher else -feature[name]
        m0, m1, acc = _separation(f, values[:, column])
        assert m1 > m0 and acc >= accuracy, (name, m0, m1, acc)


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_irregular_nuclear_shape_has_a_rougher_outline(scale):
    # Round-nucleus classes whose granules are not purple, so the purple mask is the nucleus.
    labels = np.array([1, 2, 4, 6, 7, 9, 13])[np.arange(140) % 7]
    rough, truth = [], []
    for _, values, _, image in _draw_cells(scale, labels, seed=1):
        red, green, blue = image[..., 0], image[..., 1], image[..., 2]
        ys, xs = np.nonzero((red - green > 25) & (blue > red))
        cy, cx = ys.mean(), xs.mean()
        bins = ((np.arctan2(ys - cy, xs - cx) + np.pi) / (2 * np.pi) * 48).astype(int) % 48
        reach = np.zeros(48)
        np.maximum.at(reach, bins, np.hypot(ys - cy, xs - cx))  # outline radius per direction
        rough.append(reach.std() / reach.mean())
        truth.append(values[2])
    m0, m1, acc = _separation(np.array(rough), np.array(truth))
    assert m1 > 1.8 * m0 and acc >= 0.75, (m0, m1, acc)


@pytest.mark.parametrize("domain", [DEFAULT_DOMAINS[0], DEFAULT_DOMAINS[3]], ids=lambda d: d.name)
def test_cues_survive_red_cells_and_domain_effects(domain):
    """Basophilia and vacuoles measured in whole rendered fields of a clean and the blurriest domain."""
    size = 320
    blue_red, white = {0: [], 1: []}, {0: [], 1: []}
    round_classes = {
        k for k, cue in enumerate(cells.CLASS_CUES) if cue.outline == "round" and not cue.fringe
    }
    for index in range(40):
        image, record = render_image(index, seed=11, image_size=size, domain=domain)
        image = image.astype(np.float32)
        # "White" is relative to the field's own background (casts shift the absolute level).
        white_level = np.percentile(image.min(axis=2), 75) + 8
        for box, label, values in zip(
            record.boxes_xyxy, record.labels, record.attributes, strict=True
        ):
            if int(label) not in round_classes:
                continue
            cx, cy = (box[:2] + box[2:]) / 2
            radius = (box[2:] - box[:2]).mean() / 2
            yy, xx = np.mgrid[0:size, 0:size] + 0.5
            d = np.hypot(xx - cx, yy - cy) / radius
            ring = (d > 0.84) & (d < 0.94)  # outer cytoplasm, clear of the nucleus
            disc = d < 0.9
            if values[5] != IGNORE_INDEX:
                blue_red[int(values[5])].append((image[..., 2] - image[..., 0])[ring].mean())
            if values[6] != IGNORE_INDEX:
                white[int(values[6])].append(np.mean(image[disc].min(axis=1) > white_level))
    assert min(len(v) for v in blue_red.values()) >= 5 and min(len(v) for v in white.values()) >= 5
    assert np.mean(blue_red[1]) > np.mean(blue_red[0]) + 40
    assert np.mean(white[1]) > 0.005 and np.mean(white[1]) > 5 * np.mean(white[0])


# --- manifest and CLI ---------------------------------------------------------------------------


def test_is_generated_checks_the_arguments(dataset, tmp_path):
    out, _ = dataset
    kwargs = dict(num_images=12, seed=3, image_size=SIZE, sparse_fraction=0.25)
    assert is_generated(out, **kwargs)
    assert is_generated(out, **kwargs, progress=False, workers=2)  # options that change no file
    assert not is_generated(out, **{**kwargs, "seed": 4})
    assert not is_generated(out, **{**kwargs, "sparse_fraction": 0.2})
    assert not is_generated(out, **kwargs, domains=(SyntheticDomain("H_100x_C1"),))
    assert not is_generated(tmp_path, **kwargs)


def test_custom_domain_and_bad_arguments(tmp_path):
    domain = SyntheticDomain(
        "H_10x_C1", cell_scale=0.3, blur_sigma=1.5, noise_std=6.0, jpeg_quality=70
    )
    counts = generate(
        tmp_path,
        num_images=2,
        seed=0,
        image_size=SIZE,
        domains=[domain],
        split_fractions=(1.0, 0.0, 0.0),
        progress=False,
    )
    assert counts["images"] == {"train": 2, "val": 0, "test": 0}
    assert len(list((tmp_path / "H_10x_C1" / "images" / "train").glob("*.jpg"))) == 2
    with pytest.raises(ValueError, match="sparse_fraction"):
        generate(tmp_path, num_images=2, sparse_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="unique"):
        generate(tmp_path, num_images=2, domains=[domain, domain], progress=False)


def test_cli_main_in_process(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "--out",
        str(out),
        "--num-images",
        "4",
        "--seed",
        "2",
        "--image-size",
        str(SIZE),
        "--sparse-fraction",
        "0.3",
    ]
    assert main(args) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert is_generated(out, num_images=4, seed=2, image_size=SIZE, sparse_fraction=0.3)
    assert json.loads((out / "synthetic.json").read_text())["arguments"]["sparse_fraction"] == 0.3
