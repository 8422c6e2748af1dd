"""The page a person reads after ``lld predict``: a self-contained ``report.html`` (the differential
count per image, per domain and over all images, each overlay, a gallery of the cells with their
attributes) and the same counts as ``counts.csv`` and ``summary.csv``."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lld_lightning.data.errors import DataError
from lld_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from lld_lightning.predictor import Cell

#: The report page, written in the predictions folder.
REPORT_FILE: str = "report.html"
#: Cells per image and class: ``image, domain, class, count, percent_of_wbcs``.
COUNTS_FILE: str = "counts.csv"
#: Cells per domain (and ``all``) and class, with the images and the cells below the threshold.
SUMMARY_FILE: str = "summary.csv"
#: The domain name of the rows over all images in `SUMMARY_FILE`.
ALL_DOMAINS: str = "all"
#: Classes that are not white blood cells (LLD's class 0 holds artefacts): counted, but not in
#: the percentages.
NOT_WBC_CLASSES: frozenset[str] = frozenset({"None"})
#: A cell scoring below this is flagged as uncertain.
UNCERTAIN_SCORE: float = 0.5
#: A cell with an attribute probability below this is flagged as uncertain.
UNCERTAIN_ATTRIBUTE: float = 0.6
#: Most cell crops shown per image (best scores first); the page says how many were left out.
MAX_GALLERY_CELLS: int = 60
#: Side of a cell crop in the gallery, in pixels.
CROP_SIDE: int = 96
#: Widest overlay embedded in the page (larger ones are shrunk; the full-size PNG stays on disk).
MAX_OVERLAY_WIDTH: int = 1200


@dataclass
class ImageResult:
    """One predicted image as the report shows it.

    Attributes:
        path: the image file.
        domain: its acquisition domain.
        cells: its cells at or above the confidence threshold, best first.
        below_threshold: detections left out because they score below the threshold.
        overlay: its overlay PNG, if one was drawn.
    """

    path: str
    domain: str
    cells: list[Cell]
    below_threshold: int = 0
    overlay: Path | None = None


def is_uncertain(cell: Cell) -> bool:
    """Whether a cell's class or one of its attributes is unsure (`UNCERTAIN_SCORE`,
    `UNCERTAIN_ATTRIBUTE`)."""
    return cell.score < UNCERTAIN_SCORE or any(
        prob < UNCERTAIN_ATTRIBUTE for _, prob in cell.attributes.values()
    )


def count_cells(cells: Sequence[Cell], class_names: Sequence[str]) -> dict[str, int]:
    """Cells per class (the differential count), every class, in class order."""
    counts = dict.fromkeys(class_names, 0)
    for cell in cells:
        counts[cell.class_name] += 1
    return counts


def percent_of_wbcs(counts: dict[str, int]) -> dict[str, float | None]:
    """Each class's share of the white blood cells in percent; None for `NOT_WBC_CLASSES` and
    when there is no WBC."""
    wbcs = sum(n for name, n in counts.items() if name not in NOT_WBC_CLASSES)
    return {
        name: None if name in NOT_WBC_CLASSES or wbcs == 0 else round(100.0 * n / wbcs, 1)
        for name, n in counts.items()
    }


def _percent_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _data_uri(image: Image.Image, kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=kind, quality=85)
    mime = "image/jpeg" if kind == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The cell with a margin of a quarter of its size, as a square thumbnail."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * 1.5
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    region = (
        max(0, int(cx - side / 2)),
        max(0, int(cy - side / 2)),
        min(image.width, int(cx + side / 2) + 1),
        min(image.height, int(cy + side / 2) + 1),
    )
    crop = image.crop(region)
    # Small cells are enlarged too: every crop has the same longer side.
    scale = CROP_SIDE / max(crop.width, crop.height, 1)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    return crop.resize(size, Image.Resampling.BICUBIC)


def _summaries(
    results: Sequence[ImageResult], class_names: Sequence[str]
) -> list[tuple[str, int, int, dict[str, int]]]:
    """``(domain, images, below threshold, counts)`` over all images, then per domain."""
    groups = [(ALL_DOMAINS, list(results))] + [
        (domain, [r for r in results if r.domain == domain])
        for domain in sorted({r.domain for r in results})
    ]
    out = []
    for domain, members in groups:
        counts = dict.fromkeys(class_names, 0)
        for result in members:
            for name, n in count_cells(result.cells, class_names).items():
                counts[name] += n
        out.append((domain, len(members), sum(r.below_threshold for r in members), counts))
    return out


def write_counts(
    results: Sequence[ImageResult], class_names: Sequence[str], folder: Path
) -> tuple[Path, Path]:
    """Write `COUNTS_FILE` (per image and class) and `SUMMARY_FILE` (per domain and class)."""
    counts_path, summary_path = folder / COUNTS_FILE, folder / SUMMARY_FILE
    with open(counts_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "domain", "class", "count", "percent_of_wbcs"])
        for result in results:
            counts = count_cells(result.cells, class_names)
            percent = percent_of_wbcs(counts)
            for name, n in counts.items():
                writer.writerow([result.path, result.domain, name, n, _percent_text(percent[name])])
    with open(summary_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["domain", "images", "below_threshold", "class", "count", "percent_of_wbcs"]
        )
        for domain, images, below, counts in _summaries(results, class_names):
            percent = percent_of_wbcs(counts)
            for name, n in counts.items():
                writer.writerow([domain, images, below, name, n, _percent_text(percent[name])])
    return counts_path, summary_path


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.counts { border-collapse: collapse; margin: 0.5em 0 1em 0; }
table.counts td, table.counts th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
table.counts td:first-child, table.counts th:first-child { text-align: left; }
tr.zero td { color: #aaa; }
section.image { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
img.overlay { max-width: 100%; height: auto; border: 1px solid #ccc; flex: 0 1 auto; min-width: 0; }
div.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
figure.cell { margin: 0; width: 200px; border: 1px solid #ccc; padding: 3px; font-size: 11px; }
div.row { display: flex; flex-wrap: nowrap; gap: 1.5em; align-items: flex-start; }
figure.cell ul { margin: 2px 0; padding-left: 12px; }
figure.uncertain { border: 2px solid #d62728; background: #fff3f3; }
span.flag { color: #d62728; font-weight: bold; }
span.low { color: #d62728; }
p.legend { background: #f4f4f4; padding: 0.5em; font-size: 90%; }
""" + (
    f"div.crop {{ height: {CROP_SIDE}px; display: flex; align-items: center; "
    "justify-content: center; }"
)


