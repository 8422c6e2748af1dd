"""Drawing of synthetic blood-film cells for `synthetic.py`.

Red cells are unlabelled background clutter. A white cell's class is drawn by class cues (granules,
nucleus layout, outline, inclusions) and each of its seven attributes by its own pixel cue, chosen
independently of the class (see ``docs/synthetic.md``), so that a model can learn both.

Every function draws into a small float32 patch around one cell (never the whole image) with
vectorised numpy and takes its randomness from the caller's ``numpy.random.Generator``, so that an
image is reproducible from its seed. Lengths are in pixels of the image being drawn; ``R`` is a
white cell's body radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lld_lightning.constants import IGNORE_INDEX, LLD_ATTRIBUTE_SPEC, LLD_CLASSES

Colour = tuple[float, float, float]

#: Attribute names in label-file order (column index = position).
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(LLD_ATTRIBUTE_SPEC)

#: Body radius ranges (pixels of a 640 px, 100x field) of the three ``cell_size`` values. The gaps
#: between ranges keep the sizes separable after the 40x scale and a 2x downscale.
SIZE_RADII: tuple[tuple[float, float], ...] = ((22.0, 27.0), (34.0, 40.0), (48.0, 56.0))
#: Red cell radius (pixels of a 640 px, 100x field).
RED_CELL_RADIUS: float = 20.0
BACKGROUND_COLOUR: Colour = (238.0, 230.0, 226.0)

#: Nucleus radius / cell radius for ``cytoplasm`` = scanty (0) and abundant (1).
NUCLEUS_RATIO: tuple[float, float] = (0.78, 0.52)
#: Chromatin colours: open = smooth light purple; coarse = dark clumps on a lighter ground.
OPEN_CHROMATIN: Colour = (165.0, 122.0, 190.0)
COARSE_CHROMATIN_DARK: Colour = (52.0, 24.0, 82.0)
COARSE_CHROMATIN_LIGHT: Colour = (135.0, 95.0, 160.0)
NUCLEOLUS_COLOUR: Colour = (206.0, 200.0, 234.0)
#: Cytoplasm colours for ``cytoplasmic_basophilia`` slight (0) and moderate (1).
CYTOPLASM_COLOURS: tuple[Colour, Colour] = ((214.0, 194.0, 202.0), (128.0, 156.0, 214.0))
VACUOLE_COLOUR: Colour = (254.0, 254.0, 255.0)
AUER_ROD_COLOUR: Colour = (222.0, 30.0, 118.0)
FRINGE_COLOUR: Colour = (62.0, 78.0, 140.0)
HALO_COLOUR: Colour = (232.0, 222.0, 228.0)
SMUDGE_COLOUR: Colour = (150.0, 108.0, 176.0)


@dataclass(frozen=True)
class GranuleStyle:
    """Cytoplasmic granules: round dots on a jittered grid.

    Attributes:
        colour: RGB of a granule.
        radius: granule radius as a fraction of ``R``.
        min_radius_px: lower bound of the radius in pixels (small cells, 40x).
        presence: probability that a grid cell holds a granule (density).
        over_nucleus: granules also cover the nucleus (basophil).
    """

    colour: Colour
    radius: float
    min_radius_px: float
    presence: float
    over_nucleus: bool = False


GRANULE_STYLES: dict[str, GranuleStyle] = {
    "fine_lilac": GranuleStyle((186.0, 112.0, 196.0), 0.035, 0.9, 0.85),
    "fine_salmon": GranuleStyle((240.0, 148.0, 112.0), 0.045, 1.0, 0.75),
    "medium_olive": GranuleStyle((118.0, 98.0, 48.0), 0.06, 1.2, 0.55),
    "sparse_azurophil": GranuleStyle((205.0, 28.0, 96.0), 0.07, 1.3, 0.2),
    "coarse_magenta": GranuleStyle((160.0, 22.0, 108.0), 0.075, 1.4, 0.85),
    "coarse_orange": GranuleStyle((246.0, 118.0, 40.0), 0.085, 1.5, 0.9),
    "coarse_black": GranuleStyle((36.0, 18.0, 62.0), 0.09, 1.5, 0.5, over_nucleus=True),
    "grey_dust": GranuleStyle((112.0, 112.0, 128.0), 0.03, 0.8, 0.65),
}


@dataclass(frozen=True)
class ClassCue:
    """The pixel cues of one class; none of them is an attribute cue.

    Attributes:
        nucleus: layout ``round``, ``ring``, ``kidney``, ``bilobed``, ``segmented`` or ``band``.
        granules: a `GRANULE_STYLES` key, or ``""`` for none.
        outline: ``round``, ``scalloped``, ``polygon``, ``blebs``, ``tail`` or ``ragged``.
        auer_rods: number of Auer rods (magenta needles).
        eccentric: the nucleus sits against the membrane, with a pale Golgi halo beside it.
        fringe: a dark blue border band (peripheral basophilia of reactive lymphocytes).
        smudge: radial strands smeared out of the cell (artifact).
    """

    nucleus: str = "round"
    granules: str = ""
    outline: str = "round"
    auer_rods: int = 0
    eccentric: bool = False
    fringe: bool = False
    smudge: bool = False


#: Class cues, index = class id of `LLD_CLASSES` (the table in docs/synthetic.md).
CLASS_CUES: tuple[ClassCue, ...] = (
    ClassCue(outline="ragged", smudge=True),  # None (artifact)
    ClassCue(auer_rods=1),  # Myeloblast
    ClassCue(),  # Lymphoblast: the plain cell, no cue at all
    ClassCue(nucleus="segmented", granules="fine_lilac"),  # Neutrophil
    ClassCue(outline="scalloped", fringe=True),  # Atypical lymphocyte
    ClassCue(nucleus="ring", granules="sparse_azurophil"),  # Promonocyte
    ClassCue(outline="blebs"),  # Monoblast
    ClassCue(outline="tail"),  # Lymphocyte
    ClassCue(granules="medium_olive", eccentric=True),  # Myelocyte
    ClassCue(granules="coarse_magenta", auer_rods=4),  # Abnormal promyelocyte
    ClassCue(nucleus="kidney", granules="grey_dust", outline="polygon"),  # Monocyte
    ClassCue(nucleus="band", granules="fine_salmon"),  # Metamyelocyte
    ClassCue(nucleus="bilobed", granules="coarse_orange"),  # Eosinophil
    ClassCue(granules="coarse_black"),  # Basophil
)

#: How far (in ``R``) each outline reaches from the centre; used for placement and patch size.
OUTLINE_EXTENT: dict[str, float] = {
    "round": 1.06,
    "scalloped": 1.06,
    "polygon": 1.1,
    "ragged": 1.2,
    "blebs": 1.45,
    "tail": 1.92,
}
SMUDGE_EXTENT: float = 1.42

#: ``P(cell_size = small, medium, large)`` per class (rows sum to 1, every value >= 0.15).
SIZE_PRIORS: np.ndarray = np.array(
    [
        [0.40, 0.35, 0.25],
        [0.20, 0.45, 0.35],
        [0.35, 0.45, 0.20],
        [0.20, 0.60, 0.20],
        [0.20, 0.45, 0.35],
        [0.15, 0.40, 0.45],
        [0.15, 0.35, 0.50],
        [0.70, 0.15, 0.15],
        [0.20, 0.50, 0.30],
        [0.15, 0.40, 0.45],
        [0.15, 0.40, 0.45],
        [0.20, 0.60, 0.20],
        [0.20, 0.60, 0.20],
        [0.35, 0.50, 0.15],
    ]
)
#: ``P(value = 1)`` of the six binary attributes per class, all within [0.15, 0.85]: columns are
#: chromatin coarse, shape irregular, nucleolus prominent, cytoplasm abundant, basophilia
#: moderate, vacuoles prominent.
BINARY_PRIORS: np.ndarray = np.array(
    [
        [0.50, 0.60, 0.20, 0.50, 0.30, 0.30],
        [0.20, 0.30, 0.80, 0.30, 0.75, 0.20],
        [0.20, 0.40, 0.70, 0.20, 0.70, 0.20],
        [0.80, 0.70, 0.15, 0.80, 0.20, 0.20],
        [0.45, 0.50, 0.30, 0.75, 0.80, 0.30],
        [0.30, 0.70, 0.55, 0.65, 0.60, 0.35],
        [0.20, 0.40, 0.80, 0.70, 0.70, 0.35],
        [0.85, 0.20, 0.15, 0.20, 0.40, 0.15],
        [0.60, 0.35, 0.25, 0.80, 0.30, 0.20],
        [0.35, 0.60, 0.50, 0.75, 0.40, 0.20],
        [0.40, 0.80, 0.20, 0.85, 0.40, 0.60],
        [0.75, 0.70, 0.15, 0.80, 0.20, 0.15],
        [0.75, 0.60, 0.15, 0.80, 0.20, 0.15],
        [0.70, 0.60, 0.15, 0.70, 0.30, 0.20],
    ]
)

assert len(CLASS_CUES) == len(LLD_CLASSES) == SIZE_PRIORS.shape[0] == BINARY_PRIORS.shape[0]
assert BINARY_PRIORS.shape[1] == len(ATTRIBUTE_NAMES) - 1


@dataclass
class WhiteCell:
    """One white cell to draw.

    Attributes:
        label: class id.
        attributes: int64 ``[7]`` rendered attribute values (never missing: what the pixels show).
        radius: body radius ``R`` in pixels.
        cx: centre x in pixels.
        cy: centre y in pixels.
    """

    label: int
    attributes: np.ndarray
    radius: float
    cx: float = 0.0
    cy: float = 0.0

    @property
    def extent(self) -> float:
        """Farthest reach of the drawn cell from its centre, in pixels."""
        cue = CLASS_CUES[self.label]
        reach = max(OUTLINE_EXTENT[cue.outline], SMUDGE_EXTENT if cue.smudge else 0.0)
        return reach * self.radius


def sample_attributes(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Draw every attribute from its class prior.

    Args:
        rng: random generator.
        labels: int64 ``[N]`` class ids.

    Returns:
        int64 ``[N, 7]`` attribute values (none missing).
    """
    n = labels.shape[0]
    cumulative = np.cumsum(SIZE_PRIORS[labels], axis=1)  # [N, 3]
    sizes = (rng.random((n, 1)) > cumulative[:, :-1]).sum(axis=1)
    binary = rng.random((n, BINARY_PRIORS.shape[1])) < BINARY_PRIORS[labels]  # [N, 6]
    return np.concatenate([sizes[:, None], binary], axis=1).astype(np.int64)


