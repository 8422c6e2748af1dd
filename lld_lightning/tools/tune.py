"""Post-processing settings of a trained checkpoint, measured on a split: COCO mAP for every
combination of score threshold, NMS IoU, quality weight, detection cap and containment rule.

The detector runs once over the split; its raw outputs are kept (in CPU memory) and each
combination re-runs only the post-processing and the metrics, the same `LldModule.detections`
and `DomainMetrics` that ``lld validate`` uses. So the row of the checkpoint's own settings is
``lld validate``'s result, and the best row says which ``--model.postprocess.*`` flags (e.g.
``--model.postprocess.nms_iou 0.7``) to pass to ``lld test`` / ``lld predict`` (or to put in the
config's ``model.postprocess``). Choose on the validation split; the
test split is for reporting, and settings picked on it overstate the test numbers::

    python -m lld_lightning.tools.tune --ckpt_path runs/txl/latest/checkpoints/best.ckpt --config configs/txl.yaml \\
        --score-threshold 0.001 0.05 --out runs/txl/tune.json

By default NMS IoU 0.5 / 0.6 / 0.7 / 0.8 times quality weight 0 / 0.25 / 0.5 / 0.75 (16
combinations) are measured; an axis not given (score threshold, detection cap, containment) keeps
the checkpoint's value.

Everything that is not one of this command's own flags goes to `lld` (``--config``, ``--data.*``)
and only builds the data; the model comes from the checkpoint. The kept outputs take about
``images x locations x (classes + attribute values + 5) x 4`` bytes (by that count 160 MB for TXL-PBC's 288
validation images at 416 px); with a region read-out the feature maps are kept too, and with
its pixel crops the input images.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import Tensor

from lld_lightning.data.sample import unbatch_targets
from lld_lightning.metrics import DomainMetrics, keep_inside_regions, render_metrics_table
from lld_lightning.models import PostProcess
from lld_lightning.module import LldModule
from lld_lightning.tools.checkpoint_split import SPLITS, load_checkpoint_split

#: The `PostProcess` fields this command varies.
TUNED: tuple[str, ...] = (
    "score_threshold",
    "nms_iou",
    "quality_weight",
    "max_detections",
    "max_containment",
)
#: What the detector's outputs must keep for `LldModule.detections` (the rest is dropped).
KEPT_OUTPUTS: tuple[str, ...] = (
    "cls_logits",
    "box_deltas",
    "quality_logits",
    "attr_logits",
    "points",
    "strides",
    "roi_features",
)
#: The metrics a setting can be chosen by (`DomainMetrics` keys over all domains).
METRICS: dict[str, str] = {
    "map": "all/map",
    "map_50": "all/map_50",
    "map_75": "all/map_75",
    "attr_f1": "all/attr/mean_f1",
}

__all__ = [
    "KEPT_OUTPUTS",
    "METRICS",
    "TUNED",
    "EvaluatedBatch",
    "collect",
    "evaluate",
    "grid",
    "main",
]


@dataclass
class EvaluatedBatch:
    """One batch as evaluation sees it: the detector's kept outputs and the batch's targets.

    Attributes:
        outputs: `KEPT_OUTPUTS` of the detector's forward, on the CPU.
        images: the (letterboxed) input ``[B, 3, H, W]``, on the CPU: detections are clipped to
            its size, and a region read-out with pixel crops reads its pixels. Without pixel
            crops only the shape is read, so `collect` keeps a stand-in without storage.
        targets: per image, `unbatch_targets` (boxes, labels, attributes, regions).
        domains: per image, its domain name.
    """

    outputs: dict[str, Any]
    images: Tensor
    targets: list[dict[str, Tensor]]
    domains: list[str]


def _reads_pixels(model: LldModule) -> bool:
    readout = model.detector.readout
    return readout is not None and readout.pixel_crop > 0


def collect(
    model: LldModule, loader: Any, prepare: Any, device: str = "cpu"
) -> list[EvaluatedBatch]:
    """Run ``model`` once over ``loader`` (batches through ``prepare``) and keep what evaluating
    it needs, on the CPU."""
    model = model.to(device).eval()
    keep_pixels = _reads_pixels(model)
    batches = []
    with torch.no_grad():
        for batch in track(loader, description="detector outputs"):
            batch = prepare(move_data_to_device(batch, device))
            images = batch["image"]
            outputs = model(images)
            kept_images = images.cpu() if keep_pixels else torch.zeros(()).expand(images.shape)
            batches.append(
                EvaluatedBatch(
                    outputs=move_data_to_device(
                        {k: v for k, v in outputs.items() if k in KEPT_OUTPUTS}, "cpu"
                    ),
                    images=kept_images,
                    targets=move_data_to_device(unbatch_targets(batch), "cpu"),
                    domains=list(batch["domain"]),
                )
            )
    model.cpu()
    if not batches:
        raise ValueError("no images to evaluate")
    return batches


def evaluate(
    model: LldModule,
    batches: list[EvaluatedBatch],
    domains: list[str],
    settings: PostProcess,
    backend: str | None = None,
) -> dict[str, float]:
    """`DomainMetrics` results of ``model``'s detections on ``batches`` with the post-processing
    ``settings`` instead of its own (what ``lld validate`` computes, for one combination)."""
    metrics = DomainMetrics(
        domains=domains or ["default"],
        num_classes=int(model.hparams.num_classes),
        class_names=list(model.class_names),
        attribute_spec=model.attribute_spec,
        backend=backend or model.hparams.metrics_backend,
    )
    with torch.no_grad():
        for batch in batches:
            preds = model.detections(
                batch.outputs, batch.images, evaluation=True, settings=settings
            )
            metrics.update(keep_inside_regions(preds, batch.targets), batch.targets, batch.domains)
    return metrics.compute()


def grid(axes: dict[str, list[Any]], current: PostProcess) -> list[PostProcess]:
    """Every combination of the ``axes`` values (``{TUNED field: values}``; an empty or missing
    axis keeps ``current``'s value), each as ``current`` with those fields replaced, and
    ``current`` itself first when the combinations miss it."""
    values = {
        name: list(dict.fromkeys(axes.get(name) or [getattr(current, name)])) for name in TUNED
    }
    points = [
        dataclasses.replace(current, **dict(zip(TUNED, combo, strict=True)))
        for combo in itertools.product(*values.values())
    ]
    return points if current in points else [current, *points]


def changed(settings: PostProcess, current: PostProcess) -> list[str]:
    """The `TUNED` fields in which ``settings`` differs from ``current``."""
    return [name for name in TUNED if getattr(settings, name) != getattr(current, name)]


def flags(settings: PostProcess, current: PostProcess) -> str:
    """The ``--model.postprocess.*`` flags that turn the checkpoint's settings into ``settings``."""
    return (
        " ".join(
            f"--model.postprocess.{name} {'null' if getattr(settings, name) is None else getattr(settings, name)}"
            for name in changed(settings, current)
        )
        or "(the checkpoint's settings)"
    )


#: Short column names of the settings in the table.
SHORT_NAMES: dict[str, str] = {
    "score_threshold": "score >",
    "nms_iou": "NMS IoU",
    "quality_weight": "quality w",
    "max_detections": "max det",
    "max_containment": "contain",
}


def render(report: dict[str, Any], show: int) -> Table:
    """Rich table of the ``show`` best rows (and the checkpoint's own), best first. Settings
    that are the same in every row are named in the title instead of a column."""
    rows, metric = report["rows"], report["metric"]
    varied = [name for name in TUNED if len({repr(row["settings"][name]) for row in rows}) > 1]
    fixed = ", ".join(f"{name} {rows[0]['settings'][name]}" for name in TUNED if name not in varied)
    table = Table(
        title=f"{report['checkpoint']}: post-processing on the {report['split']} split "
        f"({report['images']} images), ranked by {metric}" + (f"; {fixed}" if fixed else "")
    )
    for name in (
        "rank",
        *(SHORT_NAMES[n] for n in varied),
        "mAP",
        "mAP@.5",
        "mAP@.75",
        *(f"AP {c}" for c in report["classes"]),
        "attr F1",
    ):
        table.add_column(name, justify="right")
    for rank, row in enumerate(rows, start=1):
        if rank > show and not row["current"]:
            continue
        r = row["results"]
        table.add_row(
            f"{rank}{' (current)' if row['current'] else ''}",
            *(str(row["settings"][name]) for name in varied),
            *(_fmt(r.get(key)) for key in ("all/map", "all/map_50", "all/map_75")),
            *(_fmt(r.get(f"all/ap/{c}")) for c in report["classes"]),
            _fmt(r.get("all/attr/mean_f1")),
            style="bold" if rank == 1 else None,
        )
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or value < 0 else f"{value:.3f}"


def _containment(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1] or none, got {text}")
    return value


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This command's flags, and the rest (for `lld`, to build the data)."""
    parser = argparse.ArgumentParser(
        prog="python -m lld_lightning.tools.tune",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Other arguments (--config, --data.*) build the data as for `lld`. The score "
        "threshold, detection cap and containment keep the checkpoint's value unless given.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of the model to tune")
    parser.add_argument("--split", choices=SPLITS, default="val", help="the split to measure on")
    parser.add_argument(
        "--score-threshold",
        nargs="+",
        type=float,
        default=[],
        help="score thresholds to try (default: the checkpoint's)",
    )
    parser.add_argument(
        "--nms-iou",
        nargs="+",
        type=float,
        default=[0.5, 0.6, 0.7, 0.8],
        help="NMS IoUs to try (default 0.5 0.6 0.7 0.8)",
    )
    parser.add_argument(
        "--quality-weight",
        nargs="+",
        type=float,
        default=[0.0, 0.25, 0.5, 0.75],
        help="quality weights to try in [0, 1] (default 0 0.25 0.5 0.75); 1 ranks by the quality "
        "alone, which is the same for every class of a location",
    )
    parser.add_argument(
        "--max-detections",
        nargs="+",
        type=int,
        default=[],
        help="detection caps per image to try (default: the checkpoint's)",
    )
    parser.add_argument(
        "--max-containment",
        nargs="+",
        type=_containment,
        default=[],
        help="containment fractions in (0, 1], or none (off), to try (default: the checkpoint's)",
    )
    parser.add_argument(
        "--metric", choices=list(METRICS), default="map", help="what ranks the rows"
    )
    parser.add_argument(
        "--backend",
        choices=["pycocotools", "faster_coco_eval"],
        help="COCO backend (default: the checkpoint's metrics_backend)",
    )
    parser.add_argument("--show", type=int, default=10, help="rows shown (the JSON has all)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the detector runs (the post-processing runs on the CPU)",
    )
    parser.add_argument("--out", help="also write every row to this JSON file")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every combination, print the table and the best flags; returns the report."""
    args, lld_args = parse_args(argv)
    for weight in args.quality_weight:
        if not 0.0 <= weight <= 1.0:
            raise SystemExit(f"tune: --quality-weight values must be in [0, 1], got {weight}")
    loaded = load_checkpoint_split(args.ckpt_path, lld_args, args.split, "tune")
    model = loaded.model
    current = model.settings
    axes = {
        "score_threshold": args.score_threshold,
        "nms_iou": args.nms_iou,
        "quality_weight": args.quality_weight,
        "max_detections": args.max_detections,
        "max_containment": args.max_containment,
    }
    batches = collect(model, loaded.loader, loaded.prepare, args.device)
    rows = []
    for settings in track(grid(axes, current), description="post-processing settings"):
        results = evaluate(model, batches, loaded.domains, settings, args.backend)
        rows.append(
            {
                "settings": {name: getattr(settings, name) for name in TUNED},
                "current": settings == current,
                "flags": flags(settings, current),
                "changes": len(changed(settings, current)),
                "results": results,
            }
        )
    key = METRICS[args.metric]
    # Best first; among equal results the checkpoint's own settings, then the fewest changes, so
    # that a change is only suggested when it measures better.
    rows.sort(key=lambda row: (-row["results"].get(key, -1.0), not row["current"], row["changes"]))
    report = {
        "checkpoint": args.ckpt_path,
        "split": args.split,
        "metric": args.metric,
        "images": int(rows[0]["results"].get("all/num_images", 0)),
        "classes": list(model.class_names),
        "current": {name: getattr(current, name) for name in TUNED},
        "rows": rows,
    }
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for every column
        console = Console(width=max(console.width, 160))
    console.print(render(report, args.show))
    best, mine = rows[0], next(row for row in rows if row["current"])
    console.print(
        render_metrics_table(
            best["results"], loaded.domains, title=f"the best row, per domain: {best['flags']}"
        )
    )
    console.print(
        f"best {args.metric} on the {args.split} split: {best['results'].get(key, -1.0):.4f} with "
        f"{best['flags']} (the checkpoint's settings: {mine['results'].get(key, -1.0):.4f})"
    )
    if args.split == "test":
        console.print(
            "[yellow]chosen on the test split: the test numbers of these settings are "
            "optimistic; choose on val[/yellow]"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
