"""COCO JSON with per-cell attributes and per-image annotated regions (schema: docs/formats.md).

Category ids are class index + `CATEGORY_ID_OFFSET` (COCO tools reserve 0). Boxes are COCO
``[x, y, w, h]`` pixels; regions ``[x1, y1, x2, y2]`` pixels. Numbers are written with full
precision so that LLD -> COCO -> LLD round-trips exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.domains import (
    Manifest,
    discover_domain,
    manifest_pixel_size,
    pixel_size_value,
)
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.formats.yolo import (
    BOX_TOLERANCE,
    MIN_BOX_PIXELS,
    centres_outside_regions,
)
from lld_lightning.data.images import needs_conversion, probe_image, read_image
from lld_lightning.data.records import ImageRecord

#: COCO ``category_id`` = class index + this offset.
CATEGORY_ID_OFFSET: int = 1


def _image_entry(record: ImageRecord, images_root: Path, attribute_names: list[str]) -> dict:
    try:
        file_name = Path(record.path).relative_to(images_root).as_posix()
    except ValueError:
        raise DataError.at(record.path, f"image is not under images_root {images_root}") from None
    if record.attributes.shape[1] != len(attribute_names) and record.num_cells:
        raise DataError.at(
            record.path,
            f"record has {record.attributes.shape[1]} attributes, attribute_spec "
            f"{len(attribute_names)}",
        )
    entry = {
        "id": int(record.image_id),
        "file_name": file_name,
        "width": int(record.width),
        "height": int(record.height),
        "domain": record.domain,
        "annotated_regions": [[float(v) for v in region] for region in record.regions_xyxy],
    }
    if record.pixel_size_um is not None:
        entry["pixel_size_um"] = float(record.pixel_size_um)
    return entry


def _annotation_entries(
    record: ImageRecord, first_id: int, attribute_names: list[str]
) -> list[dict]:
    entries = []
    for i in range(record.num_cells):
        x1, y1, x2, y2 = (float(v) for v in record.boxes_xyxy[i])
        values = record.attributes[i]
        entries.append(
            {
                "id": first_id + i,
                "image_id": int(record.image_id),
                "category_id": int(record.labels[i]) + CATEGORY_ID_OFFSET,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "attributes": {
                    name: (None if int(v) == IGNORE_INDEX else int(v))
                    for name, v in zip(attribute_names, values, strict=True)
                },
            }
        )
    return entries


def write_coco(
    records: Sequence[ImageRecord],
    json_path: Path,
    images_root: Path,
    class_names: Sequence[str],
    attribute_spec: Mapping[str, Sequence[str]],
) -> None:
    """Write records as one COCO file (see docs/formats.md for the schema).

    Args:
        records: images with unique ``image_id``s, all under ``images_root``.
        json_path: output file (parent folders are created).
        images_root: ``file_name`` is written relative to it.
        class_names: one per class; category id = index + `CATEGORY_ID_OFFSET`.
        attribute_spec: attribute name -> value names, in attribute column order.

    Raises:
        DataError: duplicate image ids, an image outside ``images_root`` or wrong attributes.
    """
    images_root = Path(images_root)
    attribute_names = list(attribute_spec)
    seen: dict[int, Path] = {}
    images, annotations = [], []
    for record in records:
        if int(record.image_id) in seen:
            raise DataError.at(
                record.path, f"image_id {record.image_id} already used by {seen[record.image_id]}"
            )
        seen[int(record.image_id)] = record.path
        images.append(_image_entry(record, images_root, attribute_names))
        annotations += _annotation_entries(record, len(annotations) + 1, attribute_names)
    document = {
        "info": {"description": "lld-lightning COCO with attributes", "version": "1"},
        "attribute_spec": {name: list(values) for name, values in attribute_spec.items()},
        "categories": [
            {"id": k + CATEGORY_ID_OFFSET, "name": name} for k, name in enumerate(class_names)
        ],
        "images": images,
        "annotations": annotations,
    }
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any, count: int) -> list[float] | None:
    """``value`` as ``count`` finite numbers, or None."""
    if not isinstance(value, list) or len(value) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value] if all(math.isfinite(v) for v in value) else None


def _load_document(json_path: Path) -> dict:
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError.at(json_path, f"invalid JSON: {err.msg}", err.lineno) from err
    except UnicodeDecodeError as err:
        raise DataError.at(json_path, f"not UTF-8 text: {err}") from err
    except OSError as err:
        raise DataError.at(json_path, f"cannot read: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataError.at(json_path, "not a COCO file: no 'images' list")
    for key in ("annotations", "categories"):
        if not isinstance(document.get(key, []), list):
            raise DataError.at(json_path, f"'{key}' must be a list")
    return document


def _spec_counts(json_path: Path, spec: Any) -> dict[str, int]:
    """A file's ``attribute_spec`` as ``{name: number of values}``.

    Each entry is the list of value names this package writes, or a count (the form of the
    configured ``attribute_spec``); both say the same thing, so either is read.

    Raises:
        DataError: not a mapping, or an entry that is neither a list nor a positive integer.
    """
    if not isinstance(spec, dict):
        raise DataError.at(
            json_path, f"attribute_spec must map each name to its value names, got {spec!r}"
        )
    counts = {}
    for name, values in spec.items():
        if isinstance(values, list):
            counts[name] = len(values)
        elif _is_int(values) and values > 0:
            counts[name] = values
        else:
            raise DataError.at(
                json_path,
                f"attribute_spec[{name!r}] = {values!r}: expected a list of value names or a "
                "positive number of values",
            )
    return counts


def _check_header(json_path: Path, document: dict, options: FormatOptions) -> None:
    """The file's ``attribute_spec`` and ``categories`` must agree with ``options``."""
    spec = document.get("attribute_spec")
    if spec is not None:
        counts = _spec_counts(json_path, spec)
        if list(counts.items()) != list(options.attribute_spec.items()):
            raise DataError.at(
                json_path,
                f"attribute_spec {counts} does not match the configured {options.attribute_spec}",
            )
    for category in document.get("categories", []):
        category_id = category.get("id") if isinstance(category, dict) else None
        index = category_id - CATEGORY_ID_OFFSET if _is_int(category_id) else -1
        if not 0 <= index < options.num_classes:
            raise DataError.at(json_path, f"category id {category_id} out of range")
        if category.get("name") != options.class_names[index]:
            raise DataError.at(
                json_path,
                f"category id {category_id} is named {category.get('name')!r}, expected "
                f"{options.class_names[index]!r}",
            )


