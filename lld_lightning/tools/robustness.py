"""Robustness protocols: the shifted-microscopes suite and leave-one-source-out training.

``shifts``: the config's test images under every shift of `lld_lightning.data.shifts` at every
severity, written as one plain-YOLO dataset (one domain per ``<shift>-<severity>``, plus
``clean``), then one ``lld test`` of the checkpoint on it, so every shift is a test domain.
``loso``: for each source (domain) of the config's data, ``lld fit`` on the other sources, then
``lld test`` on all of them: the held-out source against the sources trained on.
``pixel_size``: the red-cell pixel-size estimate (`lld_lightning.data.red_cells`) of each test
domain, as given, resized to half and twice its size, and under every shift, against the pixel
size the data gives (no model involved).

Other arguments (``--data.*``, ``--trainer.*``, ...) go to every ``lld`` command as typed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from lld_lightning.callbacks.checkpoint import (
    RUN_CONFIG,
    CheckpointError,
    latest_run,
    read_checkpoint,
)
from lld_lightning.data.errors import DataError, error_message
from lld_lightning.data.images import read_image
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.red_cells import MAX_IMAGES
from lld_lightning.data.shifts import (
    SEVERITIES,
    SHIFTS,
    apply_shift,
    shift_seed,
)
from lld_lightning.metrics.plots import PALETTE, WHITE, _axes, _legend
from lld_lightning.metrics.results import RESULTS_JSON

PROG = "python -m lld_lightning.tools.robustness"
#: Domain name of the unshifted copy of each test image.
CLEAN = "clean"
#: Manifest of the written dataset, beside ``images/`` and ``labels/``.
MANIFEST = "manifest.csv"
#: Manifest column of each written image's pixel size in micrometres.
PIXEL_SIZE_COLUMN = "pixel_size_um"
#: Written first into ``--out``: marks the folder as this tool's (safe to overwrite).
MARKER = "shifts.json"
#: The summary ``shifts`` writes into ``--out``.
ROBUSTNESS_JSON = "robustness.json"
#: The chart ``shifts`` writes into ``--out``.
ROBUSTNESS_PNG = "robustness.png"
#: The summary ``loso`` writes into ``--out``.
LOSO_JSON = "loso.json"
#: Name of the checkpoint copy the test of ``shifts`` runs, inside ``<out>/run/checkpoints``.
TESTED_CHECKPOINT = "tested.ckpt"
#: The summary ``pixel_size`` writes into ``--out``.
PIXEL_SIZE_JSON = "pixel_size.json"
#: The resized copies ``pixel_size`` measures besides the images as given.
RESIZES: tuple[float, ...] = (0.5, 2.0)
#: The metrics each protocol reports per scope: (results.json key, column name).
METRICS: tuple[tuple[str, str], ...] = (("map_50", "mAP@.5"), ("map", "mAP"))


class ToolError(Exception):
    """A problem the user can fix; reported in one line (exit status 2)."""


def _domain(shift: str, severity: int) -> str:
    return f"{shift}-{severity}"


# --------------------------------------------------------------------------------- lld access
@dataclass
class LoadedData:
    """The data module a list of ``lld`` arguments builds, and those arguments' config."""

    datamodule: Any
    config: Any


def load_data(lld_args: list[str]) -> LoadedData:
    """Build the data module exactly as ``lld`` does from ``--config`` files and ``--data.*``
    flags (the model and trainer are built too, but nothing runs)."""
    from lld_lightning.cli import LldCLI
    from lld_lightning.data.datamodule import LldDataModule
    from lld_lightning.module import LldModule

    with patch.object(sys, "argv", sys.argv[:1]):  # LightningCLI warns when it sees both
        cli = LldCLI(
            LldModule, LldDataModule, args=[*lld_args, "--trainer.logger", "false"], run=False
        )
    cli.datamodule.prepare_data()  # the built-in synthetic data is generated on first use
    return LoadedData(cli.datamodule, cli.config)


def run_lld(args: list[str]) -> Any:
    """One in-process ``lld`` command; its `LldCLI`."""
    from lld_lightning.cli import main as lld_main

    with patch.object(sys, "argv", sys.argv[:1]):
        return lld_main(args)


