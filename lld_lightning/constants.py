"""Named sentinels and the LLD label space, defined once for the whole package."""

from __future__ import annotations

#: Value of a missing label or attribute (attributes ``[N, A]``, padded ``labels``).
IGNORE_INDEX: int = -1

#: Assigner output for a location inside an annotated region that matches no cell.
BACKGROUND: int = -1
#: Assigner output for a location outside every annotated region: no loss, no gradient.
IGNORE: int = -2

#: A detection (or pseudo-label) is right when it overlaps a cell of its class by this IoU.
MATCH_IOU: float = 0.5

#: In LLD label files a value of 2 on a binary attribute means "not available".
LLD_MISSING_ATTRIBUTE: int = 2

#: The 14 LLD cell classes, index = class id. Class 0 ("None", artifacts) is a real class.
LLD_CLASSES: tuple[str, ...] = (
    "None",
    "Myeloblast",
    "Lymphoblast",
    "Neutrophil",
    "Atypical lymphocyte",
    "Promonocyte",
    "Monoblast",
    "Lymphocyte",
    "Myelocyte",
    "Abnormal promyelocyte",
    "Monocyte",
    "Metamyelocyte",
    "Eosinophil",
    "Basophil",
)

#: The 7 LLD attributes in label-file order, with their number of values.
LLD_ATTRIBUTE_SPEC: dict[str, int] = {
    "cell_size": 3,
    "nuclear_chromatin": 2,
    "nuclear_shape": 2,
    "nucleolus": 2,
    "cytoplasm": 2,
    "cytoplasmic_basophilia": 2,
    "cytoplasmic_vacuoles": 2,
}

#: Human-readable value names per LLD attribute (for tables and overlays).
LLD_ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "cell_size": ("small", "medium", "large"),
    "nuclear_chromatin": ("open", "coarse"),
    "nuclear_shape": ("regular", "irregular"),
    "nucleolus": ("inconspicuous", "prominent"),
    "cytoplasm": ("scanty", "abundant"),
    "cytoplasmic_basophilia": ("slight", "moderate"),
    "cytoplasmic_vacuoles": ("absent", "prominent"),
}

#: LLD domain folder names: ``{H|L}_{100x|40x|10x}_{C1|C2}``.
LLD_DOMAIN_PATTERN: str = r"^[HL]_(100|40|10)x_C[12]$"

#: Nominal micrometres per pixel of LLD images by objective magnification, for LLD domain folders
#: whose images give none. 100x: red cells (7.5 um) span about 35 pixels in the published 100x
#: fields (640 x 640, read from one field); 40x and 10x scale that by the objective, unverified.
LLD_PIXEL_SIZE_UM: dict[int, float] = {100: 0.21, 40: 0.525, 10: 2.1}

#: Diameter of a normal red cell in micrometres (7-8 um in a dried, stained film): the ruler that
#: `lld_lightning.data.red_cells` reads a microscope's pixel size with.
RED_CELL_DIAMETER_UM: float = 7.5

#: Name used when an image's domain cannot be discovered.
DEFAULT_DOMAIN: str = "default"
