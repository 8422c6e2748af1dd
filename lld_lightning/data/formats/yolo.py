"""Plain YOLO labels (``cls xc yc w h``, normalised), the row reader every text format shares,
and the attribute join that adds one described cell's attributes from a CSV (TXL-PBC + WBCAtt).

A plain YOLO label file describes a fully annotated image: its region is the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lld_lightning.boxes import box_centres, points_in_boxes
from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.domains import read_csv_rows
from lld_lightning.data.errors import DataError, DataReport
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.records import ImageRecord

#: Normalised slack for boxes that poke out of the image through rounding; then clipped.
BOX_TOLERANCE: float = 1e-3
#: Least width and height of an annotated box in pixels (before clipping): no cell is smaller, and
#: a thinner box is a labelling slip (a click instead of a drag) that no box coding can learn.
MIN_BOX_PIXELS: float = 1.0
#: Slack around an annotated region for the centres of its cells: label files round regions to
#: 2 decimals and boxes to 6, which moves a centre on the border by a fraction of a pixel.
REGION_TOLERANCE_PIXELS: float = 1.0
#: Numbers per plain YOLO row.
YOLO_COLUMNS: int = 5
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class LabelRows:
    """The numeric rows of one label file after dropping exact duplicate lines.

    Attributes:
        values: float64 ``[N, C]``.
        lines: int64 ``[N]`` 1-based line number of each kept row.
        line_to_row: 1-based line -> kept row index (a duplicate maps to its first copy).
        num_duplicates: how many duplicate lines were dropped.
    """

    values: np.ndarray
    lines: np.ndarray
    line_to_row: dict[int, int] = field(default_factory=dict)
    num_duplicates: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.values.shape[0])


def _decode(path: Path) -> str:
    """File bytes -> text, or a DataError naming the line of the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError.at(path, f"cannot read label file: {err}") from err
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError.at(
            path, f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {column}", line
        ) from err


def _to_numbers(path: Path, tokens: list[str], line: int) -> list[float]:
    numbers = []
    for column, token in enumerate(tokens, start=1):
        try:
            numbers.append(float(token))
        except ValueError:
            raise DataError.at(path, f"column {column}: {token!r} is not a number", line) from None
    return numbers


def read_label_rows(path: Path, num_columns: int) -> LabelRows:
    """Read a whitespace-separated label file of ``num_columns`` finite numbers per row.

    Blank lines are ignored; exact duplicate lines (same tokens) are dropped and counted.

    Raises:
        DataError: not UTF-8, wrong column count, non-numeric, NaN or infinite value; the
            message names the file and line.
    """
    first_row: dict[tuple[str, ...], int] = {}
    line_to_row: dict[int, int] = {}
    rows: list[list[float]] = []
    lines: list[int] = []
    for line, text in enumerate(_decode(path).splitlines(), start=1):
        tokens = tuple(text.split())
        if not tokens:
            continue
        if tokens in first_row:
            line_to_row[line] = first_row[tokens]
            continue
        if len(tokens) != num_columns:
            raise DataError.at(path, f"expected {num_columns} numbers, got {len(tokens)}", line)
        first_row[tokens] = line_to_row[line] = len(rows)
        rows.append(_to_numbers(path, list(tokens), line))
        lines.append(line)
    values = np.asarray(rows, dtype=np.float64).reshape(-1, num_columns)
    finite = np.isfinite(values)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise DataError.at(
            path, f"column {column + 1}: {values[row, column]} is not finite", lines[row]
        )
    num_duplicates = len(line_to_row) - len(rows)
    return LabelRows(values, np.asarray(lines, dtype=np.int64), line_to_row, num_duplicates)


