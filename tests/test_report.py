"""The predict report: the numbers of ``report.html`` are those of ``counts.csv``,
``summary.csv`` and ``detections.csv``; the page is self-contained and escapes what it shows; the
overlays stay as tall as the image, with a legend, at any image size."""

from __future__ import annotations

import csv
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from lld_lightning.callbacks.predict_writer import (
    PALETTE,
    PredictionWriter,
    overlay_sizes,
    render_overlay,
)
from lld_lightning.callbacks.report import (
    ALL_DOMAINS,
    COUNTS_FILE,
    MAX_GALLERY_CELLS,
    REPORT_FILE,
    SUMMARY_FILE,
    UNCERTAIN_ATTRIBUTE,
    UNCERTAIN_SCORE,
)
from lld_lightning.constants import LLD_ATTRIBUTE_SPEC

ODD = '<i>Odd & "cell"</i>'
CLASSES = ["None", "Neutrophil", "Lymphocyte", ODD]
MIN_SCORE = 0.3


class _Page(HTMLParser):
    """Counts tables (per image and per domain), images, gallery figures and visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.scope: tuple[str, str] | None = None
        self.row: list[str] | None = None
        self.row_class: str | None = None
        self.row_kind: str | None = None
        self.cell_text: str | None = None
        self.srcs: list[str] = []
        self.figures: Counter[tuple[str, str]] = Counter()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("data-image") is not None:
            self.scope = ("image", str(a["data-image"]))
        elif tag == "div" and a.get("class") == "summary":
            self.scope = ("domain", str(a["data-domain"]))
        elif tag == "tr" and self.scope is not None:
            self.row, self.row_class, self.row_kind = [], a.get("data-class"), a.get("class")
        elif tag in ("td", "th") and self.row is not None:
            self.cell_text = ""
        elif tag == "img":
            self.srcs.append(str(a.get("src")))
        elif tag == "figure" and self.scope is not None:
            self.figures[(self.scope[1], str(a.get("class")))] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.row is not None and self.cell_text is not None:
            self.row.append(self.cell_text)
            self.cell_text = None
        elif tag == "tr" and self.row is not None and self.scope is not None:
            table = self.tables.setdefault(self.scope, {"classes": {}})
            if self.row_class is not None:
                table["classes"][self.row_class] = (int(self.row[1]), self.row[2])
            elif self.row_kind in ("images", "total", "wbcs", "below"):
                table[self.row_kind] = int(self.row[1])
            self.row = None
        elif tag == "div" and self.scope is not None and self.scope[0] == "domain":
            self.scope = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.cell_text is not None:
            self.cell_text += data


def _prediction(path: Path, domain: str, labels: list[int], scores: list[float]) -> dict:
    """A hand-made `predict_step` result: cells on a grid, attribute probabilities from 0.55."""
    n = len(labels)
    boxes = torch.tensor([[10.0 + 12 * (j % 10), 10.0 + 12 * (j // 10), 0, 0] for j in range(n)])
    boxes[:, 2:] = boxes[:, :2] + 10
    attribute_scores = torch.full((n, len(LLD_ATTRIBUTE_SPEC)), 0.9)
    attribute_scores[::3, 0] = 0.55  # every third cell has an unsure attribute
    return {
        "boxes": boxes.reshape(n, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
        "attributes": torch.zeros(n, len(LLD_ATTRIBUTE_SPEC), dtype=torch.long),
        "attribute_scores": attribute_scores,
        "path": str(path),
        "width": 160,
        "height": 160,
        "domain": domain,
    }


def _predict(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Run the writer on three images in two domains, one with more cells than the gallery."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (160, 160), (200, 180, 190)).save(photos / name)
    many = 70
    preds = [
        _prediction(photos / "a.png", "lab&1", [1, 1, 2, 3, 0, 1], [0.9, 0.8, 0.45, 0.7, 0.6, 0.1]),
        _prediction(photos / "b.png", "lab&1", [2, 2], [0.95, 0.2]),
        _prediction(photos / "c.png", "<two>", [j % 4 for j in range(many)], [0.99] * many),
    ]
    out = tmp_path / "out"
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path),
        world_size=1,
        global_rank=0,
        is_global_zero=True,
        datamodule=SimpleNamespace(skip_report=None, predict_root=str(photos)),
    )
    module = SimpleNamespace(class_names=CLASSES, attribute_spec=dict(LLD_ATTRIBUTE_SPEC))
    writer = PredictionWriter(output_dir=str(out), min_score=MIN_SCORE, cell_iou=None)
    writer.write_on_epoch_end(trainer, module, [preds[:2], preds[2:]], [])  # type: ignore[arg-type]
    return out, preds


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_numbers_match_the_csv_files(tmp_path: Path) -> None:
    out, preds = _predict(tmp_path)
    page = _Page()
    page.feed((out / REPORT_FILE).read_text(encoding="utf-8"))
    detections = Counter((r["image"], r["class"]) for r in _read(out / "detections.csv"))
    counts = _read(out / COUNTS_FILE)
    assert len(counts) == len(preds) * len(CLASSES)
    for row in counts:
        image, name, count = row["image"], row["class"], int(row["count"])
        assert count == detections[(image, name)]
        assert page.tables[("image", image)]["classes"][name] == (count, row["percent_of_wbcs"])
    # Hand-checked: a.png keeps two Neutrophils, a Lymphocyte, an odd one and an artefact (None).
    a = page.tables[("image", preds[0]["path"])]
    assert a["classes"]["Neutrophil"] == (2, "50.0") and a["classes"]["None"] == (1, "")
    assert (a["total"], a["wbcs"], a["below"]) == (5, 4, 1)

    summary = _read(out / SUMMARY_FILE)
    domains = {ALL_DOMAINS: preds, "lab&1": preds[:2], "<two>": preds[2:]}
    assert {r["domain"] for r in summary} == set(domains)
    for row in summary:
        table = page.tables[("domain", row["domain"])]
        members = {p["path"] for p in domains[row["domain"]]}
        expected = sum(
            n
            for (image, name), n in detections.items()
            if image in members and name == row["class"]
        )
        assert int(row["count"]) == expected
        assert table["classes"][row["class"]] == (expected, row["percent_of_wbcs"])
        assert table["images"] == int(row["images"]) == len(members)
        below = sum(int((p["scores"] < MIN_SCORE).sum()) for p in domains[row["domain"]])
        assert table["below"] == int(row["below_threshold"]) == below
    assert page.tables[("domain", ALL_DOMAINS)]["total"] == sum(detections.values()) == 76


def test_report_is_self_contained_escaped_and_caps_the_gallery(tmp_path: Path) -> None:
    out, preds = _predict(tmp_path)
    text = (out / REPORT_FILE).read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    # Every image is embedded: 3 overlays and 5 + 1 + 60 crops, none read from a file or the web.
    assert len(page.srcs) == 3 + 5 + 1 + MAX_GALLERY_CELLS
    assert all(
        src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in page.srcs
    )
    assert 'src="http' not in text and str(tmp_path / "out") not in text
    assert "<script" not in text.lower()
    # Class and domain names are shown as text, never as markup.
    assert ODD not in text and "<two>" not in text and "lab&1" not in text
    visible = "".join(page.text)
    assert ODD in visible and "<two>" in visible and "lab&1" in visible
    # The gallery shows the cap and says how many it left out.
    c = preds[2]["path"]
    assert sum(n for (image, _), n in page.figures.items() if image == c) == MAX_GALLERY_CELLS
    assert f"{70 - MAX_GALLERY_CELLS} more cells not shown" in visible
    # Flagged: a.png's 0.45 cell (score) and its 1st and 4th detections (an attribute at 0.55),
    # and b.png's 1st (an attribute).
    assert UNCERTAIN_SCORE == 0.5 and UNCERTAIN_ATTRIBUTE == 0.6
    assert page.figures[(preds[0]["path"], "cell uncertain")] == 3
    assert page.figures[(preds[1]["path"], "cell uncertain")] == 1
    assert f"below {UNCERTAIN_SCORE:g}" in visible and f"below {UNCERTAIN_ATTRIBUTE:g}" in visible


def _cells(n: int, side: int, labels: list[int]) -> dict[str, torch.Tensor]:
    step = side / 12
    boxes = torch.tensor(
        [
            [
                (j % 10) * step,
                (j // 10 % 10) * step,
                (j % 10) * step + step,
                (j // 10 % 10) * step + step,
            ]
            for j in range(n)
        ]
    )
    return {
        "boxes": boxes,
        "scores": torch.linspace(0.99, 0.3, n),
        "labels": torch.tensor([labels[j % len(labels)] for j in range(n)]),
    }


def _colours(image: Image.Image) -> set[tuple[int, int, int]]:
    return {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}


def test_overlay_scales_with_the_image_and_never_grows_taller(tmp_path: Path) -> None:
    names = [f"class {i}" for i in range(14)]
    assert overlay_sizes(4000, 3000) == (13, 67)
    assert overlay_sizes(160, 120) == (2, 12)
    for (width, height), n in (((4000, 3000), 100), ((160, 120), 6)):
        image = Image.new("RGB", (width, height), (255, 255, 255))
        canvas = render_overlay(image, _cells(n, height, [1, 2]), names, "slide.png")
        assert canvas.height == height
        panel = canvas.crop((width, 0, canvas.width, height))
        # A side panel, narrower than 30 % of the large photo, with both classes' colours.
        assert 0 < panel.width < max(width * 0.3, 400)
        colours = _colours(panel)
        assert PALETTE[1] in colours and PALETTE[2] in colours and PALETTE[3] not in colours
    # The large photo's boxes are 13 px wide: the first box's left edge, then its inside.
    assert canvas.height == 120
    large = render_overlay(Image.new("RGB", (4000, 3000), "white"), _cells(1, 3000, [1]), names)
    assert large.getpixel((6, 200)) == PALETTE[1] and large.getpixel((20, 200)) == (255, 255, 255)
