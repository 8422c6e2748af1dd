"""`load_records`: every image of a dataset folder as `ImageRecord`s, whatever the label format.

YOLO-style layouts (``lld``, ``yolo``): images at ``root/**/images/<split>/<name>.<ext>``, labels at
the same path with the ``images`` component replaced by ``labels`` and the extension by ``.txt``.
COCO: ``root/Annotations/<split>.json``. See docs/formats.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.table import Table

from lld_lightning.data.domains import (
    Manifest,
    discover_domain,
    load_manifest,
    manifest_pixel_size,
)
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats.coco import read_coco
from lld_lightning.data.formats.lld import parse_lld_label_file
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.formats.yolo import AttributeRow, parse_yolo_label_file, read_attribute_csv
from lld_lightning.data.images import IMAGE_EXTENSIONS, needs_conversion, probe_image, read_image
from lld_lightning.data.records import ImageRecord

Format = Literal["lld", "coco", "yolo"]

#: Folder names of the YOLO convention.
IMAGES_DIR, LABELS_DIR = "images", "labels"
#: YOLO tools keep the class-name list beside the labels (TXL-PBC has one per split folder); it
#: is not an image's label file.
CLASS_NAMES_FILE = "classes.txt"


@dataclass(frozen=True)
class LayoutEntry:
    """One image of a YOLO-style layout: its label file (which may not exist) and split."""

    image_path: Path
    label_path: Path
    split: str


def find_layout_entries(root: Path) -> list[LayoutEntry]:
    """Images under an ``images`` folder below ``root``, sorted by path, with label paths.

    The deepest ``images`` component counts; split = the component right after it (``""`` when
    the image sits directly in ``images``).
    """
    entries = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        folders = path.relative_to(root).parts[:-1]
        if IMAGES_DIR not in folders:
            continue
        k = len(folders) - 1 - folders[::-1].index(IMAGES_DIR)
        below = folders[k + 1 :]
        label = root.joinpath(*folders[:k], LABELS_DIR, *below, path.stem + ".txt")
        entries.append(LayoutEntry(path, label, below[0] if below else ""))
    return entries


def _count_orphan_labels(root: Path, entries: list[LayoutEntry], report: DataReport) -> None:
    """Count label files that belong to no image (``classes.txt`` is not a label file)."""
    used = {entry.label_path for entry in entries}
    for path in sorted(root.rglob("*.txt")):
        folders = path.relative_to(root).parts[:-1]
        if LABELS_DIR in folders and path not in used and path.name != CLASS_NAMES_FILE:
            report.count("label without image", f"{path}: no image for this label file")


def _probe(path: Path, options: FormatOptions) -> tuple[int, int, str]:
    """Width, height, mode; ``check_images: full`` decodes the pixels too.

    YOLO layouts always need the header (normalised boxes -> pixels), so ``none`` reads it too.
    """
    width, height, mode = probe_image(path, options.max_image_pixels)
    if options.check_images == "full":
        read_image(path, options.max_image_pixels)
    return width, height, mode


def _load_entry(
    entry: LayoutEntry,
    format: Format,
    width: int,
    height: int,
    options: FormatOptions,
    report: DataReport,
    attribute_row: AttributeRow | None,
) -> ImageRecord:
    """Parse one image's label file (or build an unlabelled record when it has none)."""
    if not entry.label_path.is_file():
        if options.missing_labels == "error":
            raise DataError.at(entry.image_path, f"no label file {entry.label_path}")
        record = ImageRecord(path=entry.image_path, width=width, height=height)
        record.attributes = record.attributes.reshape(0, options.num_attributes)
        return record
    if format == "lld":
        return parse_lld_label_file(
            entry.label_path, entry.image_path, width, height, options, report
        )
    return parse_yolo_label_file(
        entry.label_path, entry.image_path, width, height, options, report, attribute_row
    )


