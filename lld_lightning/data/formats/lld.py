"""The LLD sparse YOLO format: one ``.txt`` per image, one row of 16 numbers per cell.

``cls xc yc w h  rx1 ry1 rx2 ry2  a1 .. a7``: class; box YOLO-normalised to the image; the
annotated region in pixels (``x1 y1 x2 y2``, or ``x1 x2 y1 y2`` with ``region_order="xxyy"``),
repeated on every row; the attributes in ``attribute_spec`` order. On a binary attribute the value
``LLD_MISSING_ATTRIBUTE`` (2) means "not available"; ``IGNORE_INDEX`` (-1) is read as missing on
any attribute (the writer uses it for a missing value of a 3-valued attribute). Rows may carry
different regions: the record keeps the unique ones (sorted). An empty file is an image with no
cell, fully annotated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lld_lightning.constants import IGNORE_INDEX, LLD_ATTRIBUTE_SPEC, LLD_MISSING_ATTRIBUTE
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats.options import FormatOptions, RegionOrder
from lld_lightning.data.formats.yolo import (
    BOX_TOLERANCE,
    LabelRows,
    centres_outside_regions,
    check_class_ids,
    read_label_rows,
    yolo_boxes_to_xyxy,
)
from lld_lightning.data.records import ImageRecord

#: Leading columns of an LLD row: class, 4 box numbers, 4 region numbers.
LLD_FIXED_COLUMNS: int = 9
#: Column order that turns ``x1 x2 y1 y2`` into ``x1 y1 x2 y2`` (and back: it is its own inverse).
_XXYY_TO_XYXY = [0, 2, 1, 3]


def _regions_per_row(
    path: Path, rows: LabelRows, width: int, height: int, region_order: RegionOrder
) -> np.ndarray:
    """Columns 5-8 -> float64 ``[N, 4]`` xyxy pixel regions, validated and clipped."""
    regions = rows.values[:, 5:LLD_FIXED_COLUMNS]
    if region_order == "xxyy":
        regions = regions[:, _XXYY_TO_XYXY]
    reversed_ = (regions[:, 2] <= regions[:, 0]) | (regions[:, 3] <= regions[:, 1])
    if reversed_.any():
        i = int(np.argmax(reversed_))
        x1, y1, x2, y2 = regions[i]
        raise DataError.at(
            path,
            f"annotated region is reversed or empty: x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} "
            f"(need x2 > x1 and y2 > y1; region_order is {region_order!r})",
            int(rows.lines[i]),
        )
    size = np.array([width, height, width, height], dtype=np.float64)
    slack = BOX_TOLERANCE * size
    outside = (regions[:, :2] < -slack[:2]).any(1) | (regions[:, 2:] > size[2:] + slack[2:]).any(1)
    if outside.any():
        i = int(np.argmax(outside))
        x1, y1, x2, y2 = regions[i]
        raise DataError.at(
            path,
            f"annotated region x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} is outside the "
            f"{width}x{height} image (region numbers are pixels)",
            int(rows.lines[i]),
        )
    return np.clip(regions, 0.0, size)


def _attributes(path: Path, rows: LabelRows, attribute_spec: Mapping[str, int]) -> np.ndarray:
    """Columns 9.. -> int64 ``[N, A]`` with missing values as ``IGNORE_INDEX``."""
    names = list(attribute_spec)
    values = rows.values[:, LLD_FIXED_COLUMNS:]
    fractional = values != np.round(values)
    if fractional.any():
        i, a = np.argwhere(fractional)[0]
        raise DataError.at(
            path, f"attribute {names[a]} = {values[i, a]:g} is not an integer", int(rows.lines[i])
        )
    values = values.astype(np.int64)
    num_values = np.asarray(list(attribute_spec.values()), dtype=np.int64)  # [A]
    binary = num_values == 2
    missing = (values == IGNORE_INDEX) | (binary & (values == LLD_MISSING_ATTRIBUTE))
    in_range = (values >= 0) & (values < num_values)
    bad = ~(missing | in_range)
    if bad.any():
        i, a = np.argwhere(bad)[0]
        note = f" ({LLD_MISSING_ATTRIBUTE} = missing)" if binary[a] else ""
        raise DataError.at(
            path,
            f"attribute {names[a]} = {values[i, a]} out of range [0, {num_values[a]}){note}",
            int(rows.lines[i]),
        )
    return np.where(missing, IGNORE_INDEX, values)


def _check_centres_in_regions(
    path: Path, rows: LabelRows, boxes: np.ndarray, regions: np.ndarray
) -> None:
    """Every cell must be centred inside one of the image's annotated regions (any row's, within
    `REGION_TOLERANCE_PIXELS`): the loss learns only inside the regions, so a cell centred
    outside all of them contradicts the file's own labels."""
    outside = centres_outside_regions(boxes, np.unique(regions, axis=0))  # [N]
    if outside.any():
        i = int(np.argmax(outside))
        x1, y1, x2, y2 = regions[i]
        raise DataError.at(
            path,
            f"box {[round(float(v), 2) for v in boxes[i]]} (xyxy pixels) is centred outside "
            f"every annotated region of the image, its own x1={x1:g} y1={y1:g} x2={x2:g} "
            f"y2={y2:g} included",
            int(rows.lines[i]),
        )