def check_class_ids(path: Path, rows: LabelRows, num_classes: int) -> np.ndarray:
    """Column 0 as int64 class ids ``[N]``.

    Raises:
        DataError: a non-integer id or one outside ``[0, num_classes)``.
    """
    classes = rows.values[:, 0]
    fractional = classes != np.round(classes)
    if fractional.any():
        i = int(np.argmax(fractional))
        raise DataError.at(path, f"class id {classes[i]:g} is not an integer", int(rows.lines[i]))
    out_of_range = (classes < 0) | (classes >= num_classes)
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise DataError.at(
            path, f"class id {classes[i]:g} out of range [0, {num_classes})", int(rows.lines[i])
        )
    return classes.astype(np.int64)


def centres_outside_regions(boxes_xyxy: np.ndarray, regions_xyxy: np.ndarray) -> np.ndarray:
    """Which cells are centred outside every region (grown by `REGION_TOLERANCE_PIXELS`).

    Args:
        boxes_xyxy: float ``[N, 4]`` pixels.
        regions_xyxy: float ``[R, 4]`` pixels (the image's annotated regions).

    Returns:
        bool ``[N]``.
    """
    slack = np.array([-1.0, -1.0, 1.0, 1.0]) * REGION_TOLERANCE_PIXELS
    regions = torch.from_numpy(np.asarray(regions_xyxy, dtype=np.float64).reshape(-1, 4) + slack)
    centres = box_centres(torch.from_numpy(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)))
    return ~points_in_boxes(centres, regions).numpy()  # [N]


