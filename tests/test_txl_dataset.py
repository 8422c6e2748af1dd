"""The real TXL-PBC folder (../shared/data/txl_pbc): 4 domains, 1008/288/144, 38 duplicates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from lld_lightning.data.errors import DataReport
from lld_lightning.data.formats import FormatOptions, load_records, summarize_records

TXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"
pytestmark = pytest.mark.skipif(not TXL.is_dir(), reason=f"TXL-PBC data not found at {TXL}")

#: WBCAtt value strings, in index order (the CSV's columns).
WBCATT = {
    "cell_size": ["small", "big"],
    "cell_shape": ["round", "irregular"],
    "nucleus_shape": [
        "unsegmented-round",
        "unsegmented-band",
        "unsegmented-indented",
        "segmented-bilobed",
        "segmented-multilobed",
        "irregular",
    ],
    "nuclear_cytoplasmic_ratio": ["low", "high"],
    "chromatin_density": ["densely", "loosely"],
    "cytoplasm_vacuole": ["no", "yes"],
    "cytoplasm_texture": ["clear", "frosted"],
    "cytoplasm_colour": ["light blue", "blue", "purple blue"],
    "granule_type": ["nil", "small", "round", "coarse"],
    "granule_colour": ["nil", "pink", "red", "purple"],
    "granularity": ["no", "yes"],
}


@pytest.fixture(scope="module")
def loaded() -> tuple[list, DataReport]:
    options = FormatOptions(
        num_classes=3,
        class_names=("WBC", "RBC", "Platelets"),
        attribute_spec={name: len(values) for name, values in WBCATT.items()},
        manifest=Path("source_map.csv"),
        attribute_csv=Path("txl_wbcatt_join.csv"),
        attribute_columns=WBCATT,
    )
    report = DataReport()
    return load_records(TXL, "yolo", options, report), report


def test_splits_domains_duplicates(loaded) -> None:
    records, report = loaded
    assert Counter(r.split for r in records) == {"train": 1008, "val": 288, "test": 144}
    assert set(r.domain for r in records) == {"BCCD", "PBC", "Raabin-WBC", "BCDD"}
    assert Counter(r.domain for r in records) == {
        "BCCD": 221,
        "PBC": 500,
        "Raabin-WBC": 500,
        "BCDD": 219,
    }
    assert report.dropped_duplicates == 38 and len(report.duplicate_files) == 4
    # labels/<split>/classes.txt is the class-name list, not a label without image.
    assert report.num_skipped == 0
    counts = np.bincount(np.concatenate([r.labels for r in records]), minlength=3)
    assert counts.tolist() == [1515 - 5, 24271 - 33, 851]  # duplicates: 5 WBC and 33 RBC rows
    assert len({r.image_id for r in records}) == 1440


def test_attribute_join(loaded) -> None:
    records, _ = loaded
    described = [r for r in records if (r.attributes >= 0).any()]
    # 500 PBC images; one of them (train/7538339d...) has no WBC, so no described cell.
    assert len(described) == 499
    assert all(r.domain == "PBC" for r in described)
    for record in described:
        row = np.flatnonzero((record.attributes >= 0).any(1))
        assert row.size == 1 and record.labels[row[0]] == 0  # the described cell is a WBC


def test_summary_table(loaded) -> None:
    records, report = loaded
    console = Console(width=120, record=True)
    console.print(summarize_records(records, report))
    text = console.export_text()
    assert "1440" in text and "Raabin-WBC" in text and "dropped 38 duplicate rows" in text