def hide_attributes(
    rng: np.random.Generator, attributes: np.ndarray, p_missing: float
) -> np.ndarray:
    """Mark each binary attribute missing (``IGNORE_INDEX``) with probability ``p_missing``.

    ``cell_size`` (column 0) is never hidden.

    Args:
        rng: random generator.
        attributes: int64 ``[N, 7]``.
        p_missing: probability per value.

    Returns:
        int64 ``[N, 7]`` copy with missing values.
    """
    hidden = attributes.copy()
    missing = rng.random(hidden.shape) < p_missing
    missing[:, 0] = False
    hidden[missing] = IGNORE_INDEX
    return hidden


def sample_radius(rng: np.random.Generator, size: int, scale: float) -> float:
    """A body radius in pixels for ``cell_size`` value ``size`` at geometric ``scale``."""
    low, high = SIZE_RADII[size]
    return float(rng.uniform(low, high) * scale)


# --- patch helpers ------------------------------------------------------------------------------


def _patch(shape: tuple[int, ...], cx: float, cy: float, half: float):
    """Pixel window around ``(cx, cy)`` clipped to the image, with centre-relative coordinates.

    Returns:
        ``(y0, y1, x0, x1)`` and float32 ``X [1, w]``, ``Y [h, 1]`` of the pixel centres.
    """
    height, width = shape[:2]
    x0, x1 = max(int(np.floor(cx - half)), 0), min(int(np.ceil(cx + half)) + 1, width)
    y0, y1 = max(int(np.floor(cy - half)), 0), min(int(np.ceil(cy + half)) + 1, height)
    xs = np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx)
    ys = np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy)
    return (y0, y1, x0, x1), xs[None, :], ys[:, None]