def parse_lld_label_file(
    label_path: Path,
    image_path: Path,
    width: int,
    height: int,
    options: FormatOptions,
    report: DataReport,
) -> ImageRecord:
    """Parse one LLD sparse label file.

    Args:
        label_path: the ``.txt`` file.
        image_path: its image.
        width: image width in pixels.
        height: image height in pixels.
        options: ``num_classes``, ``attribute_spec`` and ``region_order`` are used.
        report: receives the count of dropped duplicate lines (only when the file is valid).

    Returns:
        The record: boxes float32 ``[N, 4]`` xyxy pixels, labels int64 ``[N]``, attributes
        int64 ``[N, A]``, regions float32 ``[R, 4]`` (the unique row regions, sorted; the whole
        image ``[1, 4]`` when the file is empty).

    Raises:
        DataError: any malformed row, or a cell centred outside every annotated region; the
            message names the file and line.
    """
    num_columns = LLD_FIXED_COLUMNS + len(options.attribute_spec)
    rows = read_label_rows(label_path, num_columns)
    labels = check_class_ids(label_path, rows, options.num_classes)
    boxes = yolo_boxes_to_xyxy(label_path, rows, width, height)
    regions = _regions_per_row(label_path, rows, width, height, options.region_order)
    _check_centres_in_regions(label_path, rows, boxes, regions)
    attributes = _attributes(label_path, rows, options.attribute_spec)
    report.duplicates(label_path, rows.num_duplicates)
    record = ImageRecord(
        path=image_path,
        width=width,
        height=height,
        boxes_xyxy=boxes,
        labels=labels,
        attributes=attributes,
        label_path=label_path,
        label_lines=rows.lines,
    )
    if rows.num_rows:
        record.regions_xyxy = np.unique(regions, axis=0).astype(np.float32)
    else:
        record.regions_xyxy = record.whole_image_region()
    return record


def _format_pixels(value: float) -> str:
    """Pixels with at most 2 decimals and no trailing zeros (``640``, ``12.5``)."""
    return f"{value + 0.0:.2f}".rstrip("0").rstrip(".")  # + 0.0 turns -0.0 into 0.0


