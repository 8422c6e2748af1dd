"""One image's annotations as parsed from any label format, before any pixel is read.

Every parser (`formats/`) produces `ImageRecord` objects; the dataset turns them into samples
(see `sample.py`) and every writer consumes them, so LLD -> COCO -> LLD round-trips through this
one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lld_lightning.constants import DEFAULT_DOMAIN


def empty_boxes() -> np.ndarray:
    """An empty ``[0, 4]`` float32 box array."""
    return np.zeros((0, 4), dtype=np.float32)


@dataclass
class ImageRecord:
    """Annotations of one image.

    Attributes:
        path: image file.
        width: image width in pixels.
        height: image height in pixels.
        boxes_xyxy: float32 ``[N, 4]`` cell boxes, pixels, ``x1 < x2``, ``y1 < y2``.
        labels: int64 ``[N]`` class ids.
        attributes: int64 ``[N, A]`` attribute values, ``IGNORE_INDEX`` (-1) where missing.
        regions_xyxy: float32 ``[R, 4]`` annotated regions in pixels; the whole image when the
            image is fully annotated. Empty ``[0, 4]`` means nothing is annotated (an unlabelled
            image, e.g. for prediction or pseudo-labelling only).
        domain: acquisition domain name (microscope/magnification/camera).
        image_id: integer id, unique within a dataset.
        split: ``train``/``val``/``test`` or another split name, ``""`` when unknown.
        label_path: the label file it came from, if any (for error messages).
        pixel_size_um: micrometres per pixel (the image's physical scale), None = unknown.
        label_lines: int64 ``[N]`` 1-based line of each cell in ``label_path`` (the text label
            formats), so a report can point at it; None where the format has no lines (COCO).
    """

    path: Path
    width: int
    height: int
    boxes_xyxy: np.ndarray = field(default_factory=empty_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    attributes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    regions_xyxy: np.ndarray = field(default_factory=empty_boxes)
    domain: str = DEFAULT_DOMAIN
    image_id: int = 0
    split: str = ""
    label_path: Path | None = None
    pixel_size_um: float | None = None
    label_lines: np.ndarray | None = None

    @property
    def num_cells(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_labelled(self) -> bool:
        """Whether any part of the image is annotated."""
        return self.regions_xyxy.shape[0] > 0

    def whole_image_region(self) -> np.ndarray:
        """``[1, 4]`` region covering the whole image."""
        return np.array([[0.0, 0.0, float(self.width), float(self.height)]], dtype=np.float32)