def _read_box(json_path: Path, annotation: dict, width: int, height: int) -> list[float]:
    where = f"annotation id {annotation.get('id')} (image id {annotation.get('image_id')})"
    bbox = _numbers(annotation.get("bbox"), 4)
    if bbox is None:
        raise DataError.at(
            json_path, f"{where}: bbox must be 4 finite numbers, got {annotation.get('bbox')}"
        )
    x, y, w, h = bbox
    if w < MIN_BOX_PIXELS or h < MIN_BOX_PIXELS:
        size = "zero or negative" if min(w, h) <= 0 else "degenerate"
        raise DataError.at(
            json_path,
            f"{where}: box has {size} size (w={w:g}, h={h:g} pixels); each side must be at "
            f"least {MIN_BOX_PIXELS:g} pixel",
        )
    x2, y2 = x + w, y + h
    if (
        x < -BOX_TOLERANCE * width
        or y < -BOX_TOLERANCE * height
        or x2 > width * (1 + BOX_TOLERANCE)
        or y2 > height * (1 + BOX_TOLERANCE)
        or x >= width
        or y >= height
        or x2 <= 0
        or y2 <= 0
    ):
        raise DataError.at(json_path, f"{where}: box {bbox} outside the {width}x{height} image")
    return [min(max(x, 0.0), width), min(max(y, 0.0), height), min(x2, width), min(y2, height)]


def _read_class(json_path: Path, annotation: dict, options: FormatOptions) -> int:
    category_id = annotation.get("category_id")
    index = category_id - CATEGORY_ID_OFFSET if _is_int(category_id) else -1
    if not 0 <= index < options.num_classes:
        raise DataError.at(
            json_path,
            f"annotation id {annotation.get('id')}: category_id {category_id!r} is not an "
            f"integer in [{CATEGORY_ID_OFFSET}, {options.num_classes + CATEGORY_ID_OFFSET})",
        )
    return index


def _read_attributes(json_path: Path, annotation: dict, options: FormatOptions) -> list[int]:
    where = f"annotation id {annotation.get('id')}"
    given = annotation.get("attributes", {})
    if not isinstance(given, dict):
        raise DataError.at(json_path, f"{where}: attributes must be an object")
    unknown = sorted(set(given) - set(options.attribute_spec))
    if unknown:
        raise DataError.at(json_path, f"{where}: unknown attribute(s) {unknown}")
    values = []
    for name, num_values in options.attribute_spec.items():
        value = given.get(name)
        if value is None:
            values.append(IGNORE_INDEX)
        elif _is_int(value) and 0 <= value < num_values:
            values.append(value)
        else:
            raise DataError.at(
                json_path,
                f"{where}: attribute {name} = {value!r} is not null or an integer in "
                f"[0, {num_values})",
            )
    return values


