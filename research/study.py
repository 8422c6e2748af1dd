"""The sparse study: does region masking + pseudo-labelling close the gap to full annotation?

``python -m research.study`` (``make sparse-study``) trains and tests, per dataset, with one
seed, steps and test set: full annotation; naive sparse (unlabelled = background); region-masked;
masked + EMA-teacher pseudo-labels; masked + the reference self-training. Sparse data is simulated
from the full annotation (`sparse_simulation`, one rectangle per training image). Every run goes
through ``lld_lightning.cli.main`` in-process (fit, then test with the best checkpoint by
validation mAP@.5, or the last one) in its own folder under ``--runs-dir``. The command writes the
Markdown table (``--out``) and a JSON next to it.

Research code, not part of the installed package: run it from the repository root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lld_lightning.tools.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
#: Where TXL-PBC is unless ``--txl-root`` says otherwise: the shared data beside the repository.
TXL_ROOT = REPO.parent / "shared" / "data" / "txl_pbc"

#: Rows of the table, in order: (name, loss mode, pseudo-labeller mode or None, sparse?).
ROWS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("full", "masked", None, False),
    ("naive", "naive", None, True),
    ("masked", "masked", None, True),
    ("masked+teacher", "masked", "teacher", True),
    ("masked+self", "masked", "self", True),
)
#: Settings of the JSON records written before their flag existed, as those runs had them.
RECORD_DEFAULTS: dict[str, Any] = {"box_bins": 0}


@dataclass
class DatasetSpec:
    """One dataset of the study: a shipped config, plain ``--key value`` overrides, step budget."""

    name: str
    config: str
    overrides: dict[str, Any]
    max_steps: int


@dataclass
class RunResult:
    """One row of the table."""

    dataset: str
    fraction: float | None
    row: str
    map: float
    map_50: float
    attr_f1: float | None
    steps: int
    wall_s: float
    checkpoint: str
    pseudo: dict[str, float] = field(default_factory=dict)


def dataset_specs(args: argparse.Namespace) -> dict[str, DatasetSpec]:
    """The datasets the study knows, sized by the command-line flags."""
    # The model is spelled out, so the configs' recipe (read-out with pixel crops, containment
    # filter, quality focal loss) does not change the study's rows: they stay comparable.
    common = {
        "model.detector.backbone": args.backbone,
        "model.detector.fpn_channels": args.fpn_channels,
        "model.detector.out_indices": args.out_indices,
        "model.detector.box_bins": args.box_bins,
        "model.detector.readout": {"pixel_crop": 0, "crop_classes": False}
        if args.roi_readout
        else None,
        "model.postprocess.max_containment": 0.5 if args.roi_readout else None,
        "model.loss.cls_loss": args.cls_loss,
        "data.batch_size": args.batch_size,
        "data.num_workers": args.num_workers,
        # Whole fields (no region-centred crops): whether the unlabelled part of the field is
        # ignored, called background or pseudo-labelled only matters if the model sees it.
        "data.augmentation.crop_size": None,
    }
    if args.quick:
        # Seconds: the tiny model on a tiny synthetic set (what tests/test_study.py runs).
        return {
            "synthetic": DatasetSpec(
                "synthetic",
                "configs/tiny.yaml",
                {
                    **common,
                    "data.synthetic.dir": str(Path(args.runs_dir) / "data"),
                    "data.synthetic.sparse_fraction": 0.0,
                },
                args.max_steps,
            )
        }
    return {
        "synthetic": DatasetSpec(
            "synthetic",
            "configs/sparse.yaml",
            {
                **common,
                "data.image_size": args.synthetic_image_size,
                "data.synthetic.num_images": args.synthetic_images,
                "data.synthetic.image_size": args.synthetic_field,
                "data.synthetic.sparse_fraction": 0.0,
            },
            args.synthetic_steps if args.max_steps is None else args.max_steps,
        ),
        "txl": DatasetSpec(
            "txl",
            "configs/txl.yaml",
            {
                **common,
                "data.root": str(args.txl_root),
                "data.image_size": args.txl_image_size,
            },
            args.txl_steps if args.max_steps is None else args.max_steps,
        ),
    }


def run_config(
    args: argparse.Namespace, run_dir: Path, pseudo_mode: str | None, max_steps: int
) -> dict[str, Any]:
    """The per-run YAML: step budget, validation points, the best checkpoint's metric, the weight
    average and the pseudo-labeller (with the batch keys it reads). Checkpoints go to
    ``<run_dir>/version_N/checkpoints``, with ``<run_dir>/latest`` naming the run (`lld fit`'s run folders)."""
    val_every = max(1, max_steps // max(1, args.validations))
    callbacks: list[dict[str, Any]] = []
    if args.weight_ema is not None:
        callbacks.append(
            {
                "class_path": "lld_lightning.callbacks.ema.WeightEma",
                "init_args": {"decay": args.weight_ema, "ramp_steps": args.weight_ema_ramp},
            }
        )
    budget = args.budget_minutes is not None
    if budget:
        callbacks.append(
            {
                "class_path": "lld_lightning.callbacks.time_budget.TimeBudget",
                "init_args": {"minutes": args.budget_minutes},
            }
        )
    data: dict[str, Any] = {}
    if pseudo_mode is not None:
        teacher = pseudo_mode.startswith("teacher")
        # The hidden full annotation measures the pseudo-labels' precision and recall; the
        # teacher reads the evaluation view of the same images.
        data = {"keep_hidden": True, "teacher_view": teacher}
        init_args: dict[str, Any] = {
            "mode": "teacher" if teacher else pseudo_mode,
            "warmup_steps": int(args.pseudo_warmup * max_steps),
        }
        if budget:  # the run's length is known only as it goes
            callbacks.append(
                {
                    "class_path": "research.callbacks.PseudoWarmupFraction",
                    "init_args": {"fraction": args.pseudo_warmup},
                }
            )
        if teacher:
            init_args.update(
                threshold=args.threshold, weight=args.pseudo_weight, ema_decay=args.ema_decay
            )
        if teacher and args.pseudo_attribute_threshold is not None:
            init_args["attribute_threshold"] = args.pseudo_attribute_threshold
        callbacks.append(
            {"class_path": "lld_lightning.callbacks.pseudo.PseudoLabeller", "init_args": init_args}
        )
    trainer: dict[str, Any] = {
        "max_steps": max_steps,
        "max_epochs": -1,
        "val_check_interval": val_every,
        "check_val_every_n_epoch": None,
        "default_root_dir": str(run_dir),
        "enable_progress_bar": False,
        "callbacks": callbacks,
    }
    if budget:
        # TimeBudget sets the steps; validation every budget / validations seconds (and at the end).
        trainer["max_steps"] = -1
        seconds = max(1, round(60 * args.budget_minutes / args.validations))  # Lightning: int
        trainer["val_check_interval"] = {"seconds": seconds}
    if args.quick:
        trainer.update(limit_val_batches=1, limit_test_batches=2, num_sanity_val_steps=0)
    config = {
        "seed_everything": args.seed,
        "trainer": trainer,
        # One metric for every dataset (configs/txl.yaml keeps the best by mAP@[.5:.95]).
        "checkpoint": {"monitor": "val/map_50", "mode": "max"},
        "model": {"warmup_steps": 100 if budget else min(100, max(1, max_steps // 10))},
    }
    if data:
        config["data"] = data
    return config


def run_one(
    args: argparse.Namespace,
    spec: DatasetSpec,
    fraction: float | None,
    row: str,
    loss_mode: str,
    pseudo_mode: str | None,
) -> RunResult:
    """Fit and test one row in a fresh run folder; returns its metrics."""
    from lld_lightning.callbacks.pseudo import PseudoLabeller
    from lld_lightning.cli import main

    tag = f"{spec.name}/{row}" + (f"_f{fraction}" if fraction is not None else "")
    run_dir = Path(args.runs_dir) / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = run_dir / "study.yaml"
    config = run_config(args, run_dir, pseudo_mode, spec.max_steps)
    extra.write_text(yaml.safe_dump(config, sort_keys=False))
    overrides = {**spec.overrides, "model.loss.mode": loss_mode, "data.seed": args.seed}
    if fraction is not None:
        overrides["data.sparse_simulation"] = fraction
    cli_args = ["--config", str(REPO / spec.config), "--config", str(extra)]
    for key, value in overrides.items():
        cli_args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]

    print(f"[study] {tag}: fit", flush=True)
    start = time.perf_counter()
    fitted = main(["fit", *cli_args])
    pseudo = {}
    for callback in fitted.trainer.callbacks:
        if isinstance(callback, PseudoLabeller):
            pseudo = callback.summary()
    steps = int(fitted.trainer.global_step)
    run = run_dir / "latest"
    best = run / "checkpoints" / "best.ckpt"
    checkpoint = best if best.exists() else run / "checkpoints" / "last.ckpt"
    tested = main(["test", *cli_args, "--ckpt_path", str(checkpoint)])
    wall = time.perf_counter() - start
    results = tested.model.test_results
    attr_f1 = results.get("all/attr/mean_f1")
    result = RunResult(
        dataset=spec.name,
        fraction=fraction,
        row=row,
        map=float(results.get("all/map", float("nan"))),
        map_50=float(results.get("all/map_50", float("nan"))),
        attr_f1=float(attr_f1) if attr_f1 is not None and attr_f1 >= 0 else None,
        steps=steps,
        wall_s=wall,
        checkpoint=checkpoint.name,
        pseudo=pseudo,
    )
    print(f"[study] {tag}: mAP@.5 {result.map_50:.4f} in {wall:.0f} s", flush=True)
    return result


def plan(args: argparse.Namespace) -> list[tuple[str, float | None, str, str, str | None]]:
    """Every (dataset, fraction, row, loss mode, pseudo mode) to run, in order."""
    runs = []
    for dataset in args.datasets:
        fractions = args.fractions if dataset == args.fraction_dataset else args.fractions[:1]
        runs.append((dataset, None, *ROWS[0][:3]))
        for fraction in fractions:
            for name, loss_mode, pseudo_mode, sparse in ROWS[1:]:
                if sparse:
                    runs.append((dataset, fraction, name, loss_mode, pseudo_mode))
    if args.rows:
        runs = [r for r in runs if r[2] in args.rows]
    return runs


def machine() -> str:
    """CPU model, cores, torch and lightning versions (and the GPU when there is one)."""
    import lightning
    import torch

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # Float reductions depend on the thread count: runs are comparable at equal counts only.
    return (
        f"{cpu}, {cores} cores usable, {torch.get_num_threads()} torch threads, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def render(
    results: list[RunResult],
    args: argparse.Namespace,
    command: str,
    total_s: float,
    machine_text: str | None = None,
    date: str | None = None,
    runs_dirs: list[str] | None = None,
) -> str:
    """The Markdown report: table, findings, command, machine, budget, time, date.

    ``runs_dirs``: the run folders of a merged table (one per JSON); default ``args.runs_dir``.
    """
    full = {r.dataset: r.map_50 for r in results if r.row == "full"}
    lines = [
        "# Sparse study: full vs naive vs region-masked vs pseudo-labels",
        "",
        "Generated by `python -m research.study` (do not edit by hand). Every row trains from "
        "scratch with the same seed and step budget and is tested on the same, fully annotated test "
        "set; sparse rows see one rectangle of the given area fraction per training image "
        "(`sparse_simulation`). Pseudo-label precision is measured against the hidden full "
        "annotation during training (see docs/research.md).",
        "",
        "| dataset | labelled fraction | row | mAP | mAP@.5 | attr F1 | % of full mAP@.5 "
        "| pseudo precision | pseudo recall | pseudo/img | steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = 100 * r.map_50 / full[r.dataset] if full.get(r.dataset) else None
        lines.append(
            f"| {r.dataset} | {r.fraction if r.fraction is not None else 1.0} | {r.row} | {_fmt(r.map)} "
            f"| {_fmt(r.map_50)} | {_fmt(r.attr_f1)} | {_fmt(share, 1)} "
            f"| {_fmt(r.pseudo.get('pseudo_precision'))} | {_fmt(r.pseudo.get('pseudo_recall'))} "
            f"| {_fmt(r.pseudo.get('pseudo_per_image'), 2)} | {r.steps} | {r.wall_s:.0f} |"
        )
    lines += ["", "## Findings (computed from the table)", ""]
    lines += findings(results)
    specs = dataset_specs(args)
    steps = {name: specs[name].max_steps for name in dict.fromkeys(r.dataset for r in results)}
    budget = "optimizer steps per run: " + ", ".join(f"{k} {v}" for k, v in steps.items())
    if args.budget_minutes is not None:
        budget = (
            f"{args.budget_minutes} min of training per run (`TimeBudget`: each run's steps, "
            "in the table, follow its own measured speed; the schedule and the pseudo-label "
            "warm-up scale with them)"
        )
    lines += [
        "",
        "## How it was made",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_text or machine()}",
        f"- Budget: {budget}; batch {args.batch_size}; backbone {args.backbone} (no pretraining)"
        + (
            f", stages {args.out_indices} into the pyramid"
            if args.out_indices is not None
            else ""
        )
        + (
            f", box sides as distributions over {args.box_bins} distances (distribution focal loss)"
            if args.box_bins
            else ""
        )
        + "; "
        f"validation {args.validations}x per run for the best checkpoint; pseudo-labels after "
        f"{args.pseudo_warmup:.0%} of the steps; teacher threshold {args.threshold}, weight "
        f"{args.pseudo_weight}, EMA decay {args.ema_decay}"
        + (
            f"; pseudo-label attributes copied at probability >= {args.pseudo_attribute_threshold}"
            + (" (none)" if args.pseudo_attribute_threshold > 1 else "")
            if args.pseudo_attribute_threshold is not None
            else ""
        )
        + (
            f"; every row evaluated with an EMA of its weights (decay {args.weight_ema}, ramp "
            f"{args.weight_ema_ramp:g} steps)"
            if args.weight_ema is not None
            else ""
        )
        + "; self-training 0.95 / 0.1; "
        f"classification loss {args.cls_loss}; class and attributes from the {'region read-out' if args.roi_readout else 'dense head'}.",
        f"- Total time: {total_s / 60:.1f} min; date: "
        f"{date or dt.datetime.now().isoformat(timespec='minutes')}",
        "- Runs: "
        + ", ".join(f"`{d}/<dataset>/<row>_f<fraction>/`" for d in runs_dirs or [args.runs_dir])
        + " (configs, logs, checkpoints).",
    ]
    return "\n".join(lines) + "\n"


#: Pseudo-label precision from which a row that did not help is explained by redundancy, not errors.
PRECISE: float = 0.8
#: A precise row that lost more than this mAP@.5 against masked is not a tie: say what fell.
CLEAR_LOSS: float = 0.03


def _precise_but_worse(found: str, row: RunResult, masked: RunResult) -> str:
    """Why-line of a row whose pseudo-labels were right at IoU 0.5 and that still lost clearly."""
    d50, dmap = row.map_50 - masked.map_50, row.map - masked.map
    text = f"{found}: right at IoU 0.5, yet the row lost {-d50:.3f} mAP@.5 against masked"
    if dmap < d50:
        text += (
            f" and more over IoU .5:.95 ({dmap:+.3f} mAP), which points at pseudo-label boxes "
            "looser than expert boxes training the box regression"
        )
    if row.attr_f1 is not None and masked.attr_f1 is not None and row.attr_f1 < masked.attr_f1:
        text += (
            f"; the copied attributes lowered attribute F1 ({masked.attr_f1:.3f} -> "
            f"{row.attr_f1:.3f})"
        )
    return text + " (see docs/research.md)."


def why_no_gain(row: RunResult, masked: RunResult | None = None) -> str:
    """One sentence from a pseudo-label row's own measurements (and the masked row's, when
    given) on why it did not beat masked."""
    per_image = row.pseudo.get("pseudo_per_image", float("nan"))
    precision = row.pseudo.get("pseudo_precision", float("nan"))
    recall = row.pseudo.get("pseudo_recall", float("nan"))
    if math.isnan(per_image) or per_image == 0:
        return (
            "no detection passed the score threshold, so no pseudo-label was ever added and the "
            "row trains exactly like masked."
        )
    if math.isnan(precision):
        return f"{per_image:.2f} pseudo-labels per image, precision unknown (no hidden annotation)."
    found = (
        f"{per_image:.1f} pseudo-labels per image at precision {precision:.2f} recovered "
        f"{recall:.0%} of the hidden cells outside the regions"
    )
    if precision >= PRECISE and masked is not None and row.map_50 < masked.map_50 - CLEAR_LOSS:
        return _precise_but_worse(found, row, masked)
    if precision >= PRECISE:
        return (
            f"{found}: they were right, but they are the cells the model already finds with "
            "confidence, so in the steps they were active they added little new signal "
            "(see docs/research.md)."
        )
    return (
        f"{found}, and {1 - precision:.0%} of them matched no hidden cell of their class: at this "
        "budget the teacher's errors cost more than its finds add (see docs/research.md)."
    )


def findings(results: list[RunResult]) -> list[str]:
    """Plain sentences comparing rows, per dataset and fraction."""
    out = []
    index = {(r.dataset, r.fraction, r.row): r for r in results}
    for dataset in dict.fromkeys(r.dataset for r in results):
        full = index.get((dataset, None, "full"))
        for fraction in dict.fromkeys(
            r.fraction for r in results if r.dataset == dataset and r.fraction
        ):
            naive, masked, teacher, selft = (
                index.get((dataset, fraction, row))
                for row in ("naive", "masked", "masked+teacher", "masked+self")
            )
            head = f"- {dataset}, fraction {fraction}:"
            if naive and masked:
                verdict = "beats" if masked.map_50 > naive.map_50 else "does NOT beat"
                out.append(
                    f"{head} region-masked {verdict} naive sparse "
                    f"(mAP@.5 {masked.map_50:.3f} vs {naive.map_50:.3f})."
                )
            for name, row in (
                ("EMA teacher", teacher),
                ("self-training", selft),
            ):
                if row and masked:
                    delta = row.map_50 - masked.map_50
                    share = (
                        f", {100 * row.map_50 / full.map_50:.1f}% of full"
                        if full and full.map_50
                        else ""
                    )
                    out.append(
                        f"{head} masked + {name}: mAP@.5 {row.map_50:.3f} ({delta:+.3f} vs masked{share}); "
                        f"{_fmt(row.pseudo.get('pseudo_per_image'), 2)} pseudo-labels/image at precision "
                        f"{_fmt(row.pseudo.get('pseudo_precision'))}, recall {_fmt(row.pseudo.get('pseudo_recall'))}"
                        + (" - pseudo-labels did not help at this budget." if delta <= 0 else ".")
                    )
                    if row and masked and delta <= 0:
                        out.append(f"{head} why ({name}): {why_no_gain(row, masked)}")
    return out or ["- (no comparable rows)"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The study's flags; ``--quick`` shrinks everything to the tiny model and data."""
    parser = argparse.ArgumentParser(
        prog="python -m research.study", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["synthetic", "txl"],
        choices=["synthetic", "txl"],
        help="the datasets to run",
    )
    parser.add_argument(
        "--fractions",
        nargs="+",
        type=float,
        default=[0.2, 0.1],
        help="labelled area fractions; the first for every dataset, all for --fraction-dataset",
    )
    parser.add_argument(
        "--fraction-dataset", default="txl", help="the dataset that gets every fraction"
    )
    parser.add_argument(
        "--rows", nargs="+", choices=[r[0] for r in ROWS], help="run only these rows"
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        help="optimizer steps per run for every dataset (overrides the next two)",
    )
    parser.add_argument(
        "--synthetic-steps", type=int, default=600, help="optimizer steps per synthetic run"
    )
    parser.add_argument(
        "--txl-steps", type=int, default=400, help="optimizer steps per TXL-PBC run"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        help="train each run for this many minutes (TimeBudget) instead of a step count",
    )
    parser.add_argument(
        "--validations", type=int, default=2, help="validations per run (best checkpoint)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the runs, the sparse rectangles and the data"
    )
    parser.add_argument(
        "--cls-loss",
        default="focal",
        choices=["focal", "quality_focal"],
        help="classification loss of every row",
    )
    parser.add_argument(
        "--weight-ema",
        type=float,
        metavar="DECAY",
        help="every row validates, tests and keeps an EMA of its weights (WeightEma decay)",
    )
    parser.add_argument(
        "--weight-ema-ramp",
        type=float,
        default=2000.0,
        help="steps over which that EMA's decay ramps up (WeightEma ramp_steps)",
    )
    parser.add_argument("--backbone", default="resnet18", help="timm backbone of every row")
    parser.add_argument(
        "--out-indices",
        type=int,
        nargs="+",
        default=None,
        help="backbone stages fed to the feature pyramid (default: strides 8/16/32; 1 2 3 4 adds stride 4)",
    )
    parser.add_argument(
        "--box-bins",
        type=int,
        default=17,
        help="box sides as distributions over this many distances (Detector box_bins, >= 2)",
    )
    parser.add_argument("--fpn-channels", type=int, default=64, help="feature pyramid width")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader workers")
    parser.add_argument(
        "--synthetic-images", type=int, default=960, help="synthetic images over all splits"
    )
    parser.add_argument(
        "--synthetic-field", type=int, default=320, help="synthetic image side (pixels)"
    )
    parser.add_argument(
        "--synthetic-image-size", type=int, default=256, help="model input side, synthetic"
    )
    parser.add_argument("--txl-image-size", type=int, default=256, help="model input side, TXL-PBC")
    parser.add_argument(
        "--threshold", type=float, default=0.6, help="teacher pseudo-label score threshold"
    )
    parser.add_argument(
        "--pseudo-weight", type=float, default=0.5, help="teacher pseudo-label loss weight"
    )
    parser.add_argument(
        "--pseudo-warmup", type=float, default=0.5, help="warm-up, fraction of --max-steps"
    )
    parser.add_argument(
        "--ema-decay", type=float, default=0.98, help="EMA decay of the pseudo-labeller's teacher"
    )
    parser.add_argument(
        "--pseudo-attribute-threshold",
        type=float,
        help="teacher rows: copy a pseudo-label's attribute only at this probability "
        "(PseudoLabeller attribute_threshold, default 0.7; above 1 copies none)",
    )
    parser.add_argument(
        "--roi-readout",
        action="store_true",
        help="class and attributes from the region read-out without pixel crops (Detector "
        "readout); default: from the dense head",
    )
    parser.add_argument(
        "--txl-root",
        default=str(TXL_ROOT),
        help="TXL-PBC folder (default: ../shared/data/txl_pbc beside the repository)",
    )
    parser.add_argument("--runs-dir", default="runs/study", help="the runs' folders go here")
    parser.add_argument(
        "--out", default="runs/study/sparse.md", help="the Markdown table (its JSON beside it)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds: tiny model and data (tests)")
    parser.add_argument(
        "--render-from",
        metavar="JSON",
        nargs="+",
        help="train nothing: rewrite --out from a study's JSON (its command, machine and "
        "numbers); several JSONs (e.g. one process per row) make one table",
    )
    args = parser.parse_args(argv)
    if args.render_from:
        return args
    if args.box_bins < 2:
        parser.error(f"--box-bins must be >= 2, got {args.box_bins}")
    if args.quick:
        args.datasets, args.fractions, args.max_steps, args.validations = (
            ["synthetic"],
            args.fractions[:1],
            2,
            1,
        )
        args.pseudo_warmup, args.backbone, args.fpn_channels = 0.5, "test_resnet", 32
        args.batch_size, args.num_workers = 2, 0
    if "txl" in args.datasets and not Path(args.txl_root).exists():
        parser.error(f"TXL-PBC not found at {args.txl_root}; drop it with --datasets synthetic")
    return args


#: Settings every JSON merged into one table must share (the table has one "Budget" line).
SHARED_SETTINGS = (
    "max_steps",
    "synthetic_steps",
    "txl_steps",
    "budget_minutes",
    "validations",
    "seed",
    "backbone",
    "fpn_channels",
    "batch_size",
    "synthetic_image_size",
    "txl_image_size",
    "cls_loss",
    "roi_readout",
    "weight_ema",
    "weight_ema_ramp",
    "out_indices",
    "box_bins",
)
#: Settings that JSONs with pseudo-label rows must share when merged.
PSEUDO_SETTINGS = (
    "threshold",
    "pseudo_weight",
    "pseudo_warmup",
    "ema_decay",
    "pseudo_attribute_threshold",
)
PSEUDO_ROWS = frozenset(name for name, _, pseudo_mode, _ in ROWS if pseudo_mode is not None)


def _settings_index(records: list[dict], settings: list[dict], sources: list[Path]) -> int:
    """Which record's settings describe a merged table; raises if the records disagree."""
    with_pseudo = [
        i
        for i, record in enumerate(records)
        if any(r["row"] in PSEUDO_ROWS for r in record["results"])
    ]
    for keys, indices in ((SHARED_SETTINGS, range(len(records))), (PSEUDO_SETTINGS, with_pseudo)):
        for key in keys:
            values = {i: settings[i].get(key) for i in indices}
            if len({json.dumps(v) for v in values.values()}) > 1:
                listed = ", ".join(f"{sources[i]}: {v!r}" for i, v in values.items())
                raise ValueError(
                    f"cannot merge runs made with different --{key.replace('_', '-')}"
                    f" into one table ({listed})"
                )
    return with_pseudo[0] if with_pseudo else 0


def rerender(sources: list[Path], out: Path) -> list[RunResult]:
    """Rewrite the Markdown report from a study's JSON (e.g. after the findings text changed).

    Several JSONs (e.g. one process per row, run at the same time) make one table: their rows
    in the order given, every command, the longest total time, and the settings of the first
    one with a pseudo-label row (else the first one). They must agree on the budget
    (`SHARED_SETTINGS`), and those with pseudo-label rows on the pseudo-labeller
    (`PSEUDO_SETTINGS`): one "Budget" line describes every row.
    """
    records = [json.loads(source.read_text()) for source in sources]
    results = [RunResult(**r) for record in records for r in record["results"]]
    # Defaults of flags added after the run (e.g. --roi-readout) fill what the record lacks.
    defaults = {**vars(parse_args(["--render-from", *map(str, sources)])), **RECORD_DEFAULTS}
    settings = [{**defaults, **r["args"]} for r in records]
    index = _settings_index(records, settings, sources)
    record = records[index]
    date = record.get("date") or dt.datetime.fromtimestamp(
        sources[index].stat().st_mtime
    ).isoformat(timespec="minutes")
    command = " & ".join(r["command"] for r in records)
    if len(records) > 1:
        command += " (separate processes; then `--render-from` their JSONs)"
    args = argparse.Namespace(**settings[index])
    total = max(r["total_s"] for r in records)
    # A merged JSON keeps the folders of its sources, so merging it again names them all.
    runs_dirs = list(
        dict.fromkeys(
            d
            for rec, s in zip(records, settings, strict=True)
            for d in rec.get("runs_dirs", [s["runs_dir"]])
        )
    )
    text = render(results, args, command, total, record["machine"], date, runs_dirs)
    out.write_text(text)
    if len(records) > 1:
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    **record,
                    "command": command,
                    "total_s": total,
                    "runs_dirs": runs_dirs,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
    print(f"[study] rewrote {out} from {', '.join(map(str, sources))}", flush=True)
    return results


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Run the study and write ``--out`` (Markdown) and its ``.json``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.render_from:
        return rerender([Path(source) for source in args.render_from], Path(args.out))
    command = "python -m research.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    specs = dataset_specs(args)
    start = time.perf_counter()
    results = [
        run_one(args, specs[dataset], fraction, row, loss_mode, pseudo_mode)
        for dataset, fraction, row, loss_mode, pseudo_mode in plan(args)
    ]
    total = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, args, command, total))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine(),
                "date": dt.datetime.now().isoformat(timespec="minutes"),
                "total_s": total,
                "args": vars(args),
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"[study] wrote {out} and {out.with_suffix('.json')} ({total / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
