"""Writes ``lld predict`` results: COCO-style JSON with attributes, a CSV row per cell, overlays,
and the list of files it skipped."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw, ImageFont

from lld_lightning import predictor
from lld_lightning.data.errors import DataError
from lld_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from lld_lightning.predictor import select_cells

#: The file listing what a prediction skipped: one row per file, with the reason and the message.
SKIPPED_FILE: str = "skipped.csv"
#: Reason of an image whose results were written but whose overlay could not be drawn.
OVERLAY_NOT_DRAWN: str = "overlay not drawn"

#: Distinct colours for up to 14 classes (cycled beyond).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (230, 25, 75),
    (60, 180, 75),
    (255, 140, 0),
    (0, 130, 200),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (170, 110, 40),
    (0, 128, 128),
    (128, 0, 0),
    (0, 0, 128),
    (255, 99, 71),
    (90, 60, 160),
)
PANEL_WIDTH = 460


def attribute_value_names(attribute_spec: dict[str, int], datamodule: Any) -> dict[str, list[str]]:
    """Readable value names per attribute: from the data's attribute columns, LLD's table, or indices."""
    columns = getattr(getattr(datamodule, "reading", None), "attribute_columns", None)
    return predictor.attribute_value_names(attribute_spec, columns)


class PredictionWriter(BasePredictionWriter):
    """Writes predictions under ``output_dir`` (default: ``<default_root_dir>/predictions``).

    Files: ``detections.json`` (the project's COCO-with-attributes schema, plus ``score`` and
    ``attribute_scores`` per annotation), ``detections.csv`` (one row per cell),
    ``overlays/<image path below predict_root>.png`` (boxes coloured by class, numbered, with a side
    panel listing each cell's class, score and attributes; see `overlay_names`) and ``skipped.csv``
    (each file of the folder that has no results: ``file``, ``reason``, ``message``).

    `LldModule.detect` already gives one class per cell (class-agnostic NMS at the model's
    ``nms_iou``); ``cell_iou`` is the output's own, stricter guarantee.

    Args:
        output_dir: where to write; null = ``<trainer.default_root_dir>/predictions``.
        overlays: draw one PNG per image.
        min_score: cells below this score are not written.
        cell_iou: of written cells overlapping above this IoU, whatever their class, only the best is written; null writes all.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        overlays: bool = True,
        min_score: float = 0.3,
        cell_iou: float | None = 0.5,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.overlays = overlays
        self.min_score = min_score
        self.cell_iou = cell_iou

    def _folder(self, trainer: L.Trainer) -> Path:
        folder = (
            Path(self.output_dir)
            if self.output_dir
            else Path(trainer.default_root_dir) / "predictions"
        )
        if trainer.world_size > 1:
            folder = folder / f"rank{trainer.global_rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = (
            predictions[0]
            if predictions
            and isinstance(predictions[0], list)
            and predictions[0]
            and isinstance(predictions[0][0], list)
            else predictions
        )
        images = [image for batch in batches for image in batch]
        folder = self._folder(trainer)
        report = getattr(trainer.datamodule, "skip_report", None)
        skipped = dict(report.files) if report is not None else {}
        class_names = list(pl_module.class_names)
        value_names = attribute_value_names(pl_module.attribute_spec, trainer.datamodule)
        attribute_names = list(pl_module.attribute_spec)
        coco: dict[str, Any] = {
            "images": [],
            "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
            "attribute_spec": value_names,
        }
        rows = []
        overlays: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for image_id, pred in enumerate(images):
            # The same cells as the Python API: score, one class per cell, no box left in padding.
            keep = select_cells(pred["boxes"], pred["scores"], self.min_score, self.cell_iou)
            cells = {
                k: v[keep]
                for k, v in pred.items()
                if hasattr(v, "shape") and v.shape[:1] == pred["scores"].shape
            }
            coco["images"].append(
                {
                    "id": image_id,
                    "file_name": str(pred["path"]),
                    "width": pred["width"],
                    "height": pred["height"],
                    "domain": pred["domain"],
                }
            )
            for j in range(len(cells["scores"])):
                x1, y1, x2, y2 = (round(float(v), 2) for v in cells["boxes"][j])
                label = int(cells["labels"][j])
                attrs = {n: int(cells["attributes"][j, a]) for a, n in enumerate(attribute_names)}
                probs = {
                    n: round(float(cells["attribute_scores"][j, a]), 4)
                    for a, n in enumerate(attribute_names)
                }
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                        "area": round((x2 - x1) * (y2 - y1), 2),
                        "iscrowd": 0,
                        "score": round(float(cells["scores"][j]), 4),
                        "attributes": attrs,
                        "attribute_scores": probs,
                    }
                )
                rows.append(
                    {
                        "image": str(pred["path"]),
                        "cell": j + 1,
                        "class": class_names[label],
                        "score": round(float(cells["scores"][j]), 4),
                        "x1": x1,
                        "y1": y1,
                        "x2": x2,
                        "y2": y2,
                        **{n: value_names[n][attrs[n]] for n in attribute_names},
                        **{f"{n}_prob": probs[n] for n in attribute_names},
                    }
                )
            if self.overlays:
                overlays.append((pred, cells))
        (folder / "detections.json").write_text(json.dumps(coco, indent=1))
        with open(folder / "detections.csv", "w", newline="") as handle:
            fields = [
                "image",
                "cell",
                "class",
                "score",
                "x1",
                "y1",
                "x2",
                "y2",
                *attribute_names,
                *(f"{n}_prob" for n in attribute_names),
            ]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        # Overlays last: the results above are written even if an image cannot be drawn.
        root = getattr(trainer.datamodule, "predict_root", None)
        names = overlay_names([pred["path"] for pred, _ in overlays], root)
        for pred, cells in overlays:
            out = folder / "overlays" / names[str(pred["path"])]
            try:
                pixels = pred["width"] * pred["height"]
                draw_overlay(pred["path"], cells, class_names, value_names, out, pixels)
            except (DataError, OSError) as error:
                skipped[str(pred["path"])] = (OVERLAY_NOT_DRAWN, str(error))
        write_skipped(skipped, folder / SKIPPED_FILE)
        if trainer.is_global_zero:
            note = f"; skipped {len(skipped)} files, listed in {SKIPPED_FILE}" if skipped else ""
            print(f"lld predict: {len(rows)} cells in {len(images)} images -> {folder}{note}")