def _read_regions(json_path: Path, image: dict, width: int, height: int) -> np.ndarray:
    where = f"image id {image.get('id')}"
    if "annotated_regions" not in image:
        return np.array([[0.0, 0.0, width, height]], dtype=np.float32)
    given = image["annotated_regions"]
    if not isinstance(given, list):
        raise DataError.at(json_path, f"{where}: annotated_regions must be a list")
    regions = []
    for region in given:
        numbers = _numbers(region, 4)
        if numbers is None:
            raise DataError.at(json_path, f"{where}: region {region} must be 4 finite numbers")
        x1, y1, x2, y2 = numbers
        if x2 <= x1 or y2 <= y1:
            raise DataError.at(json_path, f"{where}: annotated region {region} is reversed")
        if (
            x1 < -BOX_TOLERANCE * width
            or y1 < -BOX_TOLERANCE * height
            or x2 > width * (1 + BOX_TOLERANCE)
            or y2 > height * (1 + BOX_TOLERANCE)
        ):
            raise DataError.at(
                json_path, f"{where}: annotated region {region} outside the {width}x{height} image"
            )
        regions.append([max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)])
    return np.asarray(regions, dtype=np.float32).reshape(-1, 4)


def _find_image(file_name: str, images_roots: Sequence[Path]) -> Path | None:
    for root in images_roots:
        candidate = root / file_name
        if candidate.is_file():
            return candidate
    return None


def _check_image_file(
    json_path: Path, image: dict, path: Path, options: FormatOptions
) -> str | None:
    """Compare the file's header with the json's size; return the file's mode (None: unchecked)."""
    if options.check_images == "none":
        return None
    width, height, mode = probe_image(path, options.max_image_pixels)
    if (width, height) != (image["width"], image["height"]):
        raise DataError.at(
            json_path,
            f"image id {image['id']}: json says {image['width']}x{image['height']}, "
            f"{path} is {width}x{height}",
        )
    if options.check_images == "full":
        read_image(path, options.max_image_pixels)
    return mode


def _image_record(
    json_path: Path,
    image: dict,
    annotations: list[dict],
    images_roots: Sequence[Path],
    options: FormatOptions,
) -> tuple[ImageRecord, int, str | None]:
    """One image entry and its annotations -> (record, duplicate annotations, file mode)."""
    where = f"image id {image.get('id')}"
    width, height, file_name = image.get("width"), image.get("height"), image.get("file_name")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        raise DataError.at(json_path, f"{where}: width/height must be positive integers")
    if not isinstance(file_name, str) or not file_name:
        raise DataError.at(json_path, f"{where}: file_name missing")
    path = _find_image(file_name, images_roots)
    if path is None:
        searched = ", ".join(str(root) for root in images_roots)
        raise DataError.at(
            json_path, f"{where}: image file {file_name!r} not found under {searched}"
        )
    if width * height > options.max_image_pixels:
        raise DataError.at(path, f"image too large: {width}x{height} > {options.max_image_pixels}")
    mode = _check_image_file(json_path, image, path, options)
    seen: set[tuple] = set()
    boxes, labels, attributes, annotation_ids = [], [], [], []
    for annotation in annotations:
        box = _read_box(json_path, annotation, width, height)
        label = _read_class(json_path, annotation, options)
        values = _read_attributes(json_path, annotation, options)
        key = (label, *box, *values)
        if key in seen:
            continue
        seen.add(key)
        boxes.append(box)
        labels.append(label)
        attributes.append(values)
        annotation_ids.append(annotation.get("id"))
    regions = _read_regions(json_path, image, width, height)
    if boxes and regions.shape[0] == 0:
        raise DataError.at(json_path, f"{where}: has annotations but annotated_regions is []")
    _check_centres_in_regions(json_path, where, annotation_ids, boxes, regions)
    record = ImageRecord(
        path=path,
        width=width,
        height=height,
        boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        attributes=np.asarray(attributes, dtype=np.int64).reshape(
                len(labels), options.num_attributes
            ),
        regions_xyxy=regions,
        image_id=int(image["id"]),
        label_path=json_path,
    )
    return record, len(annotations) - len(boxes), mode