def yolo_boxes_to_xyxy(path: Path, rows: LabelRows, width: int, height: int) -> np.ndarray:
    """Columns 1-4 (``xc yc w h`` normalised) -> float32 ``[N, 4]`` xyxy pixels.

    Boxes may stick out of the image by `BOX_TOLERANCE` (rounding) and are then clipped.

    Raises:
        DataError: a box under `MIN_BOX_PIXELS` wide or high (zero, negative or degenerate), or
            one outside the image.
    """
    xc, yc, w, h = (rows.values[:, k] for k in range(1, 5))
    flat = (w * width < MIN_BOX_PIXELS) | (h * height < MIN_BOX_PIXELS)
    if flat.any():
        i = int(np.argmax(flat))
        size = "zero or negative" if min(w[i], h[i]) <= 0 else "degenerate"
        raise DataError.at(
            path,
            f"box has {size} size: {w[i] * width:g}x{h[i] * height:g} pixels (w={w[i]:g}, "
            f"h={h[i]:g} normalised); each side must be at least {MIN_BOX_PIXELS:g} pixel",
            int(rows.lines[i]),
        )
    normalised = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)  # [N, 4]
    outside = (normalised[:, :2] < -BOX_TOLERANCE).any(1) | (
        normalised[:, 2:] > 1 + BOX_TOLERANCE
    ).any(1)
    clipped = np.clip(normalised, 0.0, 1.0)
    outside |= (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if outside.any():
        i = int(np.argmax(outside))
        x1, y1, x2, y2 = normalised[i]
        raise DataError.at(
            path,
            f"box outside the image: spans x [{x1:g}, {x2:g}], y [{y1:g}, {y2:g}] "
            "(normalised, allowed [0, 1])",
            int(rows.lines[i]),
        )
    scale = np.array([width, height, width, height], dtype=np.float64)
    return (clipped * scale).astype(np.float32)


@dataclass
class AttributeRow:
    """One attribute-CSV row: the image's described cell and its attribute values.

    Attributes:
        csv_path: the CSV (for errors).
        csv_line: its line in the CSV.
        label_line: 0-based line of the described cell in the label file; None = no cell.
        values: int64 ``[A]`` in ``attribute_spec`` order, ``IGNORE_INDEX`` where unknown.
        error: the problem found in this row, raised when its image is loaded.
    """

    csv_path: Path
    csv_line: int
    label_line: int | None
    values: np.ndarray
    error: DataError | None = None


def _attribute_values(
    csv_path: Path, line: int, values: dict[str, str], options: FormatOptions
) -> np.ndarray:
    """Map one CSV row's value strings to indices in ``attribute_spec`` order."""
    out = np.full((options.num_attributes,), IGNORE_INDEX, dtype=np.int64)
    for a, name in enumerate(options.attribute_spec):
        if name not in options.attribute_columns or not values[name]:
            continue
        allowed = options.attribute_columns[name]
        if values[name] not in allowed:
            raise DataError.at(
                csv_path,
                f"column {name!r}: unknown value {values[name]!r}; expected one of {allowed}",
                line,
            )
        out[a] = allowed.index(values[name])
    return out


def _label_line(csv_path: Path, line: int, text: str, column: str) -> int | None:
    if not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise DataError.at(
            csv_path, f"column {column!r}: {text!r} is not a line number", line
        ) from None
    if value < 0:
        raise DataError.at(csv_path, f"column {column!r}: negative line number {value}", line)
    return value


def read_attribute_csv(csv_path: Path, options: FormatOptions) -> dict[str, AttributeRow]:
    """Read the attribute CSV into image file name -> `AttributeRow`.

    Problems of a single row (unknown value string, bad line number, the image listed twice) are
    stored in that row's ``error`` so that ``on_error: skip`` can skip just that image.

    Raises:
        DataError: unreadable CSV or a missing column.
    """
    required = [options.attribute_file_column, options.attribute_line_column]
    rows = read_csv_rows(csv_path, required + list(options.attribute_columns))
    joined: dict[str, AttributeRow] = {}
    empty = np.full((options.num_attributes,), IGNORE_INDEX, dtype=np.int64)
    for row in rows:
        name = Path(row.values[options.attribute_file_column]).name
        try:
            if name in joined:
                raise DataError.at(
                    csv_path, f"{name!r} already listed on line {joined[name].csv_line}", row.line
                )
            label_line = _label_line(
                csv_path,
                row.line,
                row.values[options.attribute_line_column],
                options.attribute_line_column,
            )
            values = _attribute_values(csv_path, row.line, row.values, options)
            joined[name] = AttributeRow(csv_path, row.line, label_line, values)
        except DataError as err:
            joined[name] = AttributeRow(csv_path, row.line, None, empty, err)
    return joined


def _join(attributes: np.ndarray, rows: LabelRows, label_path: Path, joined: AttributeRow) -> None:
    """Write ``joined``'s values onto the row of its label line (in place)."""
    if joined.error is not None:
        raise joined.error
    if joined.label_line is None:
        return
    row = rows.line_to_row.get(joined.label_line + 1)  # CSV lines are 0-based, ours 1-based
    if row is None:
        raise DataError.at(
            joined.csv_path,
            f"0-based label line {joined.label_line} holds no row in {label_path}",
            joined.csv_line,
        )
    attributes[row] = joined.values


def parse_yolo_label_file(
    label_path: Path,
    image_path: Path,
    width: int,
    height: int,
    options: FormatOptions,
    report: DataReport,
    attribute_row: AttributeRow | None = None,
) -> ImageRecord:
    """Parse a plain YOLO label file (``cls xc yc w h`` per row) of a fully annotated image.

    Args:
        label_path: the ``.txt`` file.
        image_path: its image.
        width: image width in pixels.
        height: image height in pixels.
        options: ``num_classes`` and ``attribute_spec`` are used.
        report: receives the count of dropped duplicate lines (only when the file is valid).
        attribute_row: the attribute-CSV row of this image, if any.

    Returns:
        The record: boxes ``[N, 4]``, labels ``[N]``, attributes ``[N, A]`` (``IGNORE_INDEX``
        except the joined cell), regions = the whole image ``[1, 4]``.

    Raises:
        DataError: any malformed row (names file and line) or a bad attribute-CSV row.
    """
    rows = read_label_rows(label_path, YOLO_COLUMNS)
    labels = check_class_ids(label_path, rows, options.num_classes)
    boxes = yolo_boxes_to_xyxy(label_path, rows, width, height)
    attributes = np.full((rows.num_rows, options.num_attributes), IGNORE_INDEX, dtype=np.int64)
    if attribute_row is not None:
        _join(attributes, rows, label_path, attribute_row)
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
    record.regions_xyxy = record.whole_image_region()
    return record