def _counts_table(counts: dict[str, int], below: int, images: int | None = None) -> str:
    percent = percent_of_wbcs(counts)
    rows = [
        f'<tr class="{"zero" if n == 0 else "count"}" data-class="{html.escape(name)}">'
        f"<td>{html.escape(name)}</td><td>{n}</td><td>{_percent_text(percent[name])}</td></tr>"
        for name, n in counts.items()
    ]
    total = sum(counts.values())
    wbcs = sum(n for name, n in counts.items() if name not in NOT_WBC_CLASSES)
    footer = [
        f'<tr class="total"><th>all cells</th><th>{total}</th><th></th></tr>',
        f'<tr class="wbcs"><th>white blood cells</th><th>{wbcs}</th><th>100.0</th></tr>'
        if wbcs
        else f'<tr class="wbcs"><th>white blood cells</th><th>{wbcs}</th><th></th></tr>',
        f'<tr class="below"><th>below threshold (not counted)</th><th>{below}</th><th></th></tr>',
    ]
    if images is not None:
        footer.insert(0, f'<tr class="images"><th>images</th><th>{images}</th><th></th></tr>')
    return (
        '<table class="counts"><tr><th>class</th><th>cells</th><th>% of WBCs</th></tr>'
        + "".join(rows + footer)
        + "</table>"
    )


def _cell_figure(number: int, cell: Cell, crop: Image.Image | None) -> str:
    uncertain = is_uncertain(cell)
    score = (
        f'<span class="low">{cell.score:.2f}</span>'
        if cell.score < UNCERTAIN_SCORE
        else f"{cell.score:.2f}"
    )
    attributes = "".join(
        f"<li>{html.escape(name.replace('_', ' '))}: {html.escape(value)} "
        + (f'<span class="low">{prob:.2f}</span>' if prob < UNCERTAIN_ATTRIBUTE else f"{prob:.2f}")
        + "</li>"
        for name, (value, prob) in cell.attributes.items()
    )
    image = (
        f'<div class="crop"><img src="{_data_uri(crop)}" alt="cell {number}"></div>'
        if crop is not None
        else ""
    )
    flag = ' <span class="flag">uncertain</span>' if uncertain else ""
    return (
        f'<figure class="cell{" uncertain" if uncertain else ""}">{image}<figcaption>'
        f"<b>#{number} {html.escape(cell.class_name)}</b> {score}{flag}"
        f"<ul>{attributes}</ul></figcaption></figure>"
    )


