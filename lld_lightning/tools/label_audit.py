"""Labels a trained model confidently contradicts: the cells to look at again.

Real annotations have mistakes: a neutrophil boxed as a red cell, a red cell boxed as a white
cell, a cell nobody boxed. Each one costs a test set more than a model's error does, because it
counts against every model. This command runs a checkpoint over one split and lists, inside the
annotated regions only (a sparse image's unlabelled area is unknown, not background):

- ``class``: a labelled cell the model sees as another class (that class scores at least
  ``--min_score`` on a box overlapping it at IoU >= 0.5, the labelled class under ``--doubt``);
- ``unlabelled``: a confident detection (>= ``--min_score``) centred in an annotated region
  that overlaps no labelled cell (IoU < 0.3 with every one).

Each suspect names its image, label file and line (text label formats), so it can be checked and
mended; ``--out`` also writes ``label_audit.csv`` (every suspect) and ``label_audit.png`` (a
contact sheet of the most confident ones, each crop with the labelled box drawn). A suspect is a
question for a person, not a verdict: the model is wrong about some of them. Audit a split with a
model that was not trained on it::

    python -m lld_lightning.tools.label_audit --ckpt_path runs/txl/latest/checkpoints/best.ckpt \\
        --config configs/txl.yaml --split test --out audit/

Everything that is not one of this command's own flags goes to `lld` (``--config``, ``--data.*``)
and only builds the data (its pixel sizes included); the model comes from the checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import Tensor
from torchvision.ops import box_iou

from lld_lightning.boxes import box_centres, nms, points_in_boxes
from lld_lightning.constants import MATCH_IOU
from lld_lightning.data.errors import DataError, error_message
from lld_lightning.data.records import ImageRecord
from lld_lightning.predictor import Predictor, load_image

PROG = "python -m lld_lightning.tools.label_audit"
#: Kind of a labelled cell the model sees as another class.
CLASS = "class"
#: Kind of a confident detection that overlaps no labelled cell.
UNLABELLED = "unlabelled"
#: The model's score a disagreement needs by default.
MIN_SCORE = 0.5
#: The labelled class must score under this on the cell for a ``class`` suspect.
DOUBT = 0.2
#: A detection overlapping every labelled cell below this IoU is a cell nobody labelled.
UNLABELLED_IOU = 0.3
#: The CSV and the contact sheet ``--out`` receives.
AUDIT_CSV = "label_audit.csv"
AUDIT_PNG = "label_audit.png"
#: Tiles of the contact sheet: side in pixels, and how many at most.
TILE = 200
SHEET_TILES = 48
SHEET_COLUMNS = 6
#: Crop around a suspect box: the box grown by this fraction of its size on every side.
CROP_MARGIN = 0.5
LABEL_COLOUR, SEEN_COLOUR = (0, 90, 255), (230, 40, 40)
#: Grey of a crop beyond the image's edge.
OUTSIDE = (128, 128, 128)

__all__ = [
    "CLASS",
    "UNLABELLED",
    "Suspect",
    "audit",
    "audit_image",
    "contact_sheet",
    "main",
    "write_csv",
]


@dataclass(frozen=True)
class Suspect:
    """One label to look at again.

    Attributes:
        kind: `CLASS` or `UNLABELLED`.
        image: the image file.
        domain: its domain.
        label_file: its label file ("" when the format has none).
        line: 1-based line of the cell in ``label_file``; 0 for `UNLABELLED` and for formats
            without lines (COCO).
        box: ``(x1, y1, x2, y2)`` in the image's pixels: the labelled box, or the detection's.
        labelled: the class the label gives ("" for `UNLABELLED`).
        seen: the class the model gives.
        score: the model's score for ``seen``.
        labelled_score: the model's best score for ``labelled`` on the cell (0 for `UNLABELLED`).
    """

    kind: str
    image: str
    domain: str
    label_file: str
    line: int
    box: tuple[float, float, float, float]
    labelled: str
    seen: str
    score: float
    labelled_score: float

    def where(self, root: Path | None = None) -> str:
        """``file:line`` of the label, or the image and box; paths relative to ``root``."""

        def short(path: str) -> str:
            full = Path(path).resolve()
            return str(full.relative_to(root)) if root and full.is_relative_to(root) else path

        if self.line:
            return f"{short(self.label_file)}:{self.line}"
        return f"{short(self.image)} [{', '.join(f'{v:.0f}' for v in self.box)}]"


def audit_image(
    record: ImageRecord,
    detections: dict[str, Tensor],
    class_names: Sequence[str],
    min_score: float = MIN_SCORE,
    doubt: float = DOUBT,
) -> list[Suspect]:
    """The suspects of one image.

    Args:
        record: its labels (boxes, labels and regions in original pixels).
        detections: every detection of the image in original pixels (``boxes [N, 4]``,
            ``scores [N]``, ``labels [N]``), as `Predictor.detections` gives them.
        class_names: class names, index = class id.
        min_score: the model's score a disagreement needs.
        doubt: a ``class`` suspect's labelled class scores below this on the cell.
    """
    boxes = detections["boxes"].float().reshape(-1, 4)
    scores, labels = detections["scores"].float(), detections["labels"].long()
    cells = torch.from_numpy(record.boxes_xyxy).float().reshape(-1, 4)
    cell_labels = torch.from_numpy(record.labels).long()
    regions = torch.from_numpy(record.regions_xyxy).float().reshape(-1, 4)
    if not len(boxes):  # the model found nothing: nothing to contradict a label with
        return []
    iou = box_iou(cells, boxes)  # [M, N]
    common = {
        "image": str(record.path),
        "domain": record.domain,
        "label_file": str(record.label_path or ""),
    }
    # Per cell: the labelled class's best score on it, and the best other class reaching
    # min_score (-1 where none does).
    overlapping = iou >= MATCH_IOU  # [M, N]
    same = labels[None] == cell_labels[:, None]  # [M, N]
    labelled_scores = torch.where(overlapping & same, scores, 0.0).amax(1)
    other = overlapping & ~same & (scores >= min_score)
    best_other, best = torch.where(other, scores, -1.0).max(1)
    suspects = []
    for i in torch.nonzero((best_other >= 0) & (labelled_scores < doubt)).flatten().tolist():
        line = 0 if record.label_lines is None else int(record.label_lines[i])
        suspects.append(
            Suspect(
                kind=CLASS,
                line=line,
                box=tuple(round(float(v), 1) for v in cells[i]),
                labelled=class_names[int(cell_labels[i])],
                seen=class_names[int(labels[best[i]])],
                score=round(float(best_other[i]), 4),
                labelled_score=round(float(labelled_scores[i]), 4),
                **common,
            )
        )
    if len(regions):
        inside = points_in_boxes(box_centres(boxes), regions)
        alone = iou.amax(dim=0) < UNLABELLED_IOU if len(cells) else torch.ones_like(inside)
        found = torch.nonzero(inside & alone & (scores >= min_score)).flatten()
        # One suspect per cell: its best class (the detector keeps one box per class).
        found = found[nms(boxes[found], scores[found], MATCH_IOU)]
        for k in found.tolist():
            suspects.append(
                Suspect(
                    kind=UNLABELLED,
                    line=0,
                    box=tuple(round(float(v), 1) for v in boxes[k]),
                    labelled="",
                    seen=class_names[int(labels[k])],
                    score=round(float(scores[k]), 4),
                    labelled_score=0.0,
                    **common,
                )
            )
    return suspects


@dataclass
class AuditResult:
    """What `audit` found: the suspects (most confident first) and per-domain counts."""

    suspects: list[Suspect]
    images: Counter
    cells: Counter


def audit(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    classes: Sequence[str] | None = None,
    min_score: float = MIN_SCORE,
    doubt: float = DOUBT,
    console: Console | None = None,
) -> AuditResult:
    """`audit_image` over ``records`` (each at its own pixel size when the model has a working
    resolution), with Rich progress.

    Args:
        predictor: the model (`Predictor.from_checkpoint`; its ``min_score`` is not used).
        records: the labelled images; unannotated ones (no region) are passed over.
        classes: keep only suspects whose labelled or seen class is one of these; None = all.
        min_score: see `audit_image`.
        doubt: see `audit_image`.
        console: where progress is drawn.
    """
    names = predictor.class_names
    unknown = sorted(set(classes or ()) - set(names))
    if unknown:
        raise ValueError(f"classes {unknown} are not the model's {names}")
    annotated = [r for r in records if r.is_labelled]
    suspects: list[Suspect] = []
    images, cells = Counter(), Counter()
    # One predictor call per pixel size: it resamples a call's images to one working resolution.
    by_size: dict[float | None, list[ImageRecord]] = {}
    for record in annotated:
        size = record.pixel_size_um if predictor.working_pixel_size is not None else None
        by_size.setdefault(size, []).append(record)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("label audit", total=len(annotated))
        for size, group in by_size.items():
            for start in range(0, len(group), predictor.batch_size):
                chunk = group[start : start + predictor.batch_size]
                # an unreadable image is a DataError naming it
                found = predictor.detections([load_image(r.path) for r in chunk], size)
                for record, detections in zip(chunk, found, strict=True):
                    images[record.domain] += 1
                    cells[record.domain] += record.num_cells
                    suspects.extend(audit_image(record, detections, names, min_score, doubt))
                progress.advance(task, len(chunk))
    if classes is not None:
        keep = set(classes)
        suspects = [s for s in suspects if s.seen in keep or s.labelled in keep]
    # Wrong classes first (a label to mend), then missing labels; the most confident first.
    suspects.sort(key=lambda s: (s.kind != CLASS, -s.score, s.image, s.line))
    return AuditResult(suspects, images, cells)


def write_csv(suspects: Sequence[Suspect], path: Path) -> None:
    """Every suspect, one row each (box as ``x1 y1 x2 y2`` columns)."""
    fields = [f for f in Suspect.__dataclass_fields__ if f != "box"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*fields, "x1", "y1", "x2", "y2"])
        for suspect in suspects:
            row = asdict(suspect)
            writer.writerow([*(row[f] for f in fields), *suspect.box])


def _tile(suspect: Suspect, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """One suspect's crop, its box drawn (blue: labelled, red: seen by the model only), and a
    caption: where it is and what the label and the model say."""
    image = Image.open(suspect.image).convert("RGB")
    x1, y1, x2, y2 = suspect.box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * CROP_MARGIN)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = cx - side / 2, cy - side / 2
    left, top, side = round(left), round(top), max(round(side), 1)
    crop = Image.new("RGB", (side, side), OUTSIDE)  # what lies beyond the image's edge
    crop.paste(image, (-left, -top))
    scale = TILE / side
    crop = crop.resize((TILE, TILE))
    draw = ImageDraw.Draw(crop)
    colour = LABEL_COLOUR if suspect.kind == CLASS else SEEN_COLOUR
    draw.rectangle(
        [(x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale],
        outline=colour,
        width=2,
    )
    caption = Image.new("RGB", (TILE, 34), (255, 255, 255))
    text = ImageDraw.Draw(caption)
    place = f"{Path(suspect.image).stem[:14]}" + (f" line {suspect.line}" if suspect.line else "")
    verdict = (
        f"{suspect.labelled} -> {suspect.seen} {suspect.score:.2f}"
        if suspect.kind == CLASS
        else f"unlabelled {suspect.seen} {suspect.score:.2f}"
    )
    text.text((3, 1), place, fill=(0, 0, 0), font=font)
    text.text((3, 17), verdict, fill=colour, font=font)
    tile = Image.new("RGB", (TILE, TILE + 34), (255, 255, 255))
    tile.paste(crop, (0, 0))
    tile.paste(caption, (0, TILE))
    return tile


def contact_sheet(suspects: Sequence[Suspect], max_tiles: int = SHEET_TILES) -> Image.Image:
    """The first ``max_tiles`` suspects side by side, `SHEET_COLUMNS` to a row (a sheet that
    says so when there are none)."""
    shown = list(suspects)[:max_tiles]
    font = ImageFont.load_default(size=12)
    if not shown:
        sheet = Image.new("RGB", (TILE * 2, 40), (255, 255, 255))
        ImageDraw.Draw(sheet).text((8, 12), "no suspects", fill=(0, 0, 0), font=font)
        return sheet
    columns = min(SHEET_COLUMNS, max(len(shown), 1))
    rows = max(-(-len(shown) // columns), 1)
    gap = 6
    sheet = Image.new(
        "RGB", (columns * (TILE + gap) + gap, rows * (TILE + 34 + gap) + gap), (255, 255, 255)
    )
    for index, suspect in enumerate(shown):
        row, column = divmod(index, columns)
        sheet.paste(
            _tile(suspect, font), (gap + column * (TILE + gap), gap + row * (TILE + 34 + gap))
        )
    return sheet


def summary_table(result: AuditResult, split: str) -> Table:
    """Per domain: images, labelled cells, and suspects of each kind."""
    table = Table(title=f"Label audit, {split} split: suspects per domain")
    for column in ("domain", "images", "labelled cells", CLASS, UNLABELLED):
        table.add_column(column, justify="left" if column == "domain" else "right")
    kinds = Counter((s.domain, s.kind) for s in result.suspects)
    for domain in sorted(result.images):
        table.add_row(
            domain,
            str(result.images[domain]),
            str(result.cells[domain]),
            str(kinds[domain, CLASS]),
            str(kinds[domain, UNLABELLED]),
        )
    return table


def suspects_table(suspects: Sequence[Suspect], limit: int, root: Path | None = None) -> Table:
    """The first ``limit`` suspects, one row each (paths relative to ``root``)."""
    table = Table(
        title=f"{min(limit, len(suspects))} of {len(suspects)} suspects: wrong classes, then "
        "missing labels, the most confident first"
    )
    table.add_column("where", overflow="fold")  # a path a person copies: never cut
    for column in ("domain", "label", "model", "score", "label's score"):
        table.add_column(column, justify="right" if "score" in column else "left")
    for s in suspects[:limit]:
        table.add_row(
            s.where(root),
            s.domain,
            s.labelled or "(none)",
            s.seen,
            f"{s.score:.2f}",
            f"{s.labelled_score:.2f}" if s.kind == CLASS else "",
        )
    return table


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This command's flags, and the rest (for `lld`, to build the data)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog="Other arguments (--config, --data.*) build the data as for `lld`.",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="checkpoint of the model that audits (best/last: the latest run's)",
    )
    parser.add_argument(
        "--split", default="test", help="the split to audit (a model not trained on it)"
    )
    parser.add_argument(
        "--min_score", type=float, default=MIN_SCORE, help="the model's score a disagreement needs"
    )
    parser.add_argument(
        "--doubt",
        type=float,
        default=DOUBT,
        help="a class suspect's labelled class scores below this",
    )
    parser.add_argument("--classes", nargs="+", help="only suspects involving these classes")
    parser.add_argument("--show", type=int, default=20, help="suspects printed")
    parser.add_argument("--out", help="folder for label_audit.csv and label_audit.png")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs",
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> AuditResult:
    """Audit, print the tables, write the CSV and the contact sheet."""
    from lld_lightning.tools.robustness import ToolError, load_data, resolve_checkpoint

    args, lld_args = parse_args(argv)
    console = Console()
    try:
        if not 0 < args.doubt <= args.min_score <= 1:
            raise ToolError(
                f"need 0 < --doubt <= --min_score <= 1, got {args.doubt} and {args.min_score}"
            )
        data = load_data(lld_args)
        root = data.config.get("trainer", {}).get("default_root_dir") or "runs/default"
        checkpoint = resolve_checkpoint(args.ckpt_path, root)
        records = [r for r in data.datamodule.load_all_records() if r.split == args.split]
        if not records:
            raise ToolError(f"no images in split {args.split!r} under {data.datamodule.data_root}")
        predictor = Predictor.from_checkpoint(
            checkpoint, device=args.device, min_score=0.0, cell_iou=None
        )
        if list(predictor.class_names) != list(data.datamodule.class_names):
            raise ToolError(
                f"the checkpoint's classes {predictor.class_names} are not the data's "
                f"{list(data.datamodule.class_names)}"
            )
        result = audit(predictor, records, args.classes, args.min_score, args.doubt, console)
    except (ToolError, DataError, ValueError) as error:
        print(f"{PROG}: {error_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    console.print(summary_table(result, args.split))
    if result.suspects:
        root = Path(data.datamodule.data_root).resolve()
        console.print(suspects_table(result.suspects, args.show, root))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(result.suspects, out / AUDIT_CSV)
        contact_sheet(result.suspects).save(out / AUDIT_PNG)
        console.print(f"label audit: {out / AUDIT_CSV} and {out / AUDIT_PNG}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
