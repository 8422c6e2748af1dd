"""Domain discovery: which microscope/magnification/camera an image comes from.

In order: the first path component (below the dataset root, then the root itself and its parents)
that matches ``LLD_DOMAIN_PATTERN``; else the manifest's domain column; else ``DEFAULT_DOMAIN``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from lld_lightning.constants import DEFAULT_DOMAIN, LLD_DOMAIN_PATTERN
from lld_lightning.data.errors import DataError

_DOMAIN_RE = re.compile(LLD_DOMAIN_PATTERN)


def is_lld_domain(name: str) -> bool:
    """Whether ``name`` is an LLD domain folder name such as ``H_100x_C1``."""
    return _DOMAIN_RE.match(name) is not None


def lld_objective(domain: str) -> int | None:
    """The objective magnification of an LLD domain name (``H_40x_C1`` -> 40), else None."""
    match = _DOMAIN_RE.match(domain)
    return int(match.group(1)) if match else None


def domain_from_path(path: Path, root: Path) -> str | None:
    """The first LLD domain folder name on ``path``, or None.

    Components below ``root`` are searched first (top down), then ``root`` and its parents
    (innermost first), so that pointing ``root`` at ``.../H_100x_C1`` works too.
    """
    try:
        relative = path.relative_to(root).parts[:-1]
    except ValueError:
        relative = path.parts[:-1]
    for part in (*relative, *reversed(root.parts)):
        if is_lld_domain(part):
            return part
    return None


@dataclass
class ManifestRow:
    """One manifest row: where it is (for errors) and its columns."""

    line: int
    values: dict[str, str]


@dataclass
class Manifest:
    """A CSV with one row per image, looked up by file name (and split, when it has one).

    Attributes:
        path: the CSV file.
        file_column: column holding the image file name (a bare name or a relative path; only
            the name is matched).
        split_column: column holding the split, or None when the CSV has none.
        by_key: ``(split, name)`` -> row; split is ``""`` when the CSV has no split column.
        by_name: name -> rows (for images whose split is unknown).
    """

    path: Path
    file_column: str
    split_column: str | None
    by_key: dict[tuple[str, str], ManifestRow] = field(default_factory=dict)
    by_name: dict[str, list[ManifestRow]] = field(default_factory=dict)

    def lookup(self, name: str, split: str) -> ManifestRow | None:
        """The row for image file ``name`` in ``split``, or None when the manifest lacks it.

        Raises:
            DataError: the image's split is unknown and several rows share its name.
        """
        if self.split_column is not None and split:
            return self.by_key.get((split, name))
        rows = self.by_name.get(name, [])
        if len(rows) > 1:
            lines = ", ".join(str(row.line) for row in rows)
            raise DataError.at(self.path, f"{name!r} is ambiguous: listed on lines {lines}")
        return rows[0] if rows else None


def read_csv_rows(path: Path, required: list[str]) -> list[ManifestRow]:
    """Rows of a CSV file with their line numbers; ``required`` columns must exist.

    Raises:
        DataError: missing file, not UTF-8, or a required column is absent.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [name for name in required if name not in columns]
            if missing:
                raise DataError.at(path, f"missing column(s) {missing}; columns are {columns}", 1)
            rows = []
            for values in reader:
                rows.append(ManifestRow(reader.line_num, {k: (v or "") for k, v in values.items()}))
            return rows
    except UnicodeDecodeError as err:
        raise DataError.at(path, f"not UTF-8 text: {err}") from err
    except OSError as err:
        raise DataError.at(path, f"cannot read CSV: {err}") from err


def load_manifest(
    path: Path,
    file_column: str = "file",
    split_column: str = "split",
    domain_column: str = "source",
) -> Manifest:
    """Read a manifest CSV; the split column is optional, file and domain columns are required.

    Raises:
        DataError: unreadable CSV, a missing column, or the same ``(split, file)`` twice.
    """
    rows = read_csv_rows(path, [file_column, domain_column])
    has_split = bool(rows) and split_column in rows[0].values
    manifest = Manifest(path, file_column, split_column if has_split else None)
    for row in rows:
        name = Path(row.values[file_column]).name
        split = row.values[split_column] if has_split else ""
        if (split, name) in manifest.by_key:
            first = manifest.by_key[(split, name)].line
            raise DataError.at(
                path, f"{name!r} (split {split!r}) already on line {first}", row.line
            )
        manifest.by_key[(split, name)] = row
        manifest.by_name.setdefault(name, []).append(row)
    return manifest


def discover_domain(
    path: Path, root: Path, manifest_row: ManifestRow | None, domain_column: str
) -> str:
    """An image's domain: LLD folder name, else the manifest's domain column, else the default."""
    from_path = domain_from_path(path, root)
    if from_path is not None:
        return from_path
    if manifest_row is not None and manifest_row.values.get(domain_column):
        return manifest_row.values[domain_column]
    return DEFAULT_DOMAIN


def pixel_size_value(value: object, where: str) -> float | None:
    """A pixel size in micrometres from a manifest cell or a COCO field; empty = unknown.

    Args:
        value: the cell text or JSON value (``""`` and None mean unknown).
        where: the file (and line) for the error message.

    Raises:
        DataError: not a positive finite number.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not (number > 0 and number != float("inf")):
        raise DataError(f"{where}: pixel size must be a positive number of micrometres, got {value!r}")
    return number


def manifest_pixel_size(manifest: Manifest | None, row: ManifestRow | None, column: str) -> float | None:
    """The pixel size the manifest gives an image (its ``column``), None when it gives none."""
    if manifest is None or row is None or column not in row.values:
        return None
    return pixel_size_value(row.values[column], f"{manifest.path}:{row.line}")
