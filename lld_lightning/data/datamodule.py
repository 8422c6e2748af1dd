"""`LldDataModule`: LLD-style images across microscope/camera domains, for Lightning."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC, LLD_CLASSES
from lld_lightning.data.dataset import LldDataset
from lld_lightning.data.errors import DataError, DataReport, OnError
from lld_lightning.data.formats.load import load_records, summarize_records
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.images import probe_image
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sample import collate
from lld_lightning.data.sparse import simulate_sparse
from lld_lightning.data.transforms import DeviceAugmentation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class LldDataModule(L.LightningDataModule):
    """Serves LLD images (or any dataset in the LLD, COCO or plain YOLO format) by split and domain.

    With ``root=None`` it generates the built-in synthetic LLD-like data set on first use
    (``synthetic_dir``), so a fresh clone trains without any download.

    Args:
        root: dataset folder; ``None`` = the built-in synthetic data.
        format: ``lld`` (sparse YOLO, 16 numbers a row), ``coco`` (COCO JSON with attributes) or
            ``yolo`` (plain, fully annotated).
        train_domains, val_domains, test_domains: domain names to use per stage; ``None`` = all.
            Train on ``H_*`` and test on ``L_*`` to measure domain shift.
        train_split, val_split, test_split: split names (folder names / COCO json stems).
        val_fraction: when the data has no ``val_split``, this seeded fraction of the training
            images becomes the validation set (val is never the test set).
        image_size: square model input size; images are letterboxed on the device.
        sparse_simulation: area fraction of one seeded rectangle kept labelled per training image
            (the paper's protocol, 0.2); ``None`` keeps the annotations as they are.
        seed: seed of the sparse rectangles, the val hold-out and the synthetic data.
        on_error: ``raise`` stops at the first bad label with the file and line; ``skip`` drops
            the image, counts it and reports the counts.
        missing_labels: an image without a label file is an ``error`` or ``unlabelled``.
        region_order: LLD region columns: ``xyxy`` (x1 y1 x2 y2) or ``xxyy`` (x1 x2 y1 y2).
        class_names: class names, their count is the model's number of classes.
        attribute_spec: ``{name: number of values}``; for ``yolo`` with ``attribute_csv`` it is
            derived from ``attribute_columns``.
        manifest, domain_column: CSV (relative to ``root``) giving each image's domain.
        attribute_csv, attribute_columns: attributes joined from a CSV (``{name: [values]}``).
        augmentation: keyword arguments of `DeviceAugmentation` for training.
        predict_root: a folder of images (any layout) for ``lld predict``.

    Attributes:
        teacher_view: when True (set by `lld_lightning.pseudo.PseudoLabeller`), training batches
            also carry a weak view of the same images for a teacher: the evaluation letterbox,
            as ``teacher_image`` ``[B, 3, S, S]``, ``teacher_transform`` ``[B, 3, 3]`` and the
            expert annotation in that view (``teacher_boxes``, ``teacher_labels``,
            ``teacher_regions``, ``teacher_region_valid``). Boxes map from the teacher's view to
            the student's with ``transform @ inverse(teacher_transform)``.
    """

    def __init__(
        self,
        root: str | None = None,
        format: Literal["lld", "coco", "yolo"] = "lld",
        train_domains: list[str] | None = None,
        val_domains: list[str] | None = None,
        test_domains: list[str] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        val_fraction: float = 0.1,
        image_size: int = 640,
        batch_size: int = 8,
        num_workers: int = 2,
        pin_memory: bool = True,
        sparse_simulation: float | None = None,
        seed: int = 0,
        on_error: OnError = "raise",
        missing_labels: Literal["error", "unlabelled"] = "error",
        region_order: Literal["xyxy", "xxyy"] = "xyxy",
        max_image_pixels: int = 50_000_000,
        check_images: Literal["none", "header", "full"] = "header",
        class_names: list[str] | None = None,
        attribute_spec: dict[str, int] | None = None,
        manifest: str | None = None,
        domain_column: str = "source",
        attribute_csv: str | None = None,
        attribute_columns: dict[str, list[str]] | None = None,
        augmentation: dict[str, Any] | None = None,
        predict_root: str | None = None,
        synthetic_dir: str = "data/synthetic",
        synthetic_images: int = 480,
        synthetic_image_size: int = 640,
        synthetic_sparse_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        class_names = list(class_names) if class_names is not None else list(LLD_CLASSES)
        if attribute_columns is not None:
            attribute_spec = {name: len(values) for name, values in attribute_columns.items()}
        elif attribute_spec is None:
            attribute_spec = dict(LLD_ATTRIBUTE_SPEC) if format != "yolo" else {}
        # The label space is logged once, by the model it is linked into.
        self.save_hyperparameters(ignore=["class_names", "attribute_spec"])
        self.root = Path(root) if root is not None else None
        self.format = format
        self.class_names = class_names
        self.attribute_spec = dict(attribute_spec)
        self.report = DataReport(on_error=on_error)
        self.train_set: LldDataset | None = None
        self.val_set: LldDataset | None = None
        self.test_sets: dict[str, LldDataset] = {}
        self.predict_set: LldDataset | None = None
        self.train_augmentation = DeviceAugmentation(image_size=image_size, train=True, **(augmentation or {}))
        self.eval_transform = DeviceAugmentation(image_size=image_size, train=False)
        self.teacher_view = False

    # ----------------------------------------------------------------------------------- sizes
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_spec)

    @property
    def data_root(self) -> Path:
        """The dataset folder actually read (the synthetic folder when ``root`` is ``None``)."""
        if self.root is not None:
            return self.root
        h = self.hparams
        return Path(h.synthetic_dir) / (
            f"n{h.synthetic_images}_s{h.synthetic_image_size}_seed{h.seed}_sparse{h.synthetic_sparse_fraction}"
        )

    # ----------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Generate the synthetic data once (local rank 0 only) when no ``root`` is given."""
        if self.root is not None:
            return
        from lld_lightning.data import synthetic

        h = self.hparams
        kwargs = dict(
            num_images=h.synthetic_images,
            seed=h.seed,
            image_size=h.synthetic_image_size,
            sparse_fraction=h.synthetic_sparse_fraction,
        )
        if not synthetic.is_generated(self.data_root, **kwargs):
            synthetic.generate(self.data_root, **kwargs)

    def format_options(self) -> FormatOptions:
        h = self.hparams
        kwargs: dict[str, Any] = dict(
            num_classes=self.num_classes,
            class_names=self.class_names,
            attribute_spec=self.attribute_spec,
            region_order=h.region_order,
            missing_labels=h.missing_labels,
            max_image_pixels=h.max_image_pixels,
            manifest=h.manifest,
            domain_column=h.domain_column,
            attribute_csv=h.attribute_csv,
            check_images=h.check_images,
        )
        if h.attribute_columns is not None:
            kwargs["attribute_columns"] = h.attribute_columns
        return FormatOptions(**kwargs)

    def load_all_records(self) -> list[ImageRecord]:
        """Every annotated image under the data root, validated (errors name the file and line)."""
        if self.root is not None and not self.root.exists():
            raise DataError.at(self.root, "data root does not exist")
        return load_records(self.data_root, self.format, self.format_options(), self.report)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage == "predict":
            self.predict_set = self._predict_dataset()
            return
        if self.train_set is not None and self.test_sets:
            return
        records = self.load_all_records()
        by_split: dict[str, list[ImageRecord]] = {}
        for record in records:
            by_split.setdefault(record.split, []).append(record)
        train = self._select(by_split.get(h.train_split, []), h.train_domains, "train")
        val = self._select(by_split.get(h.val_split, []), h.val_domains, "val")
        if not val and train:
            train, val = self._hold_out(train, h.val_fraction)
        hidden: list[ImageRecord] | None = None
        if h.sparse_simulation is not None:
            # The full annotation stays with the sample (never trained on) to score pseudo-labels.
            hidden = train
            train = [simulate_sparse(r, h.sparse_simulation, h.seed) for r in train]
        test = self._select(by_split.get(h.test_split, []), h.test_domains, "test")
        if not train and stage in (None, "fit"):
            raise DataError.at(self.data_root, f"no training images in split {h.train_split!r} "
                               f"(domains {h.train_domains or 'all'})")
        build = lambda rs: LldDataset(rs, self.num_attributes, h.max_image_pixels)  # noqa: E731
        self.train_set = LldDataset(train, self.num_attributes, h.max_image_pixels, hidden)
        self.val_set = build(val)
        self.test_sets = {
            domain: build([r for r in test if r.domain == domain])
            for domain in sorted({r.domain for r in test})
        }
        if self.trainer is None or self.trainer.is_global_zero:
            Console(stderr=True).print(summarize_records(records, self.report))

    def _select(self, records: list[ImageRecord], domains: list[str] | None, stage: str) -> list[ImageRecord]:
        if domains is None:
            return records
        known = {r.domain for r in records}
        unknown = sorted(set(domains) - known)
        if unknown and records:
            raise DataError.at(
                self.data_root,
                f"{stage} domains {unknown} not found; the data has {sorted(known)}",
            )
        return [r for r in records if r.domain in set(domains)]

    def _hold_out(self, records: list[ImageRecord], fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """Seeded split of training images into train and val when the data has no val split."""
        order = np.random.default_rng(self.hparams.seed).permutation(len(records))
        num_val = max(1, int(round(fraction * len(records)))) if len(records) > 1 else 0
        val_ids = set(order[:num_val].tolist())
        return (
            [r for i, r in enumerate(records) if i not in val_ids],
            [dataclasses.replace(r, split="val") for i, r in enumerate(records) if i in val_ids],
        )

    def _predict_dataset(self) -> LldDataset:
        h = self.hparams
        if h.predict_root is None:
            raise DataError("no images to predict on: set --data.predict_root to a folder of images")
        folder = Path(h.predict_root)
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else [folder]
        if not paths:
            raise DataError.at(folder, "no images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
        records = []
        for image_id, path in enumerate(paths):
            width, height, _ = probe_image(path, h.max_image_pixels)
            records.append(ImageRecord(
                path=path, width=width, height=height, image_id=image_id, split="predict",
                attributes=np.zeros((0, self.num_attributes), dtype=np.int64),
            ))
        return LldDataset(records, self.num_attributes, h.max_image_pixels)

    # ------------------------------------------------------------------------------ dataloaders
    def _loader(self, dataset: LldDataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=shuffle,
            num_workers=h.num_workers,
            collate_fn=collate,
            pin_memory=h.pin_memory and torch.cuda.is_available(),
            persistent_workers=h.num_workers > 0,
            drop_last=shuffle and len(dataset) > h.batch_size,
        )

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        """The training images; ``shuffle=False`` reads each once, in order, with no batch
        dropped (for measuring a model on them)."""
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, shuffle=shuffle)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup('fit') first"
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> dict[str, DataLoader]:
        """One named loader per test domain."""
        if not self.test_sets:
            raise DataError.at(self.data_root, f"no test images in split {self.hparams.test_split!r}")
        return {domain: self._loader(ds, shuffle=False) for domain, ds in self.test_sets.items()}

    def predict_dataloader(self) -> DataLoader:
        assert self.predict_set is not None, "call setup('predict') first"
        return self._loader(self.predict_set, shuffle=False)

    @property
    def test_domains(self) -> list[str]:
        return list(self.test_sets)

    @property
    def val_domains(self) -> list[str]:
        return sorted({r.domain for r in self.val_set.records}) if self.val_set is not None else []

    # --------------------------------------------------------------------------- augmentation
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Augment (training) or letterbox (evaluation) on the device the batch now lives on."""
        training = self.trainer is not None and self.trainer.training
        if training:
            # How far the model's schedule is (LldModule.training_progress), for mosaic_until.
            progress = getattr(self.trainer.lightning_module, "training_progress", None)
            out = self.train_augmentation(batch, progress=progress)
        else:
            out = self.eval_transform(batch)
        if training and self.teacher_view:
            weak = self.eval_transform(batch)
            for key in ("image", "transform", "boxes", "labels", "regions", "region_valid"):
                out[f"teacher_{key}"] = weak[key]
        return out
