"""`FormatOptions`: everything a label-format reader needs to know besides the folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC, LLD_CLASSES
from lld_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS

RegionOrder = Literal["xyxy", "xxyy"]
MissingLabels = Literal["error", "unlabelled"]
CheckImages = Literal["header", "full", "none"]


@dataclass
class FormatOptions:
    """How to read one dataset folder.

    Attributes:
        num_classes: number of cell classes; a class id outside ``[0, num_classes)`` is an error.
        class_names: one name per class (COCO ``categories``, tables).
        attribute_spec: attribute name -> number of values, in label-file column order.
        region_order: LLD region columns: ``"xyxy"`` (x1 y1 x2 y2) or ``"xxyy"`` (x1 x2 y1 y2).
        missing_labels: an image without a label file is an error (``"error"``) or an
            unlabelled image with no annotated region (``"unlabelled"``).
        max_image_pixels: larger images (``width * height``) are a `DataError`.
        manifest: optional CSV (absolute, or relative to the dataset root) with one row per
            image, giving its domain (and optionally its split).
        manifest_file_column: manifest column holding the image file name.
        manifest_split_column: manifest column holding the split (optional in the CSV).
        domain_column: manifest column holding the domain.
        pixel_size_column: manifest column (and COCO image field) holding an image's pixel size
            in micrometres; optional, an empty cell means unknown.
        attribute_csv: optional CSV (absolute or relative to the root) joining attributes to
            one cell per image (plain YOLO only, see ``docs/formats.md``).
        attribute_columns: attribute name (a CSV column and a key of ``attribute_spec``) ->
            the value strings, in index order.
        attribute_file_column: attribute-CSV column holding the image file name.
        attribute_line_column: attribute-CSV column holding the 0-based label-file line of
            the described cell.
        check_images: ``"header"`` opens each image header (size, mode, size limit);
            ``"full"`` also decodes every image (finds truncated files up front);
            ``"none"`` skips the checks (YOLO layouts still read the size from the header).
    """

    num_classes: int = len(LLD_CLASSES)
    class_names: tuple[str, ...] = LLD_CLASSES
    attribute_spec: dict[str, int] = field(default_factory=lambda: dict(LLD_ATTRIBUTE_SPEC))
    region_order: RegionOrder = "xyxy"
    missing_labels: MissingLabels = "error"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    manifest: Path | None = None
    manifest_file_column: str = "file"
    manifest_split_column: str = "split"
    domain_column: str = "source"
    pixel_size_column: str = "pixel_size_um"
    attribute_csv: Path | None = None
    attribute_columns: dict[str, list[str]] = field(default_factory=dict)
    attribute_file_column: str = "txl_file"
    attribute_line_column: str = "center_wbc_label_line"
    check_images: CheckImages = "header"

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes is "
                f"{self.num_classes}"
            )
        if self.region_order not in ("xyxy", "xxyy"):
            raise ValueError(f"region_order must be 'xyxy' or 'xxyy', got {self.region_order!r}")
        if self.missing_labels not in ("error", "unlabelled"):
            raise ValueError(
                f"missing_labels must be 'error' or 'unlabelled', got {self.missing_labels!r}"
            )
        if self.check_images not in ("header", "full", "none"):
            raise ValueError(
                f"check_images must be 'header', 'full' or 'none', got {self.check_images!r}"
            )
        for name, values in self.attribute_columns.items():
            if name not in self.attribute_spec:
                raise ValueError(f"attribute_columns names {name!r}, which attribute_spec lacks")
            if len(values) != self.attribute_spec[name]:
                raise ValueError(
                    f"attribute {name!r}: attribute_spec says {self.attribute_spec[name]} values, "
                    f"attribute_columns lists {len(values)}"
                )
        self.manifest = Path(self.manifest) if self.manifest is not None else None
        self.attribute_csv = Path(self.attribute_csv) if self.attribute_csv is not None else None

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_spec)

    def resolve(self, root: Path, path: Path) -> Path:
        """``path`` if absolute, else relative to the dataset ``root``."""
        return path if path.is_absolute() else root / path
