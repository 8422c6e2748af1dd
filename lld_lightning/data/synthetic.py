"""Deterministic synthetic LLD-like data: blood-film fields with labelled white cells.

``generate(out, num_images)`` writes the LLD layout (``<domain>/images|labels/<split>/``), COCO
files (``Annotations/<split>.json``) and ``synthetic.json`` (arguments and counts, see
`is_generated`). The same arguments give byte-identical files: image ``i`` is drawn from a
generator seeded with ``(seed, i)`` alone. Cell cues and attributes: ``docs/synthetic.md``.

CLI: ``python -m lld_lightning.data.synthetic --out DIR --num-images N --seed S``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lld_lightning.constants import LLD_ATTRIBUTE_VALUES, LLD_CLASSES
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sparse import restrict_to_region
from lld_lightning.data.synthetic_cells import (
    BACKGROUND_COLOUR,
    WhiteCell,
    draw_red_cells,
    draw_white_cell,
    hide_attributes,
    sample_attributes,
    sample_radius,
)

#: Bumped whenever the drawing changes, so that `is_generated` rejects older folders.
GENERATOR_VERSION: int = 3
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Probability that a binary attribute value is marked missing in the labels.
MISSING_ATTRIBUTE_RATE: float = 0.05
#: WBCs drawn per field (before placement drops those that do not fit): leukaemic films are
#: crowded, and a denser field gives the sparse rectangle (1/5 of the image) a few labelled cells
#: to learn from. 6-16 gives about 3 labelled cells per 640 px training field and 11 cells per test
#: field.
MIN_WHITE_CELLS: int = 6
MAX_WHITE_CELLS: int = 16
MANIFEST_NAME: str = "synthetic.json"


@dataclass(frozen=True)
class SyntheticDomain:
    """An acquisition domain: how a microscope, magnification and camera alter the field.

    Attributes:
        name: LLD-style name ``{H|L}_{100x|40x|10x}_{C1|C2}``.
        cell_scale: geometric scale of every cell (0.6 for 40x against 100x).
        colour_gain: per-channel RGB gain (stain or camera cast).
        colour_offset: per-channel RGB offset added after the gain.
        blur_sigma: Gaussian blur in pixels (optics); 0 = sharp.
        noise_std: Gaussian sensor noise in grey levels; 0 = none.
        jpeg_quality: JPEG quality of the written file; ``None`` writes PNG.
    """

    name: str
    cell_scale: float = 1.0
    colour_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    colour_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    jpeg_quality: int | None = None

    @property
    def suffix(self) -> str:
        """Image file suffix, ``.jpg`` or ``.png``."""
        return ".png" if self.jpeg_quality is None else ".jpg"


DEFAULT_DOMAINS: tuple[SyntheticDomain, ...] = (
    SyntheticDomain("H_100x_C1"),
    SyntheticDomain(
        "H_100x_C2", colour_gain=(1.04, 0.98, 0.9), colour_offset=(4.0, 2.0, -4.0), jpeg_quality=80
    ),
    SyntheticDomain(
        "L_100x_C1",
        colour_gain=(0.97, 0.94, 1.02),
        colour_offset=(-2.0, -4.0, 3.0),
        blur_sigma=1.0,
        noise_std=4.0,
    ),
    SyntheticDomain(
        "L_40x_C2",
        cell_scale=0.6,
        colour_gain=(1.02, 0.97, 0.95),
        blur_sigma=0.8,
        noise_std=2.0,
        jpeg_quality=85,
    ),
)


def _image_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of image ``index``; ``stream`` separates independent uses (pixels, region)."""
    return np.random.default_rng([seed, index, stream])