def resolve_checkpoint(ckpt_path: str, root: str | os.PathLike) -> Path:
    """``best``/``last`` of the latest run under ``root``, or the path; checked like ``lld``."""
    path = Path(ckpt_path)
    if ckpt_path in ("best", "last"):
        run = latest_run(root)
        if run is None:
            raise ToolError(f"--ckpt_path {ckpt_path}: no run in {root}")
        path = run / "checkpoints" / f"{ckpt_path}.ckpt"
    try:
        read_checkpoint(path)
    except CheckpointError as error:
        raise ToolError(str(error)) from None
    return path


def _test_records(datamodule: Any) -> list[ImageRecord]:
    """The data's test-split records (of ``data.domains.test`` when set)."""
    records = datamodule.load_all_records()
    split, domains = datamodule.splits.test, datamodule.domains.test
    chosen = [r for r in records if r.split == split and (domains is None or r.domain in domains)]
    if not chosen:
        raise ToolError(f"no test images (split {split!r}) under {datamodule.data_root}")
    return chosen


def _unique_stems(records: list[ImageRecord]) -> list[str]:
    """File stems, made unique with the record's index where two images share a name."""
    stems = [re.sub(r"[^\w.-]", "_", r.path.stem) for r in records]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [s if counts[s] == 1 else f"{i:05d}_{s}" for i, s in enumerate(stems)]


def _yolo_lines(boxes: np.ndarray, labels: np.ndarray, width: int, height: int) -> str:
    """Plain YOLO label text (``cls xc yc w h`` normalised) of xyxy pixel boxes."""
    lines = []
    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
        xc, yc = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{int(label)} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return "".join(line + "\n" for line in lines)


