"""Shared fixtures: tiny deterministic synthetic data sets, generated once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TXL_PBC = SHARED_DATA / "txl_pbc"
LLD_SAMPLES = SHARED_DATA / "lld_samples"


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic LLD-like images of 160 px in 4 domains, sparse training regions."""
    from lld_lightning.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(out, num_images=16, seed=0, image_size=160, sparse_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_synthetic_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 fully annotated synthetic images of 160 px (for the sparse simulation)."""
    from lld_lightning.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic") / "tiny_full"
    generate(out, num_images=16, seed=1, image_size=160, sparse_fraction=0.0, progress=False)
    return out