def write_skipped(skipped: dict[str, tuple[str, str]], path: Path) -> None:
    """Write ``{file: (reason, message)}`` as a CSV (a header only when nothing was skipped)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason", "message"])
        writer.writerows(
            [file, reason, message] for file, (reason, message) in sorted(skipped.items())
        )


def overlay_names(paths: Sequence[str | Path], root: str | Path | None) -> dict[str, str]:
    """A distinct overlay file name per image: its path below ``root`` with the suffix ``.png``.

    Images in different folders keep their folders (``a/x.png``, ``b/x.png``); images that would
    still share a name, whatever the case (``x.jpg`` and ``x.png``), keep their own suffix too
    (``x.jpg.png``, ``x.png.png``).

    Args:
        paths: the image files.
        root: the folder they were found under (``data.predict_root``); None or a file = none.

    Returns:
        ``{str(path): relative output name}``.
    """
    base = Path(root).resolve() if root is not None and Path(root).is_dir() else None
    relative = {}
    for path in paths:
        resolved = Path(path).resolve()
        inside = base is not None and resolved.is_relative_to(base)
        relative[str(path)] = resolved.relative_to(base) if inside else Path(Path(path).name)
    # Lower case: two names that differ only in case are one file on some file systems.
    uses = Counter(rel.with_suffix(".png").as_posix().lower() for rel in relative.values())
    return {
        path: (
            rel.as_posix() + ".png"
            if uses[rel.with_suffix(".png").as_posix().lower()] > 1
            else rel.with_suffix(".png").as_posix()
        )
        for path, rel in relative.items()
    }


def draw_overlay(
    path: str | Path,
    cells: dict[str, Any],
    class_names: list[str],
    value_names: dict[str, list[str]],
    out: Path,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Path:
    """Draw numbered boxes coloured by class and a side panel with each cell's attributes.

    Args:
        path: the image, read as the model read it (`read_image`: 16-bit scaled, alpha on white).
        cells: ``boxes`` ``[N, 4]`` in the image's pixels, ``scores``, ``labels``, ``attributes``.
        class_names: one per class.
        value_names: per attribute, its value names.
        out: the PNG to write (its folder is created).
        max_image_pixels: decode limit (the image's own size, which prediction already accepted).

    Raises:
        DataError: the image can no longer be decoded.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(read_image(path, max_image_pixels).permute(1, 2, 0).numpy())
    width, height = image.size
    num_cells = len(cells["scores"])
    line_height = 16
    panel_lines = 1 + num_cells * (2 + (len(value_names) + 1) // 2)
    canvas = Image.new(
        "RGB", (width + PANEL_WIDTH, max(height, 12 + panel_lines * line_height)), "white"
    )
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    y = 6
    draw.text((width + 8, y), f"{Path(path).name}: {num_cells} cells", fill="black", font=font)
    y += line_height
    for j in range(num_cells):
        label = int(cells["labels"][j])
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in cells["boxes"][j])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=3)
        draw.text(
            (x1 + 3, y1 + 2),
            str(j + 1),
            fill=colour,
            font=font,
            stroke_width=2,
            stroke_fill="white",
        )
        draw.text(
            (width + 8, y),
            f"#{j + 1} {class_names[label]}  {float(cells['scores'][j]):.2f}",
            fill=colour,
            font=font,
        )
        y += line_height
        parts = [
            f"{name.replace('_', ' ')}: {value_names[name][int(cells['attributes'][j, a])]}"
            for a, name in enumerate(value_names)
        ]
        for k in range(0, len(parts), 2):
            draw.text((width + 20, y), "   ".join(parts[k : k + 2]), fill="black", font=font)
            y += line_height
        y += line_height // 2
    canvas.save(out)
    return out