def _prepare_out(out: Path) -> None:
    """Make ``out`` ready: new, empty, or an earlier output of this tool (its files replaced)."""
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ToolError(f"--out {out} is not empty and not an earlier output of this tool")
    for name in ("images", "labels", "run"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------ shifts
def write_shifted_dataset(
    records: list[ImageRecord],
    out: Path,
    shifts: list[str],
    severities: list[int],
    pixel_size_known: bool = True,
    max_image_pixels: int | None = None,
) -> int:
    """Write ``images/test``, ``labels/test`` and `MANIFEST` under ``out``: a `CLEAN` copy of
    each record and one per (shift, severity), PNG except the ``jpeg`` shift's JPEG files.

    Returns:
        The number of images written.
    """
    image_dir, label_dir = out / "images" / "test", out / "labels" / "test"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    variants = [(CLEAN, 0)] + [(s, v) for s in shifts for v in severities]
    rows = []
    stems = _unique_stems(records)
    with Progress(transient=True) as progress:
        task = progress.add_task("writing shifted images", total=len(records) * len(variants))
        for index, (record, stem) in enumerate(zip(records, stems, strict=True)):
            kwargs = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
            image = read_image(record.path, **kwargs).permute(1, 2, 0).numpy()  # [H, W, 3]
            pixel_size = getattr(record, "pixel_size_um", None)
            for shift, severity in variants:
                domain = CLEAN if shift == CLEAN else _domain(shift, severity)
                if shift == CLEAN:
                    pixels, boxes, labels = image, record.boxes_xyxy, record.labels
                    cell_scale, encoded = 1.0, None
                else:
                    seed = shift_seed(shift, severity, index)
                    shifted = apply_shift(
                        shift, severity, image, record.boxes_xyxy, record.labels, seed
                    )
                    pixels, boxes, labels = shifted.image, shifted.boxes_xyxy, shifted.labels
                    cell_scale, encoded = shifted.cell_scale, shifted.encoded
                name = f"{domain}__{stem}" + (".jpg" if encoded is not None else ".png")
                if encoded is not None:  # the shift's own JPEG file: no second compression
                    (image_dir / name).write_bytes(encoded)
                else:
                    Image.fromarray(pixels).save(image_dir / name)
                height, width = pixels.shape[:2]
                (label_dir / name).with_suffix(".txt").write_text(
                    _yolo_lines(boxes, labels, width, height)
                )
                size = ""
                if pixel_size_known and pixel_size is not None:
                    size = f"{pixel_size / cell_scale:.6g}"
                rows.append(
                    {"split": "test", "file": name, "source": domain, PIXEL_SIZE_COLUMN: size}
                )
                progress.advance(task)
    with open(out / MANIFEST, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["split", "file", "source", PIXEL_SIZE_COLUMN])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _copy_checkpoint(ckpt: Path, run: Path) -> Path:
    """A copy of the checkpoint in a run folder of its own, so ``lld test`` writes its results
    there, not into the checkpoint's training run (a hard link where the file system allows)."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    target = run / "checkpoints" / TESTED_CHECKPOINT
    target.unlink(missing_ok=True)
    try:
        os.link(ckpt.resolve(), target)
    except OSError:
        shutil.copy2(ckpt, target)
    source_config = ckpt.resolve().parent.parent / RUN_CONFIG
    if source_config.is_file():
        shutil.copy2(source_config, run / RUN_CONFIG)
    else:
        (run / RUN_CONFIG).write_text(f"# lld test of {ckpt.resolve()}\n")
    return target


def _scope_metrics(entry: dict | None, class_name: str) -> dict[str, float | None] | None:
    """The reported numbers of one results.json scope, None when it has no image."""
    if not entry:
        return None
    return {
        "class_ap50": entry.get("ap50_per_class", {}).get(class_name),
        **{key: entry.get(key) for key, _ in METRICS},
        "num_images": entry.get("num_images"),
    }


def summarise_shifts(
    results: dict, shifts: list[str], severities: list[int], class_name: str
) -> dict[str, Any]:
    """``{clean: metrics, shifts: {shift: {severity: metrics}}}`` from a results.json."""
    domains = results.get("domains", {})
    return {
        CLEAN: _scope_metrics(domains.get(CLEAN), class_name),
        "shifts": {
            shift: {
                str(severity): _scope_metrics(domains.get(_domain(shift, severity)), class_name)
                for severity in severities
            }
            for shift in shifts
        },
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def shifts_table(summary: dict[str, Any], class_name: str, severities: list[int]) -> Table:
    """Rows = shifts, columns = clean and each severity, then the mean over severities; cells
    read ``<class> AP@.5 / mAP@.5``."""
    table = Table(title=f"Shifted microscopes: {class_name} AP@.5 / mAP@.5")
    table.add_column("shift")
    for name in ("clean", *(f"severity {s}" for s in severities), "mean"):
        table.add_column(name, justify="right")
    clean = summary[CLEAN] or {}

    def cell(metrics: dict | None) -> str:
        metrics = metrics or {}
        return f"{_fmt(metrics.get('class_ap50'))} / {_fmt(metrics.get('map_50'))}"

    for shift, by_severity in summary["shifts"].items():
        cells = [by_severity[str(s)] for s in severities]
        mean = {key: _mean([(c or {}).get(key) for c in cells]) for key in ("class_ap50", "map_50")}
        table.add_row(shift, cell(clean), *(cell(c) for c in cells), cell(mean))
    return table


def shifts_chart(summary: dict[str, Any], class_name: str, severities: list[int]) -> Image.Image:
    """One line per shift: the class's AP@.5 from clean (0) through each severity."""
    width, height = 900, 560
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    box = (70, 50, 620, height - 70)
    steps = [0, *severities]
    ticks = [(i / (len(steps) - 1), "clean" if s == 0 else str(s)) for i, s in enumerate(steps)]
    _axes(
        draw,
        box,
        "severity",
        f"{class_name} AP@.5",
        f"Shifted microscopes: {class_name} AP@.5",
        ticks,
    )
    left, top, right, bottom = box
    clean = (summary[CLEAN] or {}).get("class_ap50")
    entries = []
    for i, (shift, by_severity) in enumerate(summary["shifts"].items()):
        colour = PALETTE[i % len(PALETTE)]
        values = [clean, *((by_severity[str(s)] or {}).get("class_ap50") for s in severities)]
        points = [
            (left + (right - left) * j / (len(steps) - 1), bottom - (bottom - top) * v)
            for j, v in enumerate(values)
            if v is not None
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        entries.append((shift, colour))
    _legend(draw, right + 20, top, entries)
    return image


def run_shifts(args: argparse.Namespace, lld_args: list[str]) -> dict[str, Any]:
    """The ``shifts`` protocol (see the module docstring); returns the robustness.json content."""
    config_args = [arg for path in args.config for arg in ("--config", path)] + lld_args
    loaded = load_data(config_args)
    datamodule = loaded.datamodule
    class_names = list(datamodule.class_names)
    class_name = args.class_name or class_names[0]
    if class_name not in class_names:
        raise ToolError(f"--class_name {class_name!r} is not one of the data's {class_names}")
    root = loaded.config.get("trainer", {}).get("default_root_dir") or "runs/default"
    ckpt = resolve_checkpoint(args.ckpt_path, root)
    out = Path(args.out)
    _prepare_out(out)
    shifts = list(dict.fromkeys(args.shifts))
    severities = sorted(set(args.severities))
    (out / MARKER).write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "shifts": shifts,
                "severities": severities,
                "pixel_size": args.pixel_size,
                "lld_args": config_args,
            },
            indent=2,
        )
        + "\n"
    )
    records = _test_records(datamodule)
    count = write_shifted_dataset(
        records,
        out,
        shifts,
        severities,
        args.pixel_size == "known",
        datamodule.reading.max_image_pixels,
    )
    Console(stderr=True).print(f"robustness: {count} images written to {out}")
    tested = _copy_checkpoint(ckpt, out / "run")
    test_args = _shifted_test_args(config_args, out, datamodule)
    if args.adapt:
        results = _adapted_results(tested, out, test_args)
    else:
        run_lld(["test", *test_args, "--ckpt_path", str(tested)])
        results = json.loads((out / "run" / RESULTS_JSON).read_text())
    summary = summarise_shifts(results, shifts, severities, class_name)
    document = {
        "checkpoint": str(ckpt),
        "class_name": class_name,
        "pixel_size": args.pixel_size,
        "adapted": bool(args.adapt),
        "shifts": shifts,
        "severities": severities,
        "results_json": str(out / "run" / RESULTS_JSON),
        **summary,
    }
    (out / ROBUSTNESS_JSON).write_text(json.dumps(document, indent=2) + "\n")
    shifts_chart(summary, class_name, severities).save(out / ROBUSTNESS_PNG)
    console = Console()
    console.print(shifts_table(summary, class_name, severities))
    console.print(f"robustness: {out / ROBUSTNESS_JSON}, {out / ROBUSTNESS_PNG}")
    return document


