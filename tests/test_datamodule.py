from pathlib import Path

import numpy as np
import pytest
import torch

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError
from tests.conftest import TXL_PBC


def _dm(root: Path, **kwargs) -> LldDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("image_size", 128)
    kwargs.setdefault("batch_size", 4)
    return LldDataModule(root=str(root), **kwargs)


def test_splits_domains_and_per_domain_test_loaders(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic)
    dm.setup("fit")
    dm.setup("test")
    train_ids = {r.image_id for r in dm.train_set.records}
    val_ids = {r.image_id for r in dm.val_set.records}
    test_ids = {r.image_id for ds in dm.test_sets.values() for r in ds.records}
    assert train_ids and val_ids and test_ids
    assert not (train_ids & val_ids) and not (val_ids & test_ids) and not (train_ids & test_ids)
    loaders = dm.test_dataloader()
    assert sorted(loaders) == dm.test_domains == sorted({r.domain for ds in dm.test_sets.values() for r in ds.records})
    for domain, loader in loaders.items():
        batch = next(iter(loader))
        assert set(batch["domain"]) == {domain}
        assert batch["image"].dtype == torch.uint8 and batch["boxes"].shape[-1] == 4


def test_domain_selection_and_unknown_domain(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic, train_domains=["H_100x_C1"], test_domains=["L_100x_C1"])
    dm.setup("fit")
    dm.setup("test")
    assert {r.domain for r in dm.train_set.records} == {"H_100x_C1"}
    assert list(dm.test_sets) == ["L_100x_C1"]
    bad = _dm(tiny_synthetic, train_domains=["H_10x_C9"])
    with pytest.raises(DataError, match="H_10x_C9"):
        bad.setup("fit")


def test_val_held_out_from_train_when_no_val_split(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic, val_split="none", val_fraction=0.25)
    dm.setup("fit")
    assert dm.val_set.records and all(r.split == "val" for r in dm.val_set.records)
    assert not {r.image_id for r in dm.val_set.records} & {r.image_id for r in dm.train_set.records}


def test_sparse_simulation_fixed_rectangle(tiny_synthetic_full: Path) -> None:
    full = _dm(tiny_synthetic_full)
    full.setup("fit")
    sparse = _dm(tiny_synthetic_full, sparse_simulation=0.2, seed=5)
    sparse.setup("fit")
    again = _dm(tiny_synthetic_full, sparse_simulation=0.2, seed=5)
    again.setup("fit")
    for f, s, a in zip(full.train_set.records, sparse.train_set.records, again.train_set.records, strict=True):
        assert f.image_id == s.image_id
        np.testing.assert_array_equal(s.regions_xyxy, a.regions_xyxy)
        assert s.regions_xyxy.shape == (1, 4)
        assert s.num_cells <= f.num_cells
        area = np.prod(s.regions_xyxy[0, 2:] - s.regions_xyxy[0, :2])
        assert area == pytest.approx(0.2 * f.width * f.height, rel=1e-3)
    # val and test stay fully annotated
    for r in sparse.val_set.records:
        np.testing.assert_array_equal(r.regions_xyxy, r.whole_image_region())


def test_train_batch_is_augmented_on_device(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = dm.train_augmentation(batch)
    assert out["image"].shape[-2:] == (128, 128) and out["image"].dtype == torch.float32
    real = out["labels"] >= 0
    boxes = out["boxes"][real]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= 128).all()


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _dm(tmp_path / "nope").setup("fit")


@pytest.mark.skipif(not TXL_PBC.exists(), reason="../shared/data/txl_pbc is not present")
def test_txl_pbc_four_domains_per_split() -> None:
    dm = LldDataModule(
        root=str(TXL_PBC), format="yolo", class_names=["WBC", "RBC", "Platelets"],
        manifest="source_map.csv", domain_column="source", num_workers=0, check_images="none",
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 1008 and len(dm.val_set) == 288
    assert sum(len(ds) for ds in dm.test_sets.values()) == 144
    assert sorted(dm.test_sets) == ["BCCD", "BCDD", "PBC", "Raabin-WBC"]
    assert dm.report.dropped_duplicates == 38