def _alpha(signed_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (pixels, positive inside)."""
    return np.clip(signed_inside + 0.5, 0.0, 1.0)


def _over(patch: np.ndarray, colour, alpha: np.ndarray) -> None:
    """Alpha-composite ``colour`` (``[3]`` or ``[h, w, 3]``) over ``patch`` in place."""
    a = alpha[..., None]
    patch *= 1.0 - a
    patch += a * np.asarray(colour, dtype=np.float32)


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth noise in ``[0, 1]``: a random grid of spacing ``cell_px`` bilinearly interpolated."""
    height, width = shape
    cell_px = max(float(cell_px), 1.0)
    grid = rng.random((int(height / cell_px) + 3, int(width / cell_px) + 3), dtype=np.float32)
    ys = np.arange(height, dtype=np.float32) / cell_px + rng.random(dtype=np.float32)
    xs = np.arange(width, dtype=np.float32) / cell_px + rng.random(dtype=np.float32)
    iy, ix = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = ys - iy, xs - ix
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _segment_distance(x, y, ax: float, ay: float, bx: float, by: float) -> np.ndarray:
    """Distance from points ``(x, y)`` to the segment ``a-b``."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy)


def _dots(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, radius: float, presence: float
) -> np.ndarray:
    """Coverage of round dots of ``radius`` px, one per jittered grid cell with prob ``presence``."""
    spacing = 2.4 * radius + 0.6
    x, y = x + rng.uniform(0, spacing), y + rng.uniform(0, spacing)
    ix, iy = np.floor(x / spacing), np.floor(y / spacing)
    gx0, gy0 = int(ix.min()), int(iy.min())
    ix, iy = (ix - gx0).astype(np.int64), (iy - gy0).astype(np.int64)
    grid_shape = (int(iy.max()) + 1, int(ix.max()) + 1)
    present = rng.random(grid_shape) < presence
    slack = spacing / 2 - radius  # jitter that keeps a dot inside its own cell
    jx = rng.uniform(-slack, slack, grid_shape).astype(np.float32)
    jy = rng.uniform(-slack, slack, grid_shape).astype(np.float32)
    cx = (ix + gx0 + 0.5) * spacing + jx[iy, ix]
    cy = (iy + gy0 + 0.5) * spacing + jy[iy, ix]
    cover = _alpha(radius - np.hypot(x - cx, y - cy))
    return cover * present[iy, ix]


# --- red cells -----------------------------------------------------------------------------------


def _red_cell_stamp(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Light transmission ``[h, w, 3]`` of one red cell (1 outside, rim darker than the pallor)."""
    aspect, angle = rng.uniform(1.0, 1.12), rng.uniform(0, np.pi)
    side = 2 * int(np.ceil(radius * aspect + 1)) + 1
    coords = np.arange(side, dtype=np.float32) - (side - 1) / 2
    x, y = coords[None, :], coords[:, None]
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    d = np.hypot(u / aspect, v)
    background = np.asarray(BACKGROUND_COLOUR, dtype=np.float32)
    rim = np.asarray((212.0, 128.0, 132.0), dtype=np.float32) / background
    pallor = np.asarray((232.0, 190.0, 186.0), dtype=np.float32) / background
    t = np.clip((d / radius - 0.15) / 0.55, 0.0, 1.0)[..., None]
    transmission = pallor + (rim - pallor) * t
    cover = _alpha(radius - d)[..., None]
    return (1.0 - cover * (1.0 - transmission)).astype(np.float32)


def draw_red_cells(image: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    """Draw unlabelled red cells (pale discs with central pallor, overlaps darker) in place.

    A few stamps of different size and ellipticity are drawn per image and multiplied into the
    canvas at random integer positions: multiplying by a transmission makes overlaps darker, as in
    a real film, and stamping keeps ~150 cells cheap.

    Args:
        image: float32 ``[H, W, 3]`` canvas.
        rng: random generator.
        scale: geometric scale (image size / 640 times the domain's cell scale).
    """
    height, width = image.shape[:2]
    radius = RED_CELL_RADIUS * scale
    count = int(rng.uniform(0.3, 0.5) * height * width / (np.pi * radius * radius))
    stamps = [_red_cell_stamp(rng, radius * rng.uniform(0.88, 1.12)) for _ in range(6)]
    kinds = rng.integers(0, len(stamps), count)
    corners = rng.uniform(0.0, 1.0, (count, 2))
    for kind, (fx, fy) in zip(kinds, corners, strict=True):
        stamp = stamps[int(kind)]
        sh, sw = stamp.shape[:2]
        # Top-left corner anywhere from fully-left-outside to fully-right-outside.
        x0, y0 = int(fx * (width + sw)) - sw, int(fy * (height + sh)) - sh
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + sw, width), min(y0 + sh, height)
        if ix1 > ix0 and iy1 > iy0:
            image[iy0:iy1, ix0:ix1] *= stamp[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]


# --- white cells ---------------------------------------------------------------------------------


def _body_inside(rng: np.random.Generator, x, y, r: float, outline: str, tail_angle: float):
    """Signed inside-distance (px) of the cell body for ``outline``."""
    d = np.hypot(x, y)
    theta = np.arctan2(y, x)
    phases = rng.uniform(0, 2 * np.pi, 4)
    rho = 1.0 + 0.02 * np.sin(2 * theta + phases[0]) + 0.015 * np.sin(3 * theta + phases[1])
    if outline == "scalloped":
        bumps = int(rng.integers(9, 13))
        rho = rho + 0.09 * (np.abs(np.cos(bumps * theta / 2 + phases[2])) - 0.64)
    elif outline == "polygon":
        sides = int(rng.integers(5, 7))
        u = np.mod(theta - phases[2], 2 * np.pi / sides) - np.pi / sides
        rho = rho * 1.08 * np.cos(np.pi / sides) / np.cos(u)
    elif outline == "ragged":
        for k in range(4, 15, 2):
            rho = rho + rng.uniform(0.01, 0.03) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    inside = r * rho - d
    if outline == "blebs":
        count = int(rng.integers(3, 5))
        starts = rng.uniform(0, 2 * np.pi) + np.arange(count) * 2 * np.pi / count
        for a in starts + rng.uniform(-0.3, 0.3, count):
            bleb_r = 0.36 * r * rng.uniform(0.9, 1.1)
            bx, by = 1.0 * r * np.cos(a), 1.0 * r * np.sin(a)
            inside = np.maximum(inside, bleb_r - np.hypot(x - bx, y - by))
    elif outline == "tail":
        along = x * np.cos(tail_angle) + y * np.sin(tail_angle)
        across = np.abs(-x * np.sin(tail_angle) + y * np.cos(tail_angle))
        half_width = 0.5 * r * (1.0 - np.clip((along - 0.5 * r) / (1.4 * r), 0.0, 1.0))
        tail = np.minimum(np.minimum(half_width - across, 1.9 * r - along), along)
        inside = np.maximum(inside, tail)
    return inside


def _nucleus_inside(rng: np.random.Generator, u, v, rn: float, layout: str):
    """Signed inside-distance (px) of a nucleus of radius ``rn`` in its own rotated frame.

    Returns:
        the distance field and ``[(u, v, free_radius)]`` anchors where nucleoli may sit.
    """
    if layout in ("round", "ring"):
        aspect = rng.uniform(1.0, 1.2)
        a, b = rn * np.sqrt(aspect), rn / np.sqrt(aspect)
        radial = np.hypot(u / a, v / b)
        inside = (1.0 - radial) * b
        if layout == "ring":
            inside = np.minimum(inside, radial * b - 0.42 * rn)
            return inside, [
                (0.71 * rn * np.cos(t), 0.71 * rn * np.sin(t), 0.15 * rn)
                for t in np.linspace(0, 2 * np.pi, 4, endpoint=False)
            ]
        return inside, [(0.0, 0.0, 0.6 * b)]
    if layout == "kidney":
        inside = np.minimum(rn - np.hypot(u, v), np.hypot(u - 0.95 * rn, v) - 0.5 * rn)
        return inside, [(-0.3 * rn, 0.0, 0.35 * rn)]
    if layout == "band":
        arc_r, half_width, span = 0.58 * rn, 0.3 * rn, np.deg2rad(125)
        ends = [(arc_r * np.cos(s), arc_r * np.sin(s)) for s in (-span, span)]
        on_arc = np.abs(np.arctan2(v, u)) <= span
        end_distance = np.minimum(*[np.hypot(u - ex, v - ey) for ex, ey in ends])
        distance = np.where(on_arc, np.abs(np.hypot(u, v) - arc_r), end_distance)
        anchors = [(arc_r * np.cos(s), arc_r * np.sin(s), 0.1 * rn) for s in (-1.2, 0.0, 1.2)]
        return half_width - distance, anchors
    if layout == "bilobed":
        lobe_r, centres = 0.6 * rn, [(-0.5 * rn, 0.0), (0.5 * rn, 0.0)]
        bridge = 0.12 * rn
    else:  # segmented
        lobes = int(rng.integers(3, 5))
        lobe_r, bridge = 0.42 * rn, 0.07 * rn
        angles = np.deg2rad(80.0) * (np.arange(lobes) - (lobes - 1) / 2)
        centres = [(0.58 * rn * np.cos(t), 0.58 * rn * np.sin(t)) for t in angles]
    inside = np.full(np.broadcast_shapes(u.shape, v.shape), -np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(centres[:-1], centres[1:], strict=True):
        inside = np.maximum(inside, max(bridge, 0.6) - _segment_distance(u, v, ax, ay, bx, by))
    for cx, cy in centres:
        inside = np.maximum(inside, lobe_r * rng.uniform(0.9, 1.1) - np.hypot(u - cx, v - cy))
    return inside, [(cx, cy, 0.4 * lobe_r) for cx, cy in centres]


def _roughen(rng: np.random.Generator, inside, u, v, rn: float):
    """``nuclear_shape`` = irregular: knobbly outline (smooth noise warp) plus one deep cleft."""
    noise = _value_noise(rng, inside.shape, max(0.55 * rn, 2.0))
    inside = inside + 0.3 * rn * (2.0 * noise - 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    along = u * np.cos(angle) + v * np.sin(angle)
    across = np.abs(-u * np.sin(angle) + v * np.cos(angle))
    cleft = np.where(along > 0.25 * rn, across - max(0.1 * rn, 0.7), np.inf)
    return np.minimum(inside, cleft)


def draw_white_cell(image: np.ndarray, cell: WhiteCell, rng: np.random.Generator) -> np.ndarray:
    """Draw one white cell in place and return its tight box.

    Args:
        image: float32 ``[H, W, 3]`` canvas.
        cell: what to draw (class, rendered attribute values, radius, centre).
        rng: random generator.

    Returns:
        float32 ``[4]`` xyxy box of the drawn pixels (clipped to the image).
    """
    cue = CLASS_CUES[cell.label]
    _size, coarse, irregular, nucleolus, abundant, basophilic, vacuoles = (
        int(a) for a in cell.attributes
    )
    r = cell.radius
    (y0, y1, x0, x1), x, y = _patch(image.shape, cell.cx, cell.cy, cell.extent + 2)
    patch = image[y0:y1, x0:x1]
    shape = patch.shape[:2]

    tail_angle = rng.uniform(0, 2 * np.pi)
    body_inside = _body_inside(rng, x, y, r, cue.outline, tail_angle)
    body = _alpha(body_inside)

    # Nucleus placement: eccentric cells push it against the membrane; tails point away from it.
    rn = r * NUCLEUS_RATIO[abundant] * rng.uniform(0.95, 1.05)
    slack = max(r - rn, 0.0)
    offset_angle = tail_angle + np.pi if cue.outline == "tail" else rng.uniform(0, 2 * np.pi)
    offset = slack * (0.85 if cue.eccentric else rng.uniform(0.0, 0.3))
    nx, ny = offset * np.cos(offset_angle), offset * np.sin(offset_angle)
    rot = rng.uniform(0, 2 * np.pi)
    u = (x - nx) * np.cos(rot) + (y - ny) * np.sin(rot)
    v = -(x - nx) * np.sin(rot) + (y - ny) * np.cos(rot)
    nucleus_inside, anchors = _nucleus_inside(rng, u, v, rn, cue.nucleus)
    if irregular:
        nucleus_inside = _roughen(rng, nucleus_inside, u, v, rn)
    nucleus = _alpha(nucleus_inside) * body

    # Cytoplasm: the basophilia colour with a faint mottle.
    mottle = _value_noise(rng, shape, max(0.2 * r, 2.0))[..., None]
    cytoplasm_colour = np.asarray(CYTOPLASM_COLOURS[basophilic], dtype=np.float32)
    _over(patch, cytoplasm_colour + 10.0 * (mottle - 0.5), body)
    if cue.fringe:
        fringe = np.clip(1.0 - body_inside / max(0.1 * r, 1.2), 0.0, 1.0)
        _over(patch, FRINGE_COLOUR, 0.85 * fringe * body)
    halo = np.zeros(shape, dtype=np.float32)
    if cue.eccentric:
        hx, hy = nx - np.cos(offset_angle) * rn, ny - np.sin(offset_angle) * rn
        halo = _alpha(0.42 * r - np.hypot(x - hx, y - hy)) * body
        _over(patch, HALO_COLOUR, 0.85 * halo)
    style = GRANULE_STYLES.get(cue.granules)
    granules = None
    if style is not None:
        granule_r = max(style.radius * r, style.min_radius_px)
        granules = _dots(rng, x, y, granule_r, style.presence) * body * (1.0 - halo)
        if not style.over_nucleus:
            _over(patch, style.colour, granules * (1.0 - nucleus))

    # Nucleus: open = smooth light purple; coarse = dark clumps (smooth noise, hard contrast).
    if coarse:
        clumps = _value_noise(rng, shape, max(0.16 * rn, 1.5))
        t = np.clip((clumps - 0.3) / 0.4, 0.0, 1.0)[..., None]
        light = np.asarray(COARSE_CHROMATIN_LIGHT, dtype=np.float32)
        chromatin = light + (np.asarray(COARSE_CHROMATIN_DARK, dtype=np.float32) - light) * t
    else:
        fine = _value_noise(rng, shape, max(0.12 * rn, 1.5))[..., None]
        chromatin = np.asarray(OPEN_CHROMATIN, dtype=np.float32) + 12.0 * (fine - 0.5)
    _over(patch, chromatin, nucleus)

    if nucleolus:
        count = int(rng.integers(1, 4))
        spot = np.zeros(shape, dtype=np.float32)
        for k in rng.choice(len(anchors), size=count, replace=count > len(anchors)):
            au, av, free = anchors[int(k)]
            spot_r = max(0.2 * rn * rng.uniform(0.85, 1.2), 1.2)
            reach = max(free - spot_r, 0.0) * np.sqrt(rng.random())
            a = rng.uniform(0, 2 * np.pi)
            su, sv = au + reach * np.cos(a), av + reach * np.sin(a)
            spot = np.maximum(spot, _alpha(spot_r - np.hypot(u - su, v - sv)))
        _over(patch, NUCLEOLUS_COLOUR, 0.95 * spot * nucleus)

    if style is not None and style.over_nucleus:
        _over(patch, style.colour, granules)

    if cue.auer_rods:
        rod_angle = rng.uniform(0, np.pi)
        rcx, rcy = rng.uniform(-0.35 * r, 0.35 * r, 2)
        length = 0.9 * r if cue.auer_rods == 1 else 0.7 * r
        half_width = max((0.1 if cue.auer_rods == 1 else 0.065) * r, 1.0)
        rods = np.zeros(shape, dtype=np.float32)
        for _ in range(cue.auer_rods):
            a = rod_angle + rng.uniform(-0.35, 0.35)
            px, py = rcx + rng.uniform(-0.15, 0.15) * r, rcy + rng.uniform(-0.15, 0.15) * r
            dx, dy = 0.5 * length * np.cos(a), 0.5 * length * np.sin(a)
            rods = np.maximum(
                rods,
                _alpha(half_width - _segment_distance(x, y, px - dx, py - dy, px + dx, py + dy)),
            )
        _over(patch, AUER_ROD_COLOUR, 0.95 * rods * body)

    if vacuoles:
        count = int(rng.integers(3, 7))
        holes = np.zeros(shape, dtype=np.float32)
        angles = rng.uniform(0, 2 * np.pi) + np.arange(count) * 2 * np.pi / count
        for a in angles + rng.uniform(-0.3, 0.3, count):
            hole_r = max(0.12 * r * rng.uniform(0.8, 1.2), 1.8)
            reach = r - hole_r - 0.4 * (r - rn) * rng.uniform(0.2, 0.8)
            vx, vy = reach * np.cos(a), reach * np.sin(a)
            holes = np.maximum(holes, _alpha(hole_r - np.hypot(x - vx, y - vy)))
        _over(patch, VACUOLE_COLOUR, 0.95 * holes * body)

    mask = body > 0.5
    if cue.smudge:
        # Strands of nuclear material smeared radially out of the cell.
        theta = np.arctan2(y, x)
        bins = 28
        strands = rng.random(bins + 1).astype(np.float32)
        strands[-1] = strands[0]
        position = (theta + np.pi) / (2 * np.pi) * bins
        index = np.minimum(position.astype(np.int64), bins - 1)
        level = strands[index] + (strands[index + 1] - strands[index]) * (position - index)
        d = np.hypot(x, y)
        fade = np.clip((SMUDGE_EXTENT * r - d) / (0.5 * r), 0.0, 1.0)
        smear = np.clip((level - 0.5) / 0.15, 0.0, 1.0) * fade * (d > 0.35 * r)
        _over(patch, SMUDGE_COLOUR, 0.6 * smear)
        mask = mask | (0.6 * smear > 0.3)

    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return np.array([x0, y0, x0 + 1, y0 + 1], dtype=np.float32)
    return np.array(
        [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1],
        dtype=np.float32,
    )
