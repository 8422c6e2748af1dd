"""Writes ``lld predict`` results: COCO-style JSON with attributes, a CSV row per cell, overlays,
the list of files it skipped, and the HTML report with the differential counts (`report`)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw, ImageFont

from lld_lightning import predictor
from lld_lightning.callbacks.report import ImageResult, write_report
from lld_lightning.data.errors import DataError
from lld_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from lld_lightning.predictor import cells_from_detections, select_cells

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
#: Widest side panel of an overlay, in characters of its font (longer lines are cut at the edge).
PANEL_MAX_CHARS: int = 40


def attribute_value_names(attribute_spec: dict[str, int], datamodule: Any) -> dict[str, list[str]]:
    """Readable value names per attribute: from the data's attribute columns, LLD's table, or indices."""
    columns = getattr(getattr(datamodule, "reading", None), "attribute_columns", None)
    return predictor.attribute_value_names(attribute_spec, columns)


class PredictionWriter(BasePredictionWriter):
    """Writes predictions under ``output_dir`` (default: ``<default_root_dir>/predictions``).

    Files: ``detections.json`` (the project's COCO-with-attributes schema, plus ``score`` and
    ``attribute_scores`` per annotation), ``detections.csv`` (one row per cell),
    ``overlays/<image path below predict_root>.png`` (boxes coloured by class, numbered, with a side
    panel as tall as the image: a colour legend and the cells that fit; see `overlay_names`),
    ``skipped.csv`` (each file of the folder that has no results: ``file``, ``reason``,
    ``message``), and ``report.html``, ``counts.csv``, ``summary.csv`` (`write_report`).

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
        results: list[ImageResult] = []
        for image_id, pred in enumerate(images):
            # The same cells as the Python API: score, one class per cell, no box left in padding.
            keep = select_cells(pred["boxes"], pred["scores"], self.min_score, self.cell_iou)
            cells = {
                k: v[keep]
                for k, v in pred.items()
                if hasattr(v, "shape") and v.shape[:1] == pred["scores"].shape
            }
            entry = {
                "id": image_id,
                "file_name": str(pred["path"]),
                "width": pred["width"],
                "height": pred["height"],
                "domain": pred["domain"],
            }
            pixel_size = pred.get("pixel_size_um", math.nan)
            if math.isfinite(pixel_size):  # the field write_coco writes and read_coco reads
                entry["pixel_size_um"] = round(float(pixel_size), 6)
            coco["images"].append(entry)
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
            # Candidates below the threshold, one per cell as above: counted, not written.
            candidates = select_cells(pred["boxes"], pred["scores"], 0.0, self.cell_iou)
            below = int((pred["scores"][candidates] < self.min_score).sum())
            results.append(
                ImageResult(
                    path=str(pred["path"]),
                    domain=str(pred["domain"]),
                    cells=cells_from_detections(
                        pred, class_names, value_names, self.min_score, self.cell_iou
                    ),
                    below_threshold=below,
                )
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
        drawn = {}
        for pred, cells in overlays:
            out = folder / "overlays" / names[str(pred["path"])]
            try:
                pixels = pred["width"] * pred["height"]
                drawn[str(pred["path"])] = draw_overlay(
                    pred["path"], cells, class_names, value_names, out, pixels
                )
            except (DataError, OSError) as error:
                skipped[str(pred["path"])] = (OVERLAY_NOT_DRAWN, str(error))
        write_skipped(skipped, folder / SKIPPED_FILE)
        for result in results:
            result.overlay = drawn.get(result.path)
        largest = max((p["width"] * p["height"] for p in images), default=0)
        write_report(
            results, class_names, folder, self.min_score, max(largest, DEFAULT_MAX_IMAGE_PIXELS)
        )
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


def overlay_sizes(width: int, height: int) -> tuple[int, int]:
    """Line width and font size for an image: they grow with its longer side, so that a
    4000x3000 photo stays as readable as a 640x480 one."""
    side = max(width, height)
    return max(2, round(side / 300)), max(12, round(side / 60))


def render_overlay(
    image: Image.Image, cells: dict[str, Any], class_names: list[str], title: str = ""
) -> Image.Image:
    """The image with numbered boxes coloured by class and a side panel exactly as tall as it.

    The panel holds the title, a colour legend of the classes present (with their counts) and one
    line per cell (number, class, score) for as many cells as fit, then ``+k more``; the report
    lists every cell with its attributes.

    Args:
        image: RGB.
        cells: ``boxes`` ``[N, 4]`` in the image's pixels, ``scores``, ``labels``, best first.
        class_names: one per class.
        title: the panel's first line (e.g. the file name).
    """
    width, height = image.size
    line_width, font_size = overlay_sizes(width, height)
    font = ImageFont.load_default(size=font_size)
    step = round(font_size * 1.3)
    num_cells = len(cells["scores"])
    labels = [int(v) for v in cells["labels"]]
    present = Counter(labels)
    lines: list[tuple[str, tuple[int, int, int] | None]] = [
        (f"{title}: {num_cells} cells" if title else f"{num_cells} cells", None)
    ]
    lines += [
        (f"{class_names[label]} ({present[label]})", PALETTE[label % len(PALETTE)])
        for label in sorted(present)
    ]
    legend_lines = len(lines)
    lines += [
        (
            f"#{j + 1} {class_names[labels[j]]}  {float(cells['scores'][j]):.2f}",
            PALETTE[labels[j] % len(PALETTE)],
        )
        for j in range(num_cells)
    ]
    fits = max(1, (height - step // 2) // step)
    if len(lines) > fits:
        # The panel never grows past the image: what does not fit is counted (the report has all).
        hidden = len(lines) - (fits - 1)
        what = "cells" if fits - 1 >= legend_lines else "lines"
        lines = lines[: fits - 1] + [(f"+{hidden} more {what} (see report.html)", None)]
    swatch = font_size
    text_width = max(font.getlength(text) for text, _ in lines)
    panel = int(min(text_width, font.getlength("n" * PANEL_MAX_CHARS))) + swatch + 20
    canvas = Image.new("RGB", (width + panel, height), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j in range(num_cells):
        colour = PALETTE[labels[j] % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in cells["boxes"][j])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        draw.text(
            (x1 + line_width + 1, y1 + line_width),
            str(j + 1),
            fill=colour,
            font=font,
            stroke_width=max(1, line_width // 2 + 1),
            stroke_fill="white",
        )
    y = step // 4
    for text, colour in lines:
        x = width + 8
        if colour is not None:
            draw.rectangle((x, y + 2, x + swatch - 2, y + swatch), fill=colour)
            x += swatch + 4
        draw.text((x, y), text, fill="black" if colour is None else colour, font=font)
        y += step
    return canvas


def draw_overlay(
    path: str | Path,
    cells: dict[str, Any],
    class_names: list[str],
    value_names: dict[str, list[str]],
    out: Path,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Path:
    """Draw `render_overlay` of an image to a PNG.

    Args:
        path: the image, read as the model read it (`read_image`: 16-bit scaled, alpha on white).
        cells: ``boxes`` ``[N, 4]`` in the image's pixels, ``scores``, ``labels``, ``attributes``.
        class_names: one per class.
        value_names: per attribute, its value names (the attributes are in the report).
        out: the PNG to write (its folder is created).
        max_image_pixels: decode limit (the image's own size, which prediction already accepted).

    Raises:
        DataError: the image can no longer be decoded.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(read_image(path, max_image_pixels).permute(1, 2, 0).numpy())
    render_overlay(image, cells, class_names, Path(path).name).save(out)
    return out