def _adapted_results(tested: Path, out: Path, test_args: list[str]) -> dict[str, Any]:
    """Each shifted domain tested by the checkpoint adapted (``lld adapt``) to its own images:
    results.json's ``domains`` gathered from one test per domain."""
    from lld_lightning.tools.adapt import adapt_checkpoint

    with open(out / MANIFEST, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_domain: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_domain.setdefault(row["source"], []).append(row)
    domains: dict[str, Any] = {}
    for domain, members in by_domain.items():
        folder = out / "adapt" / domain
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for row in members:
            (folder / row["file"]).symlink_to((out / "images" / "test" / row["file"]).resolve())
        # Each image's own pixel size, from the manifest (the domain mixes the sources).
        flags = [
            "--data.reading.manifest", str((out / MANIFEST).resolve()),
            "--data.reading.domain_column", "source",
            "--data.reading.pixel_size_column", PIXEL_SIZE_COLUMN,
        ]  # fmt: skip
        run = out / "adapt" / f"{domain}_run"
        shutil.rmtree(run, ignore_errors=True)
        adapted = adapt_checkpoint(
            tested,
            folder,
            output=out / "adapt" / f"{domain}.ckpt",
            data_flags=flags,
            overwrite=True,
            progress=False,
        )
        checkpoint = _copy_checkpoint(adapted, run)
        run_lld(
            [
                "test", *test_args, "--ckpt_path", str(checkpoint),
                "--data.domains.test", json.dumps([domain]),
                "--trainer.default_root_dir", str(run),
            ]
        )  # fmt: skip
        domains.update(json.loads((run / RESULTS_JSON).read_text()).get("domains", {}))
    results = {"domains": domains}
    (out / "run" / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _shifted_test_args(config_args: list[str], out: Path, datamodule: Any) -> list[str]:
    """The ``lld test`` arguments that read the shifted dataset written under ``out``."""
    return [
            *config_args,
            "--data.root", str(out),
            "--data.format", "yolo",
            "--data.attribute_spec", json.dumps(datamodule.attribute_spec),
            "--data.reading.manifest", MANIFEST,
            "--data.reading.domain_column", "source",
            "--data.reading.attribute_csv", "null",
            # The manifest is the one source of each image's pixel size: a config's sizes per
            # domain or default would give a zoomed copy the original's size, or an unknown one.
            "--data.reading.pixel_size_column", PIXEL_SIZE_COLUMN,
            "--data.pixel_size.by_domain", "null",
            "--data.pixel_size.default", "null",
            "--data.splits.test", "test",
            "--data.domains.test", "null",
            "--trainer.default_root_dir", str(out / "run"),
    ]  # fmt: skip


# -------------------------------------------------------------------------------------- loso
def _folder_name(source: str) -> str:
    return re.sub(r"[^\w.-]", "_", source)


def loso_row(results: dict, source: str, class_name: str) -> dict[str, Any]:
    """The held-out source's numbers and the mean over the trained-on sources' (each source
    weighs the same, whatever its number of test images)."""
    domains = results.get("domains", {})
    held_out = _scope_metrics(domains.get(source), class_name)
    others = [_scope_metrics(e, class_name) for d, e in domains.items() if d != source]
    others = [o for o in others if o is not None]
    in_source = {
        key: _mean([o.get(key) for o in others]) for key in ("class_ap50", *(k for k, _ in METRICS))
    }
    return {"held_out": held_out, "in_source": in_source if others else None}


def loso_table(rows: dict[str, dict], class_name: str) -> Table:
    """One row per held-out source: held-out / in-source for the class's AP@.5, mAP@.5, mAP."""
    table = Table(title="Leave one source out: held-out / mean of the training sources")
    table.add_column("held-out source")
    columns = (("class_ap50", f"{class_name} AP@.5"), *METRICS)
    for _, name in columns:
        table.add_column(name, justify="right")
    for source, row in rows.items():
        held, seen = row["held_out"] or {}, row["in_source"] or {}
        table.add_row(source, *(f"{_fmt(held.get(k))} / {_fmt(seen.get(k))}" for k, _ in columns))
    return table


def run_loso(args: argparse.Namespace, lld_args: list[str]) -> dict[str, Any]:
    """The ``loso`` protocol (see the module docstring); returns the loso.json content."""
    config_args = [arg for path in args.config for arg in ("--config", path)] + lld_args
    datamodule = load_data(config_args).datamodule
    class_names = list(datamodule.class_names)
    class_name = args.class_name or class_names[0]
    if class_name not in class_names:
        raise ToolError(f"--class_name {class_name!r} is not one of the data's {class_names}")
    records = datamodule.load_all_records()
    splits = datamodule.splits
    by_split: dict[str, set[str]] = {}
    for record in records:
        by_split.setdefault(record.split, set()).add(record.domain)
    train_sources = sorted(by_split.get(splits.train, set()))
    sources = list(dict.fromkeys(args.sources)) if args.sources else train_sources
    unknown = [s for s in sources if s not in train_sources]
    if unknown or len(train_sources) < 2:
        raise ToolError(f"sources {unknown or sources}: the training split has {train_sources}")
    val_sources = by_split.get(splits.val, set())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    runs: dict[str, str] = {}
    for source in sources:
        others = [s for s in train_sources if s != source]
        # Without a val split, val is held out of the (selected) training images.
        val = [s for s in others if s in val_sources] if val_sources else others
        root = out / _folder_name(source)
        Console(stderr=True).print(f"loso: held-out {source}: fit on {others}")
        run_lld(
            [
                "fit",
                *config_args,
                "--data.domains.train", json.dumps(others),
                "--data.domains.val", json.dumps(val),
                "--data.domains.test", "null",
                "--trainer.default_root_dir", str(root),
            ]
        )  # fmt: skip
        run = latest_run(root)
        if run is None:
            raise ToolError(f"the fit without {source} left no run in {root}")
        ckpt = run / "checkpoints" / f"{args.test_checkpoint}.ckpt"
        if not ckpt.is_file():
            ckpt = run / "checkpoints" / "last.ckpt"
        run_lld(
            [
                "test",
                *config_args,
                "--ckpt_path", str(ckpt),
                "--data.domains.test", "null",
                "--trainer.default_root_dir", str(root),
            ]
        )  # fmt: skip
        results = json.loads((run / RESULTS_JSON).read_text())
        rows[source] = loso_row(results, source, class_name)
        runs[source] = str(run)
    document = {"class_name": class_name, "sources": sources, "runs": runs, "results": rows}
    (out / LOSO_JSON).write_text(json.dumps(document, indent=2) + "\n")
    console = Console()
    console.print(loso_table(rows, class_name))
    console.print(f"loso: {out / LOSO_JSON}")
    return document


# ------------------------------------------------------------------------------ pixel size
def _resized(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def _relative_error(estimate: float, truth: float) -> float:
    return estimate / truth - 1.0


def pixel_size_variants(shifts: list[str], severities: list[int]) -> list[tuple[str, float, int]]:
    """(name, resize factor, severity) of every measured variant: as given, resized, shifted."""
    variants = [("as given", 1.0, 0)] + [(f"resized {f:g}x", f, 0) for f in RESIZES]
    return variants + [(_domain(s, v), 1.0, v) for s in shifts for v in severities]


def run_pixel_size(args: argparse.Namespace, lld_args: list[str]) -> dict[str, Any]:
    """The ``pixel_size`` protocol (see the module docstring); returns the pixel_size.json content."""
    import torch

    from lld_lightning.constants import RED_CELL_DIAMETER_UM
    from lld_lightning.data.red_cells import (
        evenly_spaced,
        median_red_cell_diameter,
        red_cell_diameters,
    )

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {out} is a file, not a folder")
    config_args = [arg for path in args.config for arg in ("--config", path)] + lld_args
    datamodule = load_data(config_args).datamodule
    by_domain: dict[str, list[ImageRecord]] = {}
    for record in _test_records(datamodule):
        if record.pixel_size_um is None:
            raise ToolError(
                f"{record.path}: no pixel size to compare with (give data.pixel_size.by_domain)"
            )
        by_domain.setdefault(record.domain, []).append(record)
    variants = pixel_size_variants(args.shifts, args.severities)
    results: dict[str, dict[str, Any]] = {}
    per_image: dict[str, list[float]] = {}
    with Progress(transient=True) as progress:
        total = sum(min(len(r), args.images) for r in by_domain.values()) * len(variants)
        task = progress.add_task("measuring red cells", total=total)
        for domain, records in sorted(by_domain.items()):
            chosen = evenly_spaced(records, args.images)
            images = [read_image(r.path).permute(1, 2, 0).numpy() for r in chosen]
            results[domain] = {}
            for name, factor, severity in variants:
                diameters, truths = [], []
                for index, (record, image) in enumerate(zip(chosen, images, strict=True)):
                    scale = factor
                    if severity:
                        shift = name.rsplit("-", 1)[0]
                        shifted = apply_shift(
                            shift, severity, image, record.boxes_xyxy, record.labels,
                            shift_seed(shift, severity, index),
                        )  # fmt: skip
                        image, scale = shifted.image, shifted.cell_scale
                    elif factor != 1.0:
                        image = _resized(image, factor)
                    pixels = torch.from_numpy(np.array(image, order="C"))  # a writable copy
                    diameters.append(red_cell_diameters(pixels.permute(2, 0, 1)))
                    truths.append(record.pixel_size_um / scale)
                    progress.advance(task)
                truth = float(np.median(truths))
                diameter = median_red_cell_diameter(torch.cat(diameters))
                value = RED_CELL_DIAMETER_UM / diameter if diameter > 0 else None
                results[domain][name] = {
                    "truth_um": truth,
                    "estimate_um": value,
                    "error": None if value is None else _relative_error(value, truth),
                    "cells": int(sum(d.numel() for d in diameters)),
                    "images": len(diameters),
                }
                if name == "as given":  # each image alone
                    per_image[domain] = [
                        abs(_relative_error(RED_CELL_DIAMETER_UM / d, t)) if d > 0 else math.inf
                        for d, t in zip(map(median_red_cell_diameter, diameters), truths, strict=True)
                    ]
    single = {
        domain: {
            "median_abs_error": float(np.median(errors)),
            "failed": int(sum(not math.isfinite(e) for e in errors)),
            "images": len(errors),
        }
        for domain, errors in per_image.items()
    }
    document = {
        "images_per_domain": args.images,
        "default_images_per_estimate": MAX_IMAGES,
        "pooled": results,
        "single_image": single,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / PIXEL_SIZE_JSON).write_text(json.dumps(document, indent=2) + "\n")
    console = Console()
    console.print(pixel_size_table(results, [v[0] for v in variants]))
    for domain, row in single.items():
        console.print(
            f"{domain}: one image at a time, median |error| {row['median_abs_error']:.0%}, "
            f"{row['failed']} of {row['images']} without a red cell"
        )
    console.print(f"pixel_size: {out / PIXEL_SIZE_JSON}")
    return document


def pixel_size_table(results: dict[str, dict[str, Any]], variants: list[str]) -> Table:
    """One row per variant, one column per domain: the estimate's relative error."""
    domains = sorted(results)
    table = Table(title="pixel-size estimate: error against the data's pixel size")
    table.add_column("images")
    for domain in domains:
        table.add_column(domain, justify="right")
    for variant in variants:
        cells = []
        for domain in domains:
            error = results[domain][variant]["error"]
            cells.append("no cells" if error is None else f"{error:+.0%}")
        table.add_row(variant, *cells)
    return table


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``shifts``, ``loso`` and ``pixel_size`` subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    epilog = "Other arguments (--data.*, --trainer.*, ...) go to every lld command."
    shifts = commands.add_parser(
        "shifts",
        help="test a checkpoint on the test images under every shift and severity",
        description="Write the test images under every shift and severity as one YOLO dataset "
        "(one domain each), then `lld test` the checkpoint on it.",
        epilog=epilog,
        allow_abbrev=False,
    )
    loso = commands.add_parser(
        "loso",
        help="leave one source out: fit without each source, test on all",
        description="For each source: `lld fit` on the other sources, `lld test` on all.",
        epilog=epilog,
        allow_abbrev=False,
    )
    pixel_size = commands.add_parser(
        "pixel_size",
        help="measure the red-cell pixel-size estimate on the test images (no model)",
        description="Estimate each test domain's pixel size from its red cells: as given, "
        "resized, and under every shift; compare with the pixel size the data gives.",
        epilog="Other arguments (--data.*) build the data as lld does.",
        allow_abbrev=False,
    )
    for sub in (shifts, loso, pixel_size):
        sub.add_argument(
            "--config", action="append", required=True,
            help="lld config file (repeat for overlays), as for `lld --config`",
        )  # fmt: skip
        sub.add_argument("--out", required=True, help="output folder")
    for sub in (shifts, loso):
        sub.add_argument(
            "--class_name",
            help="the class whose AP@.5 is reported (default: the first class, WBC on TXL-PBC)",
        )
    shifts.add_argument(
        "--ckpt_path", required=True,
        help="checkpoint to test; best or last: of the latest run in --trainer.default_root_dir",
    )  # fmt: skip
    for sub in (shifts, pixel_size):
        sub.add_argument(
            "--shifts", nargs="+", choices=SHIFTS, default=list(SHIFTS), help="the shifts to apply"
        )
        sub.add_argument(
            "--severities", nargs="+", type=int, choices=SEVERITIES, default=list(SEVERITIES),
            help="the severities of each shift",
        )  # fmt: skip
    pixel_size.add_argument(
        "--images", type=int, default=MAX_IMAGES,
        help="test images per domain, pooled into one estimate (evenly spaced)",
    )  # fmt: skip
    shifts.add_argument(
        "--adapt", action="store_true",
        help="adapt the checkpoint to each shifted domain's images (lld adapt) before testing it",
    )  # fmt: skip
    shifts.add_argument(
        "--pixel_size", choices=("known", "unknown"), default="known",
        help="known: each image's pixel size (divided by the shift's cell-size factor) goes in "
        "the manifest; unknown: the column stays empty",
    )  # fmt: skip
    loso.add_argument(
        "--sources",
        nargs="+",
        help="the sources to hold out in turn (default: every training source)",
    )
    loso.add_argument(
        "--test_checkpoint", choices=("best", "last"), default="best",
        help="which checkpoint of each fit is tested (last when there is no best)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run a protocol; a data or usage problem ends with one line (exit status 2)."""
    args, lld_args = build_parser().parse_known_args(argv)
    try:
        if args.command == "shifts":
            return run_shifts(args, lld_args)
        if args.command == "pixel_size":
            return run_pixel_size(args, lld_args)
        return run_loso(args, lld_args)
    except ToolError as error:
        print(f"robustness {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except DataError as error:
        print(f"robustness {args.command}: data error: {error_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
