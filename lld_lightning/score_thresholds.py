"""Per-class precision and recall of a checkpoint's detections at several score thresholds.

The `PseudoLabeller` keeps a teacher detection when its score reaches ``threshold`` (or the
class's entry in ``class_thresholds``). This command measures what a threshold means for each
class: on a labelled split, how many detections at or above it are right (precision: one-to-one
matched to a cell of the same class at IoU >= 0.5, as `MATCH_IOU`) and how many cells they find
(recall). Only the annotated regions count, so a sparsely labelled split works too. Detections go
through the same path as the pseudo-labeller's: `detections`, then class-agnostic NMS.

It suggests, per class, the lowest listed threshold whose precision reaches ``--precision``.
Measure on a split the teacher was not trained on (docs/pseudo_labels.md says why), e.g. the
validation split of a fully annotated set made sparse with ``data.sparse_simulation``::

    python -m lld_lightning.score_thresholds --ckpt_path runs/x/checkpoints/best.ckpt \\
        --config configs/txl.yaml --data.image_size 256

``--split train`` measures on the training images, where the pseudo-labeller works. Their
labelled rectangles are what a real sparse set offers to calibrate a threshold on; under
``data.sparse_simulation`` the hidden full annotation also scores the detections outside the
rectangles (the pseudo-labels' real precision), so the two can be compared::

    python -m lld_lightning.score_thresholds --ckpt_path runs/x/checkpoints/last.ckpt --teacher \\
        --split train --config configs/txl.yaml --data.image_size 256 --data.sparse_simulation 0.2

Everything that is not one of this command's own flags goes to `lld` (``--config``, ``--data.*``)
and only builds the data; the model comes from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import Tensor

from lld_lightning.calibration import one_class_per_cell, region_counts, suggest, threshold_counts
from lld_lightning.checkpoint_split import SPLITS, load_checkpoint_split
from lld_lightning.data.sample import unbatch_targets
from lld_lightning.data.transforms import transform_boxes
from lld_lightning.module import LldModule
from lld_lightning.pseudo import box_centres, points_in_boxes

#: Score thresholds measured unless ``--thresholds`` says otherwise.
THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

__all__ = ["THRESHOLDS", "main", "measure", "outside_regions", "suggest", "threshold_counts"]


def outside_regions(
    preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], batch: dict[str, Any]
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """The detections and the hidden cells whose centres lie outside every annotated region.

    Args:
        preds: per image ``boxes``, ``scores``, ``labels`` in the batch's (letterboxed) frame.
        targets: per image ``regions [R, 4]`` (`unbatch_targets`).
        batch: carries the sparse simulation's full annotation, ``hidden_boxes [B, H, 4]`` in
            original pixels and ``hidden_labels [B, H]`` (-1 = padding), and ``transform``.

    Returns:
        Per image, the detections outside the regions and the hidden cells (``boxes`` in the
        batch's frame, ``labels``) outside them: what a pseudo-label there should find.
    """
    hidden = transform_boxes(batch["hidden_boxes"].float(), batch["transform"].float())
    kept_preds, cells = [], []
    for i, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        regions = target["regions"].float()
        real = batch["hidden_labels"][i] >= 0
        boxes, labels = hidden[i][real], batch["hidden_labels"][i][real]

        def outside(b: Tensor, regions: Tensor = regions) -> Tensor:
            every = regions[None].expand(b.shape[0], -1, -1)
            return ~points_in_boxes(box_centres(b), every, torch.ones(every.shape[:2], dtype=torch.bool,
                                                                       device=b.device))

        kept_preds.append({k: v[outside(pred["boxes"].float())] for k, v in pred.items()})
        away = outside(boxes)
        cells.append({"boxes": boxes[away], "labels": labels[away]})
    return kept_preds, cells


def measure(
    model: LldModule,
    loader: Any,
    prepare: Any,
    thresholds: list[float],
    nms_iou: float = 0.5,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Summed `threshold_counts` of ``model`` over ``loader`` (batches go through ``prepare``,
    e.g. the data module's `on_after_batch_transfer`, for the evaluation letterbox).

    Inside the annotated regions the labelled cells score the detections (``detections``,
    ``correct``, ``cells``). Batches that carry the sparse simulation's hidden full annotation
    also score the detections outside the regions against the hidden cells there
    (``outside_detections``, ``outside_correct``, ``outside_cells``)."""
    num_classes = int(model.hparams.num_classes)
    totals: dict[str, Tensor] = {}

    def add(counts: dict[str, Tensor], prefix: str = "") -> None:
        for key, value in counts.items():
            totals[prefix + key] = totals.get(prefix + key, torch.zeros_like(value)) + value

    model = model.to(device).eval()
    detector = model.detector
    with torch.no_grad():
        for batch in track(loader, description="score thresholds"):
            batch = prepare({k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
            images = batch["image"]
            preds = detector.detections(
                detector(images),
                score_threshold=min(thresholds),
                pre_nms_topk=int(model.hparams.pre_nms_topk),
                nms_iou=nms_iou,
                max_detections=int(model.hparams.max_detections),
                image_size=tuple(images.shape[-2:]),
            )
            preds = one_class_per_cell(preds, nms_iou)  # as the pseudo-labeller keeps them
            targets = unbatch_targets(batch)
            add(region_counts(preds, targets, thresholds, num_classes))
            if "hidden_boxes" in batch:
                for pred, cells in zip(*outside_regions(preds, targets, batch), strict=True):
                    add(threshold_counts(pred, cells, thresholds, num_classes), "outside_")
    if not totals:
        raise ValueError("no images to measure")
    return totals


def load_teacher(model: LldModule, ckpt_path: str) -> None:
    """Put the `PseudoLabeller`'s EMA teacher from a fit checkpoint into ``model.detector``."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    states = [
        state["teacher"] for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith("PseudoLabeller") and "teacher" in state
    ]
    if not states:
        raise SystemExit(f"score_thresholds: {ckpt_path} holds no PseudoLabeller teacher")
    prefix = "module."
    model.detector.load_state_dict(
        {k[len(prefix):]: v for k, v in states[0].items() if k.startswith(prefix)}
    )


def counts_report(
    totals: dict[str, Tensor], thresholds: list[float], target: float, names: list[str], prefix: str = ""
) -> dict[str, Any]:
    """Counts, precision, recall and suggested thresholds from `measure`'s ``prefix`` totals."""
    detections, correct = totals[prefix + "detections"], totals[prefix + "correct"]
    cells = totals[prefix + "cells"]
    precision = correct / detections.clamp(min=1)
    return {
        "cells": cells.tolist(),
        "cells_total": int(cells.sum()),
        "detections": detections.tolist(),
        "correct": correct.tolist(),
        "precision": precision.tolist(),
        "recall": (correct / cells.clamp(min=1)).tolist(),
        "suggested": suggest(precision, detections, thresholds, target, names),
    }


def render(report: dict[str, Any], section: str | None = None) -> Table:
    """Rich table: one row per threshold, precision / recall (detections) per class; the labelled
    regions' numbers, or those of ``report[section]`` (``"outside"``)."""
    counts = report if section is None else report[section]
    where = (
        f"{counts['cells_total']} labelled cells" if section is None
        else f"outside the labelled regions, {counts['cells_total']} hidden cells"
    )
    table = Table(title=f"{report['model']}: precision / recall (detections) per class, "
                  f"{report['split']} split, {where}")
    table.add_column("score >=", justify="right")
    for name, cells in zip(report["classes"], counts["cells"], strict=True):
        table.add_column(f"{name} ({cells} cells)", justify="right")
    for t, threshold in enumerate(report["thresholds"]):
        table.add_row(
            f"{threshold:.2f}",
            *(
                f"{counts['precision'][t][c]:.3f} / {counts['recall'][t][c]:.3f} "
                f"({counts['detections'][t][c]})"
                for c in range(len(report["classes"]))
            ),
        )
    return table


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m lld_lightning.score_thresholds",
        description=__doc__.splitlines()[0],
        epilog="Other arguments (--config, --data.*) build the data as for `lld`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of the model to measure")
    parser.add_argument(
        "--split", choices=SPLITS, default="val",
        help="train: the training images (with data.sparse_simulation also outside the regions)",
    )
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument(
        "--precision", type=float, default=0.9,
        help="suggest per class the lowest threshold whose precision reaches this",
    )
    parser.add_argument(
        "--nms-iou", type=float, default=0.5, help="NMS IoU (the PseudoLabeller's nms_iou)"
    )
    parser.add_argument(
        "--teacher", action="store_true",
        help="measure the checkpoint's PseudoLabeller EMA teacher instead of the trained model",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the table and the suggested ``class_thresholds``; returns the report."""
    args, lld_args = parse_args(argv)
    thresholds = sorted(args.thresholds)
    loaded = load_checkpoint_split(args.ckpt_path, lld_args, args.split, "score_thresholds")
    model = loaded.model
    if args.teacher:
        load_teacher(model, args.ckpt_path)
    totals = measure(model, loaded.loader, loaded.prepare, thresholds, args.nms_iou, args.device)
    names = list(model.class_names)
    report = {
        "checkpoint": args.ckpt_path,
        "model": "PseudoLabeller teacher" if args.teacher else "trained model",
        "split": args.split,
        "thresholds": thresholds,
        "classes": names,
        "target_precision": args.precision,
        **counts_report(totals, thresholds, args.precision, names),
    }
    if "outside_cells" in totals:
        report["outside"] = counts_report(totals, thresholds, args.precision, names, "outside_")
    console = Console()
    console.print(render(report))
    if "outside" in report:
        console.print(render(report, "outside"))
    missing = [name for name in names if name not in report["suggested"]]
    console.print(
        f"PseudoLabeller class_thresholds at precision >= {args.precision}: "
        + json.dumps(report["suggested"])
        + (f" (no listed threshold reaches it for {', '.join(missing)})" if missing else "")
    )
    if "outside" in report:
        console.print(
            "The same from the hidden annotation outside the regions (simulation only): "
            + json.dumps(report["outside"]["suggested"])
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