def _row_regions(record: ImageRecord, where: Path) -> np.ndarray:
    """int64 ``[N]``: the region each cell's row carries (most overlap; ties -> sorted order).

    Raises:
        DataError: a region that no row would carry.
    """
    regions = record.regions_xyxy.astype(np.float64)
    order = np.lexsort(regions.T[::-1])  # canonical: independent of the record's region order
    ordered = regions[order]
    boxes = record.boxes_xyxy.astype(np.float64)
    top_left = np.maximum(boxes[:, None, :2], ordered[None, :, :2])  # [N, R, 2]
    bottom_right = np.minimum(boxes[:, None, 2:], ordered[None, :, 2:])  # [N, R, 2]
    overlap = np.clip(bottom_right - top_left, 0.0, None).prod(-1)  # [N, R]
    assigned = order[np.argmax(overlap, axis=1)]
    unused = np.setdiff1d(np.arange(regions.shape[0]), assigned)
    if unused.size:
        region = " ".join(_format_pixels(v) for v in regions[unused[0]])
        raise DataError.at(
            where,
            f"annotated region [{region}] holds no cell: LLD text has no row to carry it; "
            "write COCO (write_coco) instead",
        )
    return assigned


def format_lld_rows(
    record: ImageRecord,
    region_order: RegionOrder = "xyxy",
    attribute_spec: Mapping[str, int] = LLD_ATTRIBUTE_SPEC,
) -> str:
    """The LLD label text of one record (``""`` for a fully annotated image without cells).

    Normalised numbers get 6 decimals, regions are pixels with up to 2 decimals, class and
    attributes are integers; a missing binary attribute is written as 2, a missing attribute
    with more values as -1.

    Args:
        record: boxes ``[N, 4]``, labels ``[N]``, attributes ``[N, A]``, regions ``[R, 4]``.
        region_order: ``"xyxy"`` or ``"xxyy"`` for the region columns.
        attribute_spec: attribute name -> number of values (``A`` entries).

    Raises:
        DataError: the record cannot be said in LLD text: no annotated region (unlabelled), a
            region holding no cell (other than a whole-image region of an image without cells),
            or attributes that do not match ``attribute_spec``.
    """
    where = record.label_path or record.path
    num_regions = record.regions_xyxy.shape[0]
    if num_regions == 0:
        raise DataError.at(
            where, "unlabelled image (no annotated region): LLD text cannot say it; use COCO"
        )
    if record.num_cells == 0:
        whole = num_regions == 1 and np.array_equal(
            record.regions_xyxy, record.whole_image_region()
        )
        if whole:
            return ""
        _row_regions(record, where)  # raises: some region holds no cell
    if record.attributes.shape[1] != len(attribute_spec):
        raise DataError.at(
            where,
            f"record has {record.attributes.shape[1]} attributes, attribute_spec "
            f"{len(attribute_spec)}",
        )
    size = np.array([record.width, record.height], dtype=np.float64)
    boxes = record.boxes_xyxy.astype(np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 / size  # [N, 2]
    extents = (boxes[:, 2:] - boxes[:, :2]) / size  # [N, 2]
    regions = record.regions_xyxy.astype(np.float64)[_row_regions(record, where)]  # [N, 4]
    if region_order == "xxyy":
        regions = regions[:, _XXYY_TO_XYXY]
    binary = np.asarray(list(attribute_spec.values())) == 2
    attributes = np.where(
        (record.attributes == IGNORE_INDEX) & binary, LLD_MISSING_ATTRIBUTE, record.attributes
    )
    lines = []
    for i in range(record.num_cells):
        numbers = [str(int(record.labels[i]))]
        numbers += [f"{v + 0.0:.6f}" for v in (*centres[i], *extents[i])]
        numbers += [_format_pixels(v) for v in regions[i]]
        numbers += [str(int(v)) for v in attributes[i]]
        lines.append(" ".join(numbers) + "\n")
    return "".join(lines)


def write_lld_label_file(
    record: ImageRecord,
    path: Path,
    region_order: RegionOrder = "xyxy",
    attribute_spec: Mapping[str, int] = LLD_ATTRIBUTE_SPEC,
) -> None:
    """Write `format_lld_rows` of ``record`` to ``path`` (parent folders are created).

    Raises:
        DataError: see `format_lld_rows`; nothing is written then.
    """
    text = format_lld_rows(record, region_order, attribute_spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
