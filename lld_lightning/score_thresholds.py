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
from torchvision.ops import batched_nms

from lld_lightning.data.sample import unbatch_targets
from lld_lightning.metrics.matching import UNMATCHED, match_detections
from lld_lightning.module import LldModule, keep_inside_regions
from lld_lightning.pseudo import MATCH_IOU

#: Score thresholds measured unless ``--thresholds`` says otherwise.
THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


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
    boxes, scores, gt_boxes = pred["boxes"].cpu().float(), pred["scores"].cpu().float(), target["boxes"].cpu()
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


def measure(
    model: LldModule,
    loader: Any,
    prepare: Any,
    thresholds: list[float],
    nms_iou: float = 0.5,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Summed `threshold_counts` of ``model`` over ``loader`` (batches go through ``prepare``,
    e.g. the data module's `on_after_batch_transfer`, for the evaluation letterbox)."""
    num_classes = int(model.hparams.num_classes)
    totals = {
        "detections": torch.zeros((len(thresholds), num_classes), dtype=torch.int64),
        "correct": torch.zeros((len(thresholds), num_classes), dtype=torch.int64),
        "cells": torch.zeros(num_classes, dtype=torch.int64),
    }
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
            # One class per cell, as the pseudo-labeller keeps them.
            preds = [
                {k: v[batched_nms(p["boxes"].float(), p["scores"].float(),
                                  torch.zeros_like(p["labels"]), nms_iou)] for k, v in p.items()}
                for p in preds
            ]
            targets = unbatch_targets(batch)
            for pred, target in zip(keep_inside_regions(preds, targets), targets, strict=True):
                for key, value in threshold_counts(pred, target, thresholds, num_classes).items():
                    totals[key] += value
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


def render(report: dict[str, Any]) -> Table:
    """Rich table: one row per threshold, precision / recall (detections) per class."""
    table = Table(title=f"{report['model']}: precision / recall (detections) per class, "
                  f"{report['split']} split, {report['cells_total']} labelled cells")
    table.add_column("score >=", justify="right")
    for name, cells in zip(report["classes"], report["cells"], strict=True):
        table.add_column(f"{name} ({cells} cells)", justify="right")
    for t, threshold in enumerate(report["thresholds"]):
        table.add_row(
            f"{threshold:.2f}",
            *(
                f"{report['precision'][t][c]:.3f} / {report['recall'][t][c]:.3f} "
                f"({report['detections'][t][c]})"
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
    parser.add_argument("--split", choices=["val", "test"], default="val")
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
    from lld_lightning.cli import LldCLI
    from lld_lightning.data.datamodule import LldDataModule

    args, lld_args = parse_args(argv)
    if not Path(args.ckpt_path).is_file():
        raise SystemExit(f"score_thresholds: no checkpoint at {args.ckpt_path}")
    thresholds = sorted(args.thresholds)
    cli = LldCLI(
        LldModule, LldDataModule, args=[*lld_args, "--trainer.logger", "false"], run=False
    )
    datamodule = cli.datamodule
    datamodule.setup("fit" if args.split == "val" else "test")
    loader = datamodule.val_dataloader() if args.split == "val" else datamodule.test_dataloader()
    model = LldModule.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    if args.teacher:
        load_teacher(model, args.ckpt_path)
    if list(model.class_names) != list(datamodule.class_names):
        raise SystemExit(
            f"score_thresholds: the checkpoint's classes {list(model.class_names)} are not the "
            f"data's {list(datamodule.class_names)}"
        )
    totals = measure(
        model, loader, lambda b: datamodule.on_after_batch_transfer(b, 0), thresholds,
        args.nms_iou, args.device,
    )
    detections, correct, cells = totals["detections"], totals["correct"], totals["cells"]
    precision = correct / detections.clamp(min=1)
    recall = correct / cells.clamp(min=1)
    names = list(model.class_names)
    report = {
        "checkpoint": args.ckpt_path,
        "model": "PseudoLabeller teacher" if args.teacher else "trained model",
        "split": args.split,
        "thresholds": thresholds,
        "classes": names,
        "cells": cells.tolist(),
        "cells_total": int(cells.sum()),
        "detections": detections.tolist(),
        "correct": correct.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "target_precision": args.precision,
        "suggested": suggest(precision, detections, thresholds, args.precision, names),
    }
    console = Console()
    console.print(render(report))
    missing = [name for name in names if name not in report["suggested"]]
    console.print(
        f"PseudoLabeller class_thresholds at precision >= {args.precision}: "
        + json.dumps(report["suggested"])
        + (f" (no listed threshold reaches it for {', '.join(missing)})" if missing else "")
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
