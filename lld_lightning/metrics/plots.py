"""PNG plots of test results drawn with PIL (matplotlib is not a dependency): PR curves, confusion
matrices, per-domain mAP bars."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

#: Line and bar colours, distinct on white; cycled when there are more series.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 0, 0),
    (0, 128, 128),
    (128, 128, 0),
)
BLACK, GREY, WHITE = (0, 0, 0), (200, 200, 200), (255, 255, 255)
FONT_SIZE = 14


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _axes(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    x_label: str,
    y_label: str,
    title: str,
    x_ticks: list[tuple[float, str]] | None,
) -> None:
    """Frame, 0..1 y grid with labels, optional x ticks (fractions of the width), titles."""
    left, top, right, bottom = box
    font = _font()
    for i in range(6):
        y = bottom - (bottom - top) * i / 5
        draw.line([(left, y), (right, y)], fill=GREY)
        label = f"{i / 5:.1f}"
        w, h = _text_size(draw, label, font)
        draw.text((left - w - 6, y - h / 2 - 2), label, fill=BLACK, font=font)
    for fraction, label in x_ticks or []:
        x = left + (right - left) * fraction
        draw.line([(x, bottom), (x, bottom + 4)], fill=BLACK)
        w, _ = _text_size(draw, label, font)
        draw.text((x - w / 2, bottom + 6), label, fill=BLACK, font=font)
    draw.rectangle(box, outline=BLACK)
    w, _ = _text_size(draw, x_label, font)
    draw.text(((left + right - w) / 2, bottom + 28), x_label, fill=BLACK, font=font)
    draw.text((8, top - 26), y_label, fill=BLACK, font=font)
    title_font = _font(FONT_SIZE + 4)
    w, _ = _text_size(draw, title, title_font)
    draw.text(((left + right - w) / 2, 10), title, fill=BLACK, font=title_font)


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, entries: list[tuple[str, tuple]]) -> None:
    font = _font()
    for i, (label, colour) in enumerate(entries):
        top = y + i * 20
        draw.rectangle([x, top + 3, x + 14, top + 15], fill=colour)
        draw.text((x + 20, top), label, fill=BLACK, font=font)


def pr_curves_plot(
    recall: list[float], curves: dict[str, list[float]], aps: dict[str, float], title: str
) -> Image.Image:
    """Precision-recall curves, one line per class, legend with each class's AP.

    Args:
        recall: the x values (COCO's recall points in ``[0, 1]``).
        curves: ``{class name: precision at each recall point}``.
        aps: ``{class name: AP}`` for the legend (a class missing here shows no number).
        title: figure title.
    """
    width, height = 900, 560
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    box = (70, 50, 620, height - 70)
    ticks = [(i / 5, f"{i / 5:.1f}") for i in range(6)]
    _axes(draw, box, "recall", "precision", title, ticks)
    left, top, right, bottom = box
    entries = []
    for i, (name, precision) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [
            (left + (right - left) * r, bottom - (bottom - top) * p)
            for r, p in zip(recall, precision, strict=True)
        ]
        draw.line(points, fill=colour, width=2)
        ap = aps.get(name)
        entries.append((name if ap is None else f"{name}  AP {ap:.3f}", colour))
    _legend(draw, right + 20, top, entries)
    return image


def confusion_matrix_plot(
    matrix: list[list[int]], value_names: list[str], title: str
) -> Image.Image:
    """A confusion matrix: counts in each cell, shaded by the fraction of the true value's row.

    Args:
        matrix: ``[K][K]`` counts, rows = true value, columns = predicted value.
        value_names: ``K`` names of the values.
        title: figure title.
    """
    size = len(matrix)
    cell = 90
    font = _font()
    label_width = max(
        [_text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), n, font)[0] for n in value_names]
        + [40]
    )
    left, top = label_width + 40, 80
    width = max(left + cell * size + 30, 360)
    height = top + cell * size + 20
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    title_font = _font(FONT_SIZE + 4)
    draw.text((10, 10), title, fill=BLACK, font=title_font)
    draw.text((left, top - 44), "predicted", fill=BLACK, font=font)
    draw.text((10, top - 44), "true", fill=BLACK, font=font)
    for i, row in enumerate(matrix):
        total = max(1, sum(row))
        for j, count in enumerate(row):
            shade = int(255 * (1 - 0.8 * count / total))
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=(shade, shade, 255), outline=BLACK)
            text = str(count)
            w, h = _text_size(draw, text, font)
            draw.text((x0 + (cell - w) / 2, y0 + (cell - h) / 2 - 2), text, fill=BLACK, font=font)
    for k, name in enumerate(value_names):
        w, h = _text_size(draw, name, font)
        draw.text((left - w - 8, top + k * cell + (cell - h) / 2 - 2), name, fill=BLACK, font=font)
        x = left + k * cell + (cell - min(w, cell)) / 2
        draw.text((x, top - 22), name[:12], fill=BLACK, font=font)
    return image


def domain_bars_plot(values: dict[str, dict[str, float]], title: str) -> Image.Image:
    """Grouped bars: per scope (domain, then ``all``) one bar per metric, values in ``[0, 1]``.

    Args:
        values: ``{scope: {metric label: value}}``, the same labels in every scope.
        title: figure title.
    """
    scopes = list(values)
    labels = list(dict.fromkeys(label for v in values.values() for label in v))
    group = 24 * max(1, len(labels)) + 40
    width = max(560, 90 + group * len(scopes) + 180)
    height = 480
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    box = (70, 50, 70 + group * max(1, len(scopes)), height - 90)
    left, top, right, bottom = box
    ticks = [((i + 0.5) / max(1, len(scopes)), scope) for i, scope in enumerate(scopes)]
    _axes(draw, box, "domain", "value", title, ticks)
    font = _font(FONT_SIZE - 3)
    for i, scope in enumerate(scopes):
        for j, label in enumerate(labels):
            value = values[scope].get(label)
            if value is None:
                continue
            x0 = left + i * group + 20 + j * 24
            y0 = bottom - (bottom - top) * min(max(value, 0.0), 1.0)
            draw.rectangle([x0, y0, x0 + 20, bottom], fill=PALETTE[j % len(PALETTE)])
            draw.text((x0, y0 - 14), f"{value:.2f}", fill=BLACK, font=font)
    _legend(
        draw,
        right + 20,
        top,
        [(label, PALETTE[j % len(PALETTE)]) for j, label in enumerate(labels)],
    )
    return image