def _image_section(
    result: ImageResult,
    class_names: Sequence[str],
    min_score: float,
    max_image_pixels: int,
) -> str:
    name = html.escape(result.path)
    parts = [
        f'<section class="image" data-image="{name}" data-domain="{html.escape(result.domain)}">',
        f"<h2>{name}</h2><p>domain: {html.escape(result.domain)} · "
        f"{len(result.cells)} cells at score ≥ {min_score:g}</p>",
        '<div class="row">',
        _counts_table(count_cells(result.cells, class_names), result.below_threshold),
    ]
    if result.overlay is not None and result.overlay.is_file():
        with Image.open(result.overlay) as overlay:
            overlay.thumbnail((MAX_OVERLAY_WIDTH, MAX_OVERLAY_WIDTH * 4))
            parts.append(
                f'<img class="overlay" src="{_data_uri(overlay)}" alt="overlay of {name}">'
            )
    parts.append("</div>")
    source = None
    try:
        source = Image.fromarray(read_image(result.path, max_image_pixels).permute(1, 2, 0).numpy())
    except (DataError, OSError) as error:
        parts.append(f"<p>cell crops not shown: {html.escape(str(error))}</p>")
    shown = result.cells[:MAX_GALLERY_CELLS]
    parts.append('<div class="gallery">')
    for j, cell in enumerate(shown):
        crop = _crop(source, cell.box) if source is not None else None
        parts.append(_cell_figure(j + 1, cell, crop))
    parts.append("</div>")
    left_out = len(result.cells) - len(shown)
    if left_out:
        parts.append(
            f'<p class="left-out">{left_out} more cells not shown (the gallery shows the '
            f"{MAX_GALLERY_CELLS} best scores; all are in detections.csv).</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def write_report(
    results: Sequence[ImageResult],
    class_names: Sequence[str],
    folder: Path,
    min_score: float,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Path:
    """Write `REPORT_FILE`, `COUNTS_FILE` and `SUMMARY_FILE` into ``folder``.

    Args:
        results: the predicted images, in the order to show.
        class_names: every class, in class order (the tables list all of them).
        folder: the predictions folder.
        min_score: the confidence threshold the cells were selected with.
        max_image_pixels: decode limit for reading the images again for the crops.

    Returns:
        The report's path.
    """
    write_counts(results, class_names, folder)
    summary = []
    for domain, images, below, counts in _summaries(results, class_names):
        title = "All images" if domain == ALL_DOMAINS else f"Domain {domain}"
        summary.append(
            f'<div class="summary" data-domain="{html.escape(domain)}">'
            f"<h3>{html.escape(title)}</h3>{_counts_table(counts, below, images)}</div>"
        )
    legend = (
        f'<p class="legend">Cells are counted when their score is at least {min_score:g}; '
        f"detections below that are only counted as “below the confidence threshold”. "
        f"% of WBCs leaves out {html.escape(', '.join(sorted(NOT_WBC_CLASSES)))} (artefacts). "
        f'A cell is flagged <span class="flag">uncertain</span> (red frame) when its score is '
        f"below {UNCERTAIN_SCORE:g} or an attribute's probability is below "
        f"{UNCERTAIN_ATTRIBUTE:g}; such values are red. Each gallery shows at most "
        f"{MAX_GALLERY_CELLS} cells per image, best scores first, numbered as on the overlay. "
        f"The counts are also in {COUNTS_FILE} and {SUMMARY_FILE}.</p>"
    )
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>lld predict report</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lld predict: {len(results)} images</h1>",
        legend,
        '<div style="display:flex;flex-wrap:wrap;gap:2em">',
        *summary,
        "</div>",
        *(_image_section(r, class_names, min_score, max_image_pixels) for r in results),
        "</body></html>",
    ]
    path = folder / REPORT_FILE
    path.write_text("\n".join(body), encoding="utf-8")
    return path
