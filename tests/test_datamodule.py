from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lld_lightning.data.datamodule import (
    TEACHER_KEYS,
    Domains,
    LldDataModule,
    ReadOptions,
    Splits,
    SyntheticData,
)
from lld_lightning.data.errors import DataError
from lld_lightning.data.transforms import Augmentation
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
    assert (
        sorted(loaders)
        == dm.test_domains
        == sorted({r.domain for ds in dm.test_sets.values() for r in ds.records})
    )
    for domain, loader in loaders.items():
        batch = next(iter(loader))
        assert set(batch["domain"]) == {domain}
        assert batch["image"].dtype == torch.uint8 and batch["boxes"].shape[-1] == 4


def test_domain_selection_and_unknown_domain(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic, domains=Domains(train=["H_100x_C1"], test=["L_100x_C1"]))
    dm.setup("fit")
    dm.setup("test")
    assert {r.domain for r in dm.train_set.records} == {"H_100x_C1"}
    assert list(dm.test_sets) == ["L_100x_C1"]
    bad = _dm(tiny_synthetic, domains=Domains(train=["H_10x_C9"]))
    with pytest.raises(DataError, match="H_10x_C9"):
        bad.setup("fit")


def test_val_held_out_from_train_when_no_val_split(tiny_synthetic: Path) -> None:
    dm = _dm(tiny_synthetic, splits=Splits(val="none", val_fraction=0.25))
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
    for f, s, a in zip(
        full.train_set.records, sparse.train_set.records, again.train_set.records, strict=True
    ):
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
    dm = _dm(tiny_synthetic, augmentation=Augmentation(crop_size=96))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out = dm.train_augmentation(batch)
    assert out["image"].shape[-2:] == (96, 96) and out["image"].dtype == torch.float32
    real = out["labels"] >= 0
    boxes = out["boxes"][real]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= 96).all()
    assert dm.eval_transform(batch)["image"].shape[-2:] == (128, 128)


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _dm(tmp_path / "nope").setup("fit")


@pytest.mark.skipif(not TXL_PBC.exists(), reason="../shared/data/txl_pbc is not present")
def test_txl_pbc_four_domains_per_split() -> None:
    dm = LldDataModule(
        root=str(TXL_PBC),
        format="yolo",
        class_names=["WBC", "RBC", "Platelets"],
        num_workers=0,
        reading=ReadOptions(manifest="source_map.csv", domain_column="source", check_images="none"),
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 1008 and len(dm.val_set) == 288
    assert sum(len(ds) for ds in dm.test_sets.values()) == 144
    assert sorted(dm.test_sets) == ["BCCD", "BCDD", "PBC", "Raabin-WBC"]
    assert dm.report.dropped_duplicates == 38


def _training(dm: LldDataModule, training: bool = True) -> LldDataModule:
    """Attach a trainer stand-in that has no model: the data module must never read one."""
    dm.trainer = SimpleNamespace(training=training)
    return dm


def _first_train_batch(dm: LldDataModule) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader(shuffle=False)))


def test_teacher_view_adds_the_evaluation_view_to_training_batches_only(
    tiny_synthetic: Path,
) -> None:
    plain = _dm(tiny_synthetic, augmentation=Augmentation(crop_size=64))
    batch = _first_train_batch(plain)
    out = _training(plain).on_after_batch_transfer(batch, 0)
    assert not any(key.startswith("teacher_") for key in out)

    dm = _dm(tiny_synthetic, augmentation=Augmentation(crop_size=64), teacher_view=True)
    assert dm.teacher_view
    out = _training(dm).on_after_batch_transfer(batch, 0)
    assert {key for key in out if key.startswith("teacher_")} == {
        f"teacher_{k}" for k in TEACHER_KEYS
    }
    assert out["image"].shape[-2:] == (64, 64)  # the student's crop
    weak = dm.eval_transform(batch)
    for key in TEACHER_KEYS:
        torch.testing.assert_close(out[f"teacher_{key}"], weak[key])
    assert out["teacher_image"].shape[-2:] == (128, 128)

    evaluation = _training(dm, training=False).on_after_batch_transfer(batch, 0)
    assert not any(key.startswith("teacher_") for key in evaluation)
    assert evaluation["image"].shape[-2:] == (128, 128)


def test_hidden_annotation_only_when_kept(tiny_synthetic_full: Path) -> None:
    full = _dm(tiny_synthetic_full)
    full.setup("fit")
    for options in ({"sparse_simulation": 0.2}, {"keep_hidden": True}):
        batch = _first_train_batch(_dm(tiny_synthetic_full, **options))
        assert "hidden_boxes" not in batch and "hidden_labels" not in batch

    dm = _dm(tiny_synthetic_full, sparse_simulation=0.2, keep_hidden=True)
    batch = _first_train_batch(dm)
    for i, (sparse, hidden) in enumerate(
        zip(dm.train_set.records, full.train_set.records, strict=True)
    ):
        sample = dm.train_set[i]
        assert sample["labels"].numel() == sparse.num_cells <= hidden.num_cells
        np.testing.assert_array_equal(sample["hidden_boxes"].numpy(), hidden.boxes_xyxy)
        np.testing.assert_array_equal(sample["hidden_labels"].numpy(), hidden.labels)
    real = batch["hidden_labels"] >= 0
    assert real.sum(1).tolist() == [r.num_cells for r in full.train_set.records[: len(real)]]
    assert not any("hidden_boxes" in dm.val_set[i] for i in range(len(dm.val_set)))


def test_synthetic_options_name_the_generated_folder(tmp_path: Path) -> None:
    dm = LldDataModule(
        synthetic=SyntheticData(dir=str(tmp_path), num_images=12, image_size=96), seed=3
    )
    assert dm.data_root == tmp_path / "n12_s96_seed3_sparse0.2"
    dm.prepare_data()
    assert (dm.data_root / "synthetic.json").is_file()
    dm.setup("fit")
    assert {r.width for r in dm.train_set.records} == {96}


def test_hyperparameters_are_plain_values_that_checkpoints_load(tmp_path: Path) -> None:
    """Checkpoints store them; torch.load(weights_only=True) refuses any class of ours."""
    dm = LldDataModule(
        domains=Domains(train=["H_100x_C1"]), augmentation=Augmentation(crop_size=None)
    )
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "h.pt")
    loaded = torch.load(tmp_path / "h.pt", weights_only=True)["datamodule_hyper_parameters"]
    assert (
        loaded["domains"]["train"] == ["H_100x_C1"] and loaded["augmentation"]["crop_size"] is None
    )
    assert loaded["batch_size"] == 8 and loaded["image_size"] == 640


def test_prediction_files_name_the_attribute_values_of_the_data() -> None:
    from lld_lightning.callbacks.predict_writer import attribute_value_names
    from lld_lightning.data.datamodule import ReadOptions

    columns = {"cell_size": ["small", "big"], "granularity": ["no", "yes"]}
    datamodule = LldDataModule(format="yolo", reading=ReadOptions(attribute_columns=columns))
    assert attribute_value_names(datamodule.attribute_spec, datamodule) == columns
    lld = LldDataModule()
    names = attribute_value_names(lld.attribute_spec, lld)
    assert all(len(values) == lld.attribute_spec[name] for name, values in names.items())
    assert attribute_value_names({"unknown": 3}, None) == {"unknown": ["0", "1", "2"]}