def _check_centres_in_regions(
    json_path: Path,
    where: str,
    annotation_ids: list[Any],
    boxes: list[list[float]],
    regions: np.ndarray,
) -> None:
    """Every cell must be centred inside an annotated region of its image (within
    `REGION_TOLERANCE_PIXELS`): the loss learns only inside the regions, so a cell centred
    outside all of them contradicts its image's own labels."""
    if not boxes:
        return
    outside = centres_outside_regions(np.asarray(boxes), regions)  # [N]
    if not outside.any():
        return
    i = int(np.argmax(outside))
    raise DataError.at(
        json_path,
        f"annotation id {annotation_ids[i]} ({where}): box {[round(v, 2) for v in boxes[i]]} "
        f"(xyxy) is centred outside every annotated region of its image {regions.tolist()}",
    )


def _domain(
    image: dict, record: ImageRecord, root: Path, options: FormatOptions, manifest: Manifest | None
) -> str:
    """The json's ``domain`` field, else folder name / manifest / default."""
    domain = image.get("domain")
    if isinstance(domain, str) and domain:
        return domain
    row = manifest.lookup(record.path.name, record.split) if manifest is not None else None
    return discover_domain(record.path, root, row, options.domain_column)


def _pixel_size(
    json_path: Path,
    image: dict,
    record: ImageRecord,
    options: FormatOptions,
    manifest: Manifest | None,
) -> float | None:
    """The image's ``pixel_size_um`` field (micrometres per pixel), else the manifest's."""
    if image.get(options.pixel_size_column) is not None:
        where = f"{json_path}: image id {image.get('id')}"
        return pixel_size_value(image[options.pixel_size_column], where)
    row = manifest.lookup(record.path.name, record.split) if manifest is not None else None
    return manifest_pixel_size(manifest, row, options.pixel_size_column)


def read_coco(
    json_path: Path,
    images_root: Path | Sequence[Path],
    options: FormatOptions,
    report: DataReport,
    manifest: Manifest | None = None,
) -> list[ImageRecord]:
    """Read a COCO file with attributes into records (split = the json file's stem).

    Args:
        json_path: the COCO file.
        images_root: folder(s) ``file_name`` is relative to, tried in order.
        options: class/attribute spec, size limit, image checks, domain column.
        report: skip policy and counts (duplicate annotations are dropped and counted).
        manifest: optional domain manifest for images without a ``domain`` field.

    Returns:
        One record per valid image, in file order; ``image_id`` from the file.

    Raises:
        DataError: under ``on_error: raise``, the first problem (names the json file and the
            image or annotation id); under ``skip`` that image is skipped and counted (a file
            whose header is wrong counts all its images).
    """
    json_path = Path(json_path)
    roots = [Path(images_root)] if isinstance(images_root, (str, Path)) else list(images_root)
    try:
        document = _load_document(json_path)
    except DataError as err:
        report.error("invalid annotation file", err)  # how many images it held is unknown
        return []
    try:
        _check_header(json_path, document, options)
    except DataError as err:
        # Every image of the file is lost: count them all.
        report.error("invalid annotation file", err, count=len(document["images"]))
        return []
    images = document["images"]
    ids = [image.get("id") if isinstance(image, dict) else None for image in images]
    by_image: dict[Any, list[dict]] = {image_id: [] for image_id in ids}
    for annotation in document.get("annotations", []):
        annotation = annotation if isinstance(annotation, dict) else {}
        image_id = annotation.get("image_id")
        if image_id not in by_image:
            report.error(
                "invalid annotation",
                DataError.at(
                    json_path, f"annotation id {annotation.get('id')}: unknown image id {image_id}"
                ),
            )
            continue
        by_image[image_id].append(annotation)
    records, seen_ids = [], set()
    for image, image_id in zip(images, ids, strict=True):
        try:
            if not _is_int(image_id) or image_id in seen_ids:
                raise DataError.at(json_path, f"image id {image_id!r} missing or not unique")
            seen_ids.add(image_id)
            record, duplicates, mode = _image_record(
                json_path, image, by_image[image_id], roots, options
            )
            record.split = json_path.stem
            record.domain = _domain(image, record, roots[0], options, manifest)
            record.pixel_size_um = _pixel_size(json_path, image, record, options, manifest)
        except DataError as err:
            report.error("invalid annotation", err)
            continue
        report.duplicates(json_path, duplicates)
        if mode is not None and needs_conversion(mode):
            report.converted[mode] += 1
        records.append(record)
    return records
