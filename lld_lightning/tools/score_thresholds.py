"""Per-class precision and recall of a checkpoint's detections at several score thresholds.

The `PseudoLabeller` keeps a teacher detection when its score reaches ``threshold`` (or the
class's entry in ``class_thresholds``). This command measures what a threshold means for each
class: on a labelled split, how many detections at or above it are right (precision: one-to-one
matched to a cell of the same class at IoU >= 0.5, as `MATCH_IOU`) and how many cells they find
(recall). Only the annotated regions count, so a sparsely labelled split works too. Detections go
through the same path as the pseudo-labeller's: the detector's detections, then class-agnostic
NMS.

It suggests, per class, the lowest listed threshold whose precision reaches ``--precision``.
Measure on a split the teacher was not trained on (a teacher is over-confident on its own training images), e.g. the
validation split of a fully annotated set made sparse with ``data.sparse_simulation``::

    python -m lld_lightning.tools.score_thresholds --ckpt_path runs/x/latest/checkpoints/best.ckpt \\
        --config configs/txl.yaml --data.image_size 256

``--split train`` measures on the training images, where the pseudo-labeller works. Their
labelled rectangles are what a real sparse set offers to choose a threshold on; under
``data.sparse_simulation`` the hidden full annotation (``data.keep_hidden``, switched on here)
also scores the detections outside the rectangles (the pseudo-labels' real precision), so the two
can be compared::

    python -m lld_lightning.tools.score_thresholds --ckpt_path runs/x/latest/checkpoints/last.ckpt --teacher \\
        --split train --config configs/txl.yaml --data.image_size 256 --data.sparse_simulation 0.2

Everything that is not one of this command's own flags goes to `lld` (``--config``, ``--data.*``)
and only builds the data; the model comes from the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import Tensor

from lld_lightning.boxes import box_centres, nms, points_in_boxes
from lld_lightning.callbacks.pseudo import ONE_CELL_IOU
from lld_lightning.constants import MATCH_IOU
from lld_lightning.data.sample import unbatch_targets
from lld_lightning.data.transforms import transform_boxes
from lld_lightning.metrics import UNMATCHED, keep_inside_regions, match_detections
from lld_lightning.module import LldModule
from lld_lightning.tools.checkpoint_split import SPLITS, load_checkpoint_split

#: Score thresholds measured unless ``--thresholds`` says otherwise.
THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

__all__ = [
    "THRESHOLDS",
    "load_teacher",
    "main",
    "measure",
    "one_class_per_cell",
    "outside_regions",
    "region_counts",
    "suggest",
    "threshold_counts",
]


# ------------------------------------------------------------------------------------ counting
def threshold_counts(
    pred: dict[str, Tensor], target: dict[str, Tensor], thresholds: list[float], num_classes: int
) -> dict[str, Tensor]:
    """One image's counts at every threshold and class.

    Args:
        pred: ``boxes [N, 4]``, ``scores [N]``, ``labels [N]`` detections.
        target: ``boxes [M, 4]``, ``labels [M]`` the labelled cells.
        thresholds: ``T`` score thresholds (a detection counts when its score is >= one).
        num_classes: ``C``.

    Returns:
        int64 ``detections [T, C]`` (kept detections per class), ``correct [T, C]`` (those matched
        one-to-one to a cell of their class at IoU >= `MATCH_IOU`) and ``cells [C]``.
    """
    # Greedy matching visits detections by descending score, so the matches among the detections
    # at or above a threshold are those of one matching over all of them: match once per class,
    # then count by threshold.
    levels = torch.tensor(thresholds, dtype=torch.float32)[:, None]  # [T, 1]
    detections = torch.zeros((len(thresholds), num_classes), dtype=torch.int64)
    correct = torch.zeros_like(detections)
    labels, gt_labels = pred["labels"].cpu(), target["labels"].cpu()
    boxes, scores, gt_boxes = (
        pred["boxes"].cpu().float(),
        pred["scores"].cpu().float(),
        target["boxes"].cpu(),
    )
    for c in range(num_classes):
        mine = labels == c
        matched = match_detections(boxes[mine], scores[mine], gt_boxes[gt_labels == c], MATCH_IOU)
        hit_scores = scores[mine][matched[matched != UNMATCHED]]
        detections[:, c] = (scores[mine][None] >= levels).sum(dim=1)
        correct[:, c] = (hit_scores[None] >= levels).sum(dim=1)
    return {
        "detections": detections,
        "correct": correct,
        "cells": torch.bincount(gt_labels, minlength=num_classes)[:num_classes],
    }


def one_class_per_cell(preds: list[dict[str, Tensor]], nms_iou: float) -> list[dict[str, Tensor]]:
    """Class-agnostic NMS inside each image, as the pseudo-labeller keeps its detections
    (`lld_lightning.callbacks.pseudo.one_class_per_cell`), on per-image detection dicts."""
    kept = [nms(p["boxes"], p["scores"], nms_iou) for p in preds]
    return [{key: value[k] for key, value in p.items()} for p, k in zip(preds, kept, strict=True)]


def region_counts(
    preds: list[dict[str, Tensor]],
    targets: list[dict[str, Tensor]],
    thresholds: list[float],
    num_classes: int,
) -> dict[str, Tensor]:
    """`threshold_counts` of a batch: detections centred inside their image's ``regions``
    against its labelled cells, matched in one pass over the batch.

    Each image's boxes are shifted along x by more than every box's extent (the coordinate trick
    of torchvision's ``batched_nms``), so no box overlaps another image's and the one greedy
    matching over the batch is exactly the per-image matchings together.

    Args:
        preds: per image ``boxes``, ``scores``, ``labels``.
        targets: per image ``boxes``, ``labels`` and ``regions [R, 4]`` (`unbatch_targets`).
        thresholds: ``T`` score thresholds.
        num_classes: ``C``.
    """
    preds = keep_inside_regions(preds, targets)
    every = torch.cat([item["boxes"].float() for item in [*preds, *targets]])
    span = float(every.max() - every.min()) + 1.0 if every.numel() else 1.0

    def batch_of(items: list[dict[str, Tensor]], keys: tuple[str, ...]) -> dict[str, Tensor]:
        joined = {key: torch.cat([item[key] for item in items]) for key in (*keys, "boxes")}
        sizes = torch.tensor([len(item["boxes"]) for item in items])
        shift = torch.repeat_interleave(torch.arange(len(items)) * span, sizes).to(
            joined["boxes"].device
        )
        along_x = torch.tensor([1.0, 0.0, 1.0, 0.0], device=shift.device)
        joined["boxes"] = joined["boxes"].float() + shift[:, None] * along_x
        return joined

    return threshold_counts(
        batch_of(preds, ("scores", "labels")),
        batch_of(targets, ("labels",)),
        thresholds,
        num_classes,
    )


def suggest(
    precision: Tensor, detections: Tensor, thresholds: list[float], target: float, names: list[str]
) -> dict[str, float]:
    """Per class, the lowest threshold whose precision reaches ``target`` (classes without one
    are left out). ``precision``/``detections``: ``[T, C]``, thresholds ascending."""
    chosen = {}
    for c, name in enumerate(names):
        for t, threshold in enumerate(thresholds):
            if detections[t, c] > 0 and precision[t, c] >= target:
                chosen[name] = threshold
                break
    return chosen


def outside_regions(
    preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], batch: dict[str, Any]
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """The detections and the hidden cells whose centres lie outside every annotated region.

    Args:
        preds: per image ``boxes``, ``scores``, ``labels`` in the batch's (letterboxed) frame.
        targets: per image ``regions [R, 4]`` (`unbatch_targets`).
        batch: carries the sparse simulation's full annotation (``data.keep_hidden``),
            ``hidden_boxes [B, H, 4]`` in original pixels and ``hidden_labels [B, H]`` (-1 =
            padding), and ``transform``.

    Returns:
        Per image, the detections outside the regions and the hidden cells (``boxes`` in the
        batch's frame, ``labels``) outside them: what a pseudo-label there should find.
    """
    hidden = transform_boxes(batch["hidden_boxes"].float(), batch["transform"].float())  # [B, H, 4]
    kept_preds, cells = [], []
    for i, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        regions = target["regions"].float()
        real = batch["hidden_labels"][i] >= 0
        boxes, labels = hidden[i][real], batch["hidden_labels"][i][real]
        inside = points_in_boxes(box_centres(pred["boxes"].float()), regions)  # [N]
        kept_preds.append({k: v[~inside] for k, v in pred.items()})
        away = ~points_in_boxes(box_centres(boxes), regions)  # [H']
        cells.append({"boxes": boxes[away], "labels": labels[away]})
    return kept_preds, cells


# ----------------------------------------------------------------------------------- measuring
def measure(
    model: LldModule,
    loader: Any,
    prepare: Any,
    thresholds: list[float],
    nms_iou: float = ONE_CELL_IOU,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Summed `threshold_counts` of ``model`` over ``loader`` (batches go through ``prepare``,
    e.g. the data module's `on_after_batch_transfer`, for the evaluation letterbox).

    Inside the annotated regions the labelled cells score the detections (``detections``,
    ``correct``, ``cells``). Batches that carry the sparse simulation's hidden full annotation
    also score the detections outside the regions against the hidden cells there
    (``outside_detections``, ``outside_correct``, ``outside_cells``)."""
    num_classes = int(model.hparams.num_classes)
    # The pseudo-labeller's post-processing: the model's own, at its NMS IoU, then one class per
    # cell. `postprocess` keeps scores strictly above its threshold: just below the lowest, so
    # that a detection scoring exactly a threshold counts at it.
    settings = dataclasses.replace(
        model.settings, score_threshold=max(0.0, min(thresholds) - 1e-6), nms_iou=nms_iou
    )
    totals: dict[str, Tensor] = {}

    def add(counts: dict[str, Tensor], prefix: str = "") -> None:
        for key, value in counts.items():
            totals[prefix + key] = totals.get(prefix + key, torch.zeros_like(value)) + value

    model = model.to(device).eval()
    with torch.no_grad():
        for batch in track(loader, description="score thresholds"):
            batch = prepare(move_data_to_device(batch, device))
            images = batch["image"]
            preds = one_class_per_cell(
                model.detections(model(images), images, settings=settings), nms_iou
            )
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
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    states = [
        state["teacher"]
        for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith("PseudoLabeller") and "teacher" in state
    ]
    if not states:
        raise SystemExit(f"score_thresholds: {ckpt_path} holds no PseudoLabeller teacher")
    prefix = "module."  # `AveragedModel` keeps the averaged detector as its ``module``
    model.detector.load_state_dict(
        {k[len(prefix) :]: v for k, v in states[0].items() if k.startswith(prefix)}
    )


def counts_report(
    totals: dict[str, Tensor],
    thresholds: list[float],
    target: float,
    names: list[str],
    prefix: str = "",
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
        f"{counts['cells_total']} labelled cells"
        if section is None
        else f"outside the labelled regions, {counts['cells_total']} hidden cells"
    )
    table = Table(
        title=f"{report['model']}: precision / recall (detections) per class, "
        f"{report['split']} split, {where}"
    )
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
    """This command's flags, and the rest (for `lld`, to build the data)."""
    parser = argparse.ArgumentParser(
        prog="python -m lld_lightning.tools.score_thresholds",
        description=__doc__.splitlines()[0],
        epilog="Other arguments (--config, --data.*) build the data as for `lld`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of the model to measure")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="val",
        help="the split to measure; train: the training images (with data.sparse_simulation also "
        "outside the regions)",
    )
    parser.add_argument(
        "--thresholds",
        nargs="+",
        type=float,
        default=list(THRESHOLDS),
        help="score thresholds to count at (a detection counts at every threshold it reaches)",
    )
    parser.add_argument(
        "--precision",
        type=float,
        default=0.9,
        help="suggest per class the lowest threshold whose precision reaches this",
    )
    parser.add_argument(
        "--nms-iou",
        type=float,
        default=ONE_CELL_IOU,
        help="class-agnostic NMS IoU (the PseudoLabeller's ONE_CELL_IOU)",
    )
    parser.add_argument(
        "--teacher",
        action="store_true",
        help="measure the checkpoint's PseudoLabeller EMA teacher instead of the trained model",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs",
    )
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print the table and the suggested ``class_thresholds``; returns the report."""
    args, lld_args = parse_args(argv)
    thresholds = sorted(args.thresholds)
    if args.split == "train":  # the hidden annotation scores the detections outside the regions
        lld_args = ["--data.keep_hidden", "true", *lld_args]
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