def _load_layout(
    root: Path,
    format: Format,
    options: FormatOptions,
    report: DataReport,
    manifest: Manifest | None,
) -> list[ImageRecord]:
    entries = find_layout_entries(root)
    if not entries:
        raise DataError.at(root, f"no images under an '{IMAGES_DIR}' folder")
    joined: dict[str, AttributeRow] = {}
    if format == "yolo" and options.attribute_csv is not None:
        joined = read_attribute_csv(options.resolve(root, options.attribute_csv), options)
    records, labels_seen = [], {}
    for entry in entries:
        attribute_row = joined.pop(entry.image_path.name, None)
        try:
            width, height, mode = _probe(entry.image_path, options)
        except DataError as err:
            report.error("invalid image", err)
            continue
        if attribute_row is not None and attribute_row.error is not None:
            report.error("invalid attribute row", attribute_row.error)
            continue
        try:
            if entry.label_path in labels_seen:
                raise DataError.at(
                    entry.label_path,
                    f"label file of two images: {labels_seen[entry.label_path]} "
                    f"and {entry.image_path}",
                )
            labels_seen[entry.label_path] = entry.image_path
            record = _load_entry(entry, format, width, height, options, report, attribute_row)
            row = manifest.lookup(entry.image_path.name, entry.split) if manifest else None
            record.pixel_size_um = manifest_pixel_size(manifest, row, options.pixel_size_column)
        except DataError as err:
            reason = "missing label" if not entry.label_path.is_file() else "invalid label"
            report.error(reason, err)
            continue
        record.split = entry.split or (
            row.values.get(manifest.split_column, "") if row and manifest.split_column else ""
        )
        record.domain = discover_domain(entry.image_path, root, row, options.domain_column)
        if manifest is not None and row is None:
            report.count("image not in manifest", f"{entry.image_path}: not in {manifest.path}")
        if needs_conversion(mode):
            report.converted[mode] += 1
        records.append(record)
    _count_orphan_labels(root, entries, report)
    for name, row in joined.items():
        report.count(
            "attribute row without image",
            f"{row.csv_path}:{row.csv_line}: no image named {name!r}",
        )
    return records


def _load_coco(
    root: Path, options: FormatOptions, report: DataReport, manifest: Manifest | None
) -> list[ImageRecord]:
    json_paths = sorted((root / "Annotations").glob("*.json"))
    if not json_paths:
        raise DataError.at(root, "no Annotations/*.json")
    records = []
    for json_path in json_paths:
        # file_name is relative to Images/<split>/ or, failing that, to the root.
        roots = [root / "Images" / json_path.stem, root]
        records += read_coco(json_path, roots, options, report, manifest)
    return records


def load_records(
    root: Path, format: Format, options: FormatOptions, report: DataReport
) -> list[ImageRecord]:
    """Every image under ``root`` as an `ImageRecord` with split, domain and a unique id.

    Args:
        root: dataset folder.
        format: ``"lld"`` (sparse YOLO, 16 numbers), ``"yolo"`` (plain, 5 numbers) or ``"coco"``.
        options: see `FormatOptions`.
        report: error policy (``raise``/``skip``) and counts of what was skipped or dropped.

    Returns:
        Records sorted by image path; ``image_id`` = position in that order.

    Raises:
        DataError: the first problem under ``on_error: raise``; always for an unusable root,
            manifest or attribute CSV.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError.at(root, "dataset folder not found")
    manifest = None
    if options.manifest is not None:
        manifest = load_manifest(
            options.resolve(root, options.manifest),
            options.manifest_file_column,
            options.manifest_split_column,
            options.domain_column,
        )
    if format == "coco":
        records = _load_coco(root, options, report, manifest)
    elif format in ("lld", "yolo"):
        records = _load_layout(root, format, options, report, manifest)
    else:
        raise ValueError(f"unknown label format {format!r}; expected 'lld', 'coco' or 'yolo'")
    records.sort(key=lambda record: record.path.as_posix())
    for image_id, record in enumerate(records):
        record.image_id = image_id
    return records


def summarize_records(records: list[ImageRecord], report: DataReport) -> Table:
    """A table of images and boxes per split and domain, with the report's lines as caption."""
    images, boxes, labelled = Counter(), Counter(), Counter()
    for record in records:
        key = (record.split, record.domain)
        images[key] += 1
        boxes[key] += record.num_cells
        labelled[key] += int(record.is_labelled)
    table = Table(title="Dataset")
    for column in ("split", "domain", "images", "labelled", "boxes"):
        table.add_column(column, justify="left" if column in ("split", "domain") else "right")
    for split, domain in sorted(images):
        key = (split, domain)
        table.add_row(split or "-", domain, str(images[key]), str(labelled[key]), str(boxes[key]))
    table.add_row(
        "total",
        "",
        str(sum(images.values())),
        str(sum(labelled.values())),
        str(sum(boxes.values())),
        end_section=True,
    )
    lines = report.summary_lines()
    if lines:
        table.caption = "\n".join(lines)
    return table