def _place_cells(rng: np.random.Generator, cells: list[WhiteCell], width: int, height: int):
    """Give each cell a centre with its body inside the image and no overlap with other cells.

    Cells that find no free spot in a few dozen tries are dropped (the first always fits).
    """
    placed: list[WhiteCell] = []
    for cell in cells:
        r = cell.radius
        candidates = rng.uniform((r, r), (max(width - r, r + 1), max(height - r, r + 1)), (48, 2))
        if placed:
            centres = np.array([[c.cx, c.cy] for c in placed])  # [K, 2]
            reach = np.array([c.extent for c in placed])  # [K]
            gaps = np.linalg.norm(candidates[:, None] - centres[None], axis=2)  # [48, K]
            free = np.all(gaps > reach[None] + cell.extent + 2.0, axis=1)
        else:
            free = np.ones(len(candidates), dtype=bool)
        if free.any():
            cell.cx, cell.cy = (float(v) for v in candidates[int(np.argmax(free))])
            placed.append(cell)
    return placed


def _gaussian_blur(canvas: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float ``[H, W, 3]`` with edge padding (numpy only)."""
    radius = max(int(np.ceil(3 * sigma)), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        length = canvas.shape[axis]
        pad = [(0, 0)] * canvas.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(canvas, pad, mode="edge")
        blurred = taps[0] * padded.take(range(length), axis=axis)
        for k in range(1, 2 * radius + 1):
            blurred += taps[k] * padded.take(range(k, k + length), axis=axis)
        canvas = blurred
    return canvas


def _apply_domain(canvas: np.ndarray, domain: SyntheticDomain, rng: np.random.Generator):
    """Colour cast, optics blur and sensor noise of ``domain``: float ``[H, W, 3]`` -> uint8."""
    canvas *= np.asarray(domain.colour_gain, dtype=np.float32)
    canvas += np.asarray(domain.colour_offset, dtype=np.float32)
    if domain.blur_sigma > 0:
        canvas = _gaussian_blur(canvas, domain.blur_sigma)
    if domain.noise_std > 0:
        # Triangular noise (sum of two uniforms) has the requested std at a fraction of the cost
        # of normal draws and looks the same after quantisation.
        noise = rng.random(canvas.shape, dtype=np.float32)
        noise -= rng.random(canvas.shape, dtype=np.float32)
        canvas += noise * np.float32(domain.noise_std * np.sqrt(6.0))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def render_image(
    index: int,
    seed: int = 0,
    image_size: int = 640,
    domain: SyntheticDomain = DEFAULT_DOMAINS[0],
) -> tuple[np.ndarray, ImageRecord]:
    """Draw one fully annotated field of view.

    The JPEG compression of ``domain`` is applied when the file is written, not here.

    Args:
        index: image index; with ``seed`` it alone decides the pixels.
        seed: dataset seed.
        image_size: side of the square image in pixels.
        domain: acquisition domain.

    Returns:
        uint8 ``[H, W, 3]`` RGB image and its `ImageRecord` (boxes xyxy pixels, labels ``[N]``,
        attributes ``[N, 7]`` with ``IGNORE_INDEX`` where hidden, the whole image as region;
        ``path`` is the bare file name).
    """
    rng = _image_rng(seed, index)
    scale = image_size / 640.0 * domain.cell_scale
    illumination = 8.0 * (_smooth_field(rng, image_size) - 0.5)
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = np.asarray(BACKGROUND_COLOUR, dtype=np.float32)
    canvas += illumination[..., None]
    draw_red_cells(canvas, rng, scale)

    count = int(rng.integers(MIN_WHITE_CELLS, MAX_WHITE_CELLS + 1))
    labels = rng.integers(0, len(LLD_CLASSES), count)
    attributes = sample_attributes(rng, labels)
    cells = [
        WhiteCell(int(label), values, sample_radius(rng, int(values[0]), scale))
        for label, values in zip(labels, attributes, strict=True)
    ]
    cells = _place_cells(rng, cells, image_size, image_size)
    boxes = np.stack([draw_white_cell(canvas, cell, rng) for cell in cells])  # [N, 4]
    drawn = np.array([cell.attributes for cell in cells], dtype=np.int64)  # [N, 7]
    image = _apply_domain(canvas, domain, rng)

    record = ImageRecord(
        path=Path(f"{domain.name}_{index:05d}{domain.suffix}"),
        width=image_size,
        height=image_size,
        boxes_xyxy=boxes.astype(np.float32),
        labels=np.array([cell.label for cell in cells], dtype=np.int64),
        attributes=hide_attributes(rng, drawn, MISSING_ATTRIBUTE_RATE),
        domain=domain.name,
        image_id=index,
    )
    record.regions_xyxy = record.whole_image_region()
    return image, record


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency field in ``[0, 1]`` (uneven illumination), float32 ``[size, size]``.

    A random 4x4 grid bilinearly interpolated, written as ``weights @ grid @ weights.T``.
    """
    grid = rng.random((4, 4), dtype=np.float32)
    coords = np.linspace(0.0, 3.0, size, dtype=np.float32)
    i = np.minimum(coords.astype(np.int64), 2)
    f = coords - i
    weights = np.zeros((size, 4), dtype=np.float32)  # [size, 4] interpolation weights
    weights[np.arange(size), i] = 1 - f
    weights[np.arange(size), i + 1] = f
    return weights @ grid @ weights.T


def sparse_region(
    rng: np.random.Generator, record: ImageRecord, area_fraction: float
) -> np.ndarray:
    """One rectangle of ``area_fraction`` of the image around a randomly chosen cell.

    The aspect ratio is drawn log-uniformly within ``[0.5, 2]`` (narrowed so that the rectangle
    fits the image); the rectangle contains the chosen cell's centre and lies inside the image.

    Args:
        rng: random generator.
        record: a record with at least one cell.
        area_fraction: rectangle area / image area, in ``(0, 1]``.

    Returns:
        float32 ``[4]`` xyxy rectangle with integer corners.
    """
    width, height = record.width, record.height
    low = max(0.5, area_fraction * width / height)
    high = min(2.0, width / (area_fraction * height))
    aspect = float(np.exp(rng.uniform(np.log(low), np.log(max(high, low)))))
    area = area_fraction * width * height
    w = int(np.clip(round(np.sqrt(area * aspect)), 1, width))
    h = int(np.clip(round(np.sqrt(area / aspect)), 1, height))
    centres = (record.boxes_xyxy[:, :2] + record.boxes_xyxy[:, 2:]) / 2  # [N, 2]
    cx, cy = (int(np.floor(v)) for v in centres[int(rng.integers(len(centres)))])
    # Corners are integers with x1 <= cx < x1 + w: the chosen cell is kept (half-open test).
    x1 = int(rng.integers(max(cx - w + 1, 0), min(cx, width - w) + 1))
    y1 = int(rng.integers(max(cy - h + 1, 0), min(cy, height - h) + 1))
    return np.array([x1, y1, x1 + w, y1 + h], dtype=np.float32)


def split_counts(num_images: int, fractions: Sequence[float]) -> list[int]:
    """Images per split: largest remainders, then at least one per non-zero split when possible.

    >>> split_counts(10, (0.7, 0.15, 0.15))
    [7, 2, 1]
    >>> split_counts(2, (0.7, 0.15, 0.15))
    [1, 1, 0]
    """
    total = float(sum(fractions))
    exact = [num_images * f / total for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: (counts[k] - exact[k], k))
    for k in by_remainder[: num_images - sum(counts)]:
        counts[k] += 1
    for k, fraction in enumerate(fractions):  # split order is the priority order
        donor = int(np.argmax(counts))
        if fraction > 0 and counts[k] == 0 and counts[donor] > 1:
            counts[donor] -= 1
            counts[k] += 1
    return counts


def assign_splits(
    num_images: int, num_domains: int, fractions: Sequence[float], seed: int
) -> list[str]:
    """The split of every image index: per domain (round-robin), a seeded shuffle cut by counts."""
    splits = [""] * num_images
    for d in range(num_domains):
        indices = np.arange(d, num_images, num_domains)
        order = np.random.default_rng([seed, d, 1]).permutation(indices)
        counts = split_counts(len(indices), fractions)
        names = np.repeat(np.array(SPLITS[: len(counts)]), counts)
        for index, name in zip(order, names, strict=True):
            splits[int(index)] = str(name)
    return splits


@dataclass(frozen=True)
class _Task:
    index: int
    seed: int
    image_size: int
    domain: SyntheticDomain
    split: str
    sparse_fraction: float
    out: Path


def _make_image(task: _Task) -> ImageRecord:
    """Render, sparsify and write one image and its LLD label file; return its record."""
    from lld_lightning.data.formats.lld import write_lld_label_file

    image, record = render_image(task.index, task.seed, task.image_size, task.domain)
    if task.split == "train" and task.sparse_fraction > 0:
        region = sparse_region(_image_rng(task.seed, task.index, 1), record, task.sparse_fraction)
        record = restrict_to_region(record, region)
    stem = f"{task.domain.name}_{task.index:05d}"
    domain_dir = task.out / task.domain.name
    record.path = domain_dir / "images" / task.split / f"{stem}{task.domain.suffix}"
    record.label_path = domain_dir / "labels" / task.split / f"{stem}.txt"
    record.split = task.split
    record.path.parent.mkdir(parents=True, exist_ok=True)
    if task.domain.jpeg_quality is None:
        # Run-length zlib at a low level: same bytes every run, a fraction of the default's time.
        Image.fromarray(image).save(
            record.path, format="PNG", compress_level=3, compress_type=zlib.Z_RLE
        )
    else:
        Image.fromarray(image).save(record.path, format="JPEG", quality=task.domain.jpeg_quality)
    write_lld_label_file(record, record.label_path, region_order="xyxy")
    return record


def _arguments(
    num_images: int,
    seed: int,
    image_size: int,
    domains: Sequence[SyntheticDomain],
    split_fractions: Sequence[float],
    sparse_fraction: float,
) -> dict[str, Any]:
    """The arguments that decide the files, JSON-normalised (stored in ``synthetic.json``)."""
    arguments = {
        "version": GENERATOR_VERSION,
        "num_images": int(num_images),
        "seed": int(seed),
        "image_size": int(image_size),
        "domains": [asdict(domain) for domain in domains],
        "split_fractions": [float(f) for f in split_fractions],
        "sparse_fraction": float(sparse_fraction),
    }
    return json.loads(json.dumps(arguments))


def _check_arguments(
    num_images: int,
    image_size: int,
    domains: Sequence[SyntheticDomain],
    split_fractions: Sequence[float],
    sparse_fraction: float,
) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not domains:
        raise ValueError("at least one domain is needed")
    names = [domain.name for domain in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")
    if len(split_fractions) != len(SPLITS) or min(split_fractions) < 0 or sum(split_fractions) <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {split_fractions}")
    if not 0.0 <= sparse_fraction <= 1.0:
        raise ValueError(f"sparse_fraction must be in [0, 1], got {sparse_fraction}")


def generate(
    out: Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 640,
    domains: Sequence[SyntheticDomain] = DEFAULT_DOMAINS,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    sparse_fraction: float = 0.2,
    progress: bool = True,
    workers: int = 0,
) -> dict[str, Any]:
    """Write a synthetic LLD-like data set (LLD text, COCO and ``synthetic.json``) under ``out``.

    Images go round-robin over ``domains``; each domain is split by ``split_fractions``. Train
    images keep only the cells inside one rectangle of ``sparse_fraction`` of the image (0 = fully
    annotated); val and test images are always fully annotated. The manifest is written last, so
    an interrupted run is never taken as complete by `is_generated`.

    Args:
        out: output folder (created).
        num_images: total number of images.
        seed: dataset seed; the same arguments give byte-identical files.
        image_size: side of the square images in pixels.
        domains: acquisition domains.
        split_fractions: train/val/test fractions.
        sparse_fraction: annotated area fraction of train images; 0 = fully annotated.
        progress: show a Rich progress bar.
        workers: processes to render with (0 = this process); the output does not depend on it.

    Returns:
        counts: ``{"images": {split: n}, "cells": {split: n}, "domains": {domain: {split: n}}}``.
    """
    from lld_lightning.data.formats.coco import write_coco

    out = Path(out)
    domains = tuple(domains)
    _check_arguments(num_images, image_size, domains, split_fractions, sparse_fraction)
    splits = assign_splits(num_images, len(domains), split_fractions, seed)
    tasks = [
        _Task(i, seed, image_size, domains[i % len(domains)], splits[i], sparse_fraction, out)
        for i in range(num_images)
    ]
    records = _run_tasks(tasks, progress, workers)

    counts: dict[str, Any] = {
        "images": dict.fromkeys(SPLITS, 0),
        "cells": dict.fromkeys(SPLITS, 0),
        "domains": {domain.name: dict.fromkeys(SPLITS, 0) for domain in domains},
    }
    for record in records:
        counts["images"][record.split] += 1
        counts["cells"][record.split] += record.num_cells
        counts["domains"][record.domain][record.split] += 1
    for split in SPLITS:
        write_coco(
            [r for r in records if r.split == split],
            out / "Annotations" / f"{split}.json",
            images_root=out,
            class_names=LLD_CLASSES,
            attribute_spec=LLD_ATTRIBUTE_VALUES,
        )
    arguments = _arguments(num_images, seed, image_size, domains, split_fractions, sparse_fraction)
    manifest = {"arguments": arguments, "counts": counts}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return counts


def _run_tasks(tasks: list[_Task], progress: bool, workers: int) -> list[ImageRecord]:
    """Render every task (in order), optionally in worker processes, with a progress bar."""
    from rich.progress import Progress

    records: list[ImageRecord] = []
    with Progress(disable=not progress, transient=False) as bar:
        job = bar.add_task("synthetic images", total=len(tasks))
        if workers > 0:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for record in pool.map(_make_image, tasks, chunksize=4):
                    records.append(record)
                    bar.advance(job)
        else:
            for task in tasks:
                records.append(_make_image(task))
                bar.advance(job)
    return records


def is_generated(
    out: Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 640,
    domains: Sequence[SyntheticDomain] = DEFAULT_DOMAINS,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    sparse_fraction: float = 0.2,
    **_: Any,
) -> bool:
    """Whether ``out`` holds a complete data set written by `generate` with these arguments.

    Extra keyword arguments of `generate` that do not change the files (``progress``,
    ``workers``) are accepted and ignored.
    """
    manifest_path = Path(out) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = _arguments(
        num_images, seed, image_size, tuple(domains), split_fractions, sparse_fraction
    )
    if manifest.get("arguments") != wanted:
        return False
    return all((Path(out) / "Annotations" / f"{split}.json").is_file() for split in SPLITS)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lld_lightning.data.synthetic --out DIR --num-images N [--seed S] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m lld_lightning.data.synthetic",
        description="Write a deterministic synthetic LLD-like data set (LLD text + COCO).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num-images", type=int, required=True, help="total number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=640, help="square image side (px)")
    parser.add_argument(
        "--sparse-fraction",
        type=float,
        default=0.2,
        help="annotated area fraction of train images (0 = fully annotated)",
    )
    parser.add_argument("--workers", type=int, default=0, help="render processes (0 = none)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    counts = generate(
        args.out,
        num_images=args.num_images,
        seed=args.seed,
        image_size=args.image_size,
        sparse_fraction=args.sparse_fraction,
        progress=not args.no_progress,
        workers=args.workers,
    )
    images, cells = counts["images"], counts["cells"]
    summary = ", ".join(f"{s}: {images[s]} images / {cells[s]} cells" for s in SPLITS)
    print(f"wrote {sum(images.values())} images to {args.out} ({summary})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
