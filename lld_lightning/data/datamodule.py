"""`LldDataModule`: LLD-style images across microscope/camera domains, for Lightning.

The constructor's grouped options (`SyntheticData`, `Splits`, `Domains`, `ReadOptions` and
`transforms.Augmentation`) are small frozen dataclasses, so ``lld fit --help`` lists them as
nested options (``--data.synthetic.num_images``) and a config gives them as mappings.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from rich.console import Console

from lld_lightning.constants import (
    DEFAULT_DOMAIN,
    LLD_ATTRIBUTE_SPEC,
    LLD_CLASSES,
    LLD_PIXEL_SIZE_UM,
)
from lld_lightning.data.dataset import UNREADABLE_IMAGE, LldDataset, SkipCountingLoader
from lld_lightning.data.domains import (
    Manifest,
    domain_from_path,
    lld_objective,
    load_manifest,
    manifest_pixel_size,
)
from lld_lightning.data.errors import DataError, DataReport, OnError
from lld_lightning.data.formats.load import load_records, summarize_records
from lld_lightning.data.formats.options import FormatOptions
from lld_lightning.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    probe_image,
    read_image,
)
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.red_cells import (
    AUTO_PIXEL_SIZE,
    MAX_IMAGES,
    NoRedCellsError,
    PixelSizeEstimate,
    estimate_pixel_size,
    evenly_spaced,
)
from lld_lightning.data.sample import Batch, collate
from lld_lightning.data.sparse import simulate_sparse
from lld_lightning.data.transforms import Augmentation, DeviceAugmentation

#: `lld predict` names the images its letterbox shrinks by more than this factor: cells lose
#: detail that the model was not trained to do without.
MAX_SHRINK_WITHOUT_WARNING: float = 2.0
#: `DataReport` reason of a file in the predict folder without an image suffix.
NOT_AN_IMAGE: str = "not an image"

#: The batch keys that the teacher's view repeats, as ``teacher_<key>``.
TEACHER_KEYS: tuple[str, ...] = ("image", "transform", "boxes", "labels", "regions", "region_valid")


@dataclass(frozen=True)
class SyntheticData:
    """The built-in synthetic LLD-like data, generated on first use when ``root`` is null.

    Args:
        dir: folder holding the generated data sets, one subfolder per setting.
        num_images: images over all domains and splits.
        image_size: side of the square fields in pixels.
        sparse_fraction: annotated area fraction of each training image; 0 = fully annotated.
    """

    dir: str = "data/synthetic"
    num_images: int = 1200
    image_size: int = 640
    sparse_fraction: float = 0.2


@dataclass(frozen=True)
class Splits:
    """Split names (folder names, COCO json stems) and the validation hold-out.

    Args:
        train: the training split.
        val: the validation split; when the data has none, ``val_fraction`` of train is held out.
        test: the test split (never used for validation).
        val_fraction: seeded fraction of the training images held out when there is no val split.
    """

    train: str = "train"
    val: str = "val"
    test: str = "test"
    val_fraction: float = 0.1


@dataclass(frozen=True)
class Domains:
    """Domain names to use per stage, null = all (e.g. train on ``H_*``, test on ``L_*``).

    Args:
        train: domains of the training images.
        val: domains of the validation images.
        test: domains of the test images (one test loader per domain).
    """

    train: list[str] | None = None
    val: list[str] | None = None
    test: list[str] | None = None


@dataclass(frozen=True)
class ReadOptions:
    """How label files and images are read and checked (``docs/formats.md``).

    Args:
        on_error: ``raise`` stops at the first bad label or image (also one found in training) naming its file (and line); ``skip`` drops it and counts it.
        missing_labels: an image without a label file is an ``error`` or ``unlabelled`` (no annotated region).
        region_order: LLD region columns: ``xyxy`` (x1 y1 x2 y2) or ``xxyy`` (x1 x2 y1 y2).
        check_images: ``header`` opens each image header, ``full`` also decodes it, ``none`` opens nothing.
        max_image_pixels: an image with more pixels (width x height) is an error.
        manifest: CSV (relative to ``root``) giving each image's domain.
        domain_column: the manifest column holding the domain.
        attribute_csv: CSV (relative to ``root``) joining attributes to plain YOLO labels.
        attribute_columns: attributes read from ``attribute_csv``, ``{name: [values in index order]}``.
        pixel_size_column: the manifest column (and COCO image field) holding each image's pixel size in micrometres; optional.
    """

    on_error: OnError = "raise"
    missing_labels: Literal["error", "unlabelled"] = "error"
    region_order: Literal["xyxy", "xxyy"] = "xyxy"
    check_images: Literal["none", "header", "full"] = "header"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    manifest: str | None = None
    domain_column: str = "source"
    attribute_csv: str | None = None
    attribute_columns: dict[str, list[str]] | None = None
    pixel_size_column: str = "pixel_size_um"


@dataclass(frozen=True)
class PixelSize:
    """Physical scale: the micrometres per pixel the model works at, and each image's own.

    An image's pixel size is, in order: its manifest column or COCO field (``reading.pixel_size_column``), ``by_domain[domain]``, the LLD objective's nominal size for an LLD domain folder (``H_100x_C1``...), ``default``. With ``working`` set every image is resampled to it (boxes mapped back), so cells have one size in pixels across microscopes; an image whose size stays unknown is letterboxed (``lld predict`` can estimate it: ``--pixel_size_um auto``).

    Args:
        working: micrometres per pixel the model sees; null letterboxes each image to ``image_size`` (no physical scale).
        by_domain: pixel size in micrometres per domain name, for domains whose images do not say.
        default: pixel size of any other image (e.g. a folder given to ``lld predict``), null = unknown.
    """

    working: float | None = None
    by_domain: dict[str, float] | None = None
    default: float | None = None

    def __post_init__(self) -> None:
        values = {"working": self.working, "default": self.default, **(self.by_domain or {})}
        for name, value in values.items():
            if value is not None and not value > 0:
                raise ValueError(
                    f"pixel_size.{name} must be a positive number of micrometres, got {value}"
                )

    def of(self, record: ImageRecord) -> float | None:
        """The pixel size of ``record`` (its own, else its domain's, else the default)."""
        if record.pixel_size_um is not None:
            return record.pixel_size_um
        if self.by_domain and record.domain in self.by_domain:
            return float(self.by_domain[record.domain])
        objective = lld_objective(record.domain)
        if objective is not None:
            return LLD_PIXEL_SIZE_UM[objective]
        return self.default


class LldDataModule(L.LightningDataModule):
    """Serves LLD images (or any dataset in the LLD, COCO or plain YOLO format) by split and domain.

    With ``root`` null it generates the built-in synthetic data set on first use
    (``synthetic``), so a fresh clone trains without any download. The defaults are the shipped
    recipe (``configs/sparse.yaml``).

    Args:
        root: dataset folder; null = the built-in synthetic data.
        format: ``lld`` (sparse YOLO, 16 numbers a row), ``coco`` (COCO JSON with attributes) or ``yolo`` (plain, fully annotated).
        class_names: class names; their count is the model's number of classes (default: the LLD classes).
        attribute_spec: ``{name: number of values}`` (default: the LLD attributes; none for ``yolo``; derived from ``reading.attribute_columns`` when given).
        image_size: square model input size of evaluation; images are letterboxed on the device (with ``pixel_size.working``: resampled, and the evaluation canvas grows to hold them).
        batch_size: images per batch.
        num_workers: data-loading worker processes.
        seed: seed of the sparse rectangles, the val hold-out and the synthetic data.
        splits: split names and the val hold-out.
        domains: domains to use per stage.
        reading: how label files and images are read and checked.
        augmentation: the training augmentation; its cell filter and fill apply to evaluation too.
        pixel_size: physical scale: the working micrometres per pixel and each image's own.
        synthetic: the built-in synthetic data (used when ``root`` is null).
        sparse_simulation: keep one seeded rectangle of this area fraction labelled per training image (the paper's protocol, 0.2); null keeps the labels.
        keep_hidden: with ``sparse_simulation``, training batches also carry the full annotation (``hidden_boxes``, ``hidden_labels``) to score pseudo-labels.
        teacher_view: training batches also carry the evaluation view of the same images (``teacher_*`` keys) for the pseudo-labeller's teacher.
        predict_root: a folder of images (any layout), or one image, for ``lld predict``.
    """

    def __init__(
        self,
        root: str | None = None,
        format: Literal["lld", "coco", "yolo"] = "lld",
        class_names: list[str] | None = None,
        attribute_spec: dict[str, int] | None = None,
        image_size: int = 640,
        batch_size: int = 8,
        num_workers: int = 2,
        seed: int = 0,
        splits: Splits = Splits(),  # noqa: B008 (frozen dataclasses: never mutated)
        domains: Domains = Domains(),  # noqa: B008
        reading: ReadOptions = ReadOptions(),  # noqa: B008
        augmentation: Augmentation = Augmentation(),  # noqa: B008
        pixel_size: PixelSize = PixelSize(),  # noqa: B008
        synthetic: SyntheticData = SyntheticData(),  # noqa: B008
        sparse_simulation: float | None = None,
        keep_hidden: bool = False,
        teacher_view: bool = False,
        predict_root: str | None = None,
    ) -> None:
        super().__init__()
        # The label space is logged once, by the model it is linked into; groups are stored as
        # plain dicts so that checkpoints load with torch's weights_only.
        self.save_hyperparameters(
            {
                "root": root,
                "format": format,
                "image_size": image_size,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "seed": seed,
                "splits": dataclasses.asdict(splits),
                "domains": dataclasses.asdict(domains),
                "reading": dataclasses.asdict(reading),
                "augmentation": dataclasses.asdict(augmentation),
                "pixel_size": dataclasses.asdict(pixel_size),
                "synthetic": dataclasses.asdict(synthetic),
                "sparse_simulation": sparse_simulation,
                "keep_hidden": keep_hidden,
                "teacher_view": teacher_view,
                "predict_root": predict_root,
            }
        )
        self.root = Path(root) if root is not None else None
        self.format = format
        self.class_names = list(class_names) if class_names is not None else list(LLD_CLASSES)
        self.attribute_spec = _attribute_spec(format, attribute_spec, reading.attribute_columns)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.seed = seed
        self.splits, self.domains, self.reading, self.synthetic = (
            splits,
            domains,
            reading,
            synthetic,
        )
        self.sparse_simulation, self.keep_hidden = sparse_simulation, keep_hidden
        self.teacher_view = teacher_view
        self.predict_root = predict_root
        self.pixel_size = pixel_size
        #: The pixel size of every image ``lld predict`` reads (``--pixel_size_um``), None = as
        #: `pixel_size` says, `AUTO_PIXEL_SIZE` = measured from the red cells of each domain
        #: whose size `pixel_size` does not give.
        self.predict_pixel_size_um: float | Literal["auto"] | None = None
        #: What `AUTO_PIXEL_SIZE` measured, by domain (filled when the predict data is set up).
        self.estimated_pixel_sizes: dict[str, PixelSizeEstimate] = {}
        self.report = DataReport(on_error=reading.on_error)
        # What the loaders skip while a stage runs (undecodable images, files `lld predict` cannot
        # read); printed and reset at the end of the stage (`teardown`).
        self.skip_report = DataReport(on_error=reading.on_error)
        self.train_set: LldDataset | None = None
        self.val_set: LldDataset | None = None
        self.test_sets: dict[str, LldDataset] = {}
        self.predict_set: LldDataset | None = None
        self.train_augmentation = DeviceAugmentation(
            image_size, True, augmentation, working_pixel_size=pixel_size.working
        )
        self.eval_transform = DeviceAugmentation(
            image_size, False, augmentation, working_pixel_size=pixel_size.working
        )

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
        s = self.synthetic
        return (
            Path(s.dir)
            / f"n{s.num_images}_s{s.image_size}_seed{self.seed}_sparse{s.sparse_fraction}"
        )

    # ----------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Generate the synthetic data once (local rank 0 only) when no ``root`` is given."""
        if self.root is not None:
            return
        from lld_lightning.data import synthetic

        s = self.synthetic
        kwargs = dict(
            num_images=s.num_images,
            seed=self.seed,
            image_size=s.image_size,
            sparse_fraction=s.sparse_fraction,
        )
        if not synthetic.is_generated(self.data_root, **kwargs):
            synthetic.generate(self.data_root, **kwargs)

    def format_options(self) -> FormatOptions:
        """What the label-format readers need besides the folder (label space and ``reading``)."""
        r = self.reading
        kwargs: dict[str, Any] = dict(
            num_classes=self.num_classes,
            class_names=self.class_names,
            attribute_spec=self.attribute_spec,
            region_order=r.region_order,
            missing_labels=r.missing_labels,
            max_image_pixels=r.max_image_pixels,
            manifest=r.manifest,
            domain_column=r.domain_column,
            attribute_csv=r.attribute_csv,
            check_images=r.check_images,
            pixel_size_column=r.pixel_size_column,
        )
        if r.attribute_columns is not None:
            kwargs["attribute_columns"] = r.attribute_columns
        return FormatOptions(**kwargs)

    def load_all_records(self) -> list[ImageRecord]:
        """Every annotated image under the data root, validated (errors name the file and line)."""
        if self.root is not None and not self.root.exists():
            raise DataError.at(self.root, "data root does not exist")
        records = load_records(self.data_root, self.format, self.format_options(), self.report)
        return [dataclasses.replace(r, pixel_size_um=self.pixel_size.of(r)) for r in records]

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self.predict_set = self._predict_dataset()
            return
        if self.train_set is not None and self.test_sets:
            return
        records = self.load_all_records()
        by_split: dict[str, list[ImageRecord]] = {}
        for record in records:
            by_split.setdefault(record.split, []).append(record)
        splits, domains = self.splits, self.domains
        train = self._select(by_split.get(splits.train, []), domains.train, "train")
        val = self._select(by_split.get(splits.val, []), domains.val, "val")
        if not val and train:
            train, val = self._hold_out(train, splits.val_fraction)
        test = self._select(by_split.get(splits.test, []), domains.test, "test")
        if not train and stage in (None, "fit"):
            raise DataError.at(
                self.data_root,
                f"no training images in split {splits.train!r} (domains {domains.train or 'all'})",
            )
        self._check_pixel_sizes(train, val + test)
        self.train_set = self._train_dataset(train)
        self.val_set = self._dataset(val)
        self.test_sets = {
            domain: self._dataset([r for r in test if r.domain == domain])
            for domain in sorted({r.domain for r in test})
        }
        if self.trainer is None or self.trainer.is_global_zero:
            Console(stderr=True).print(summarize_records(records, self.report))

    def _check_pixel_sizes(self, train: list[ImageRecord], evaluated: list[ImageRecord]) -> None:
        """At a working resolution, every training image needs a pixel size (a letterboxed one
        would teach the wrong cell size); evaluated images without one are letterboxed, said once."""
        if self.pixel_size.working is None:
            return
        unknown = sorted({r.domain for r in train if r.pixel_size_um is None})
        if unknown:
            raise DataError.at(
                self.data_root,
                f"pixel_size.working is {self.pixel_size.working} um but the training images of "
                f"domain(s) {unknown} have no pixel size: give data.pixel_size.by_domain, a "
                f"manifest column {self.reading.pixel_size_column!r} or data.pixel_size.default",
            )
        unknown = sorted({r.domain for r in evaluated if r.pixel_size_um is None})
        if unknown:
            rank_zero_warn(
                f"images of domain(s) {unknown} have no pixel size: they are letterboxed to "
                f"{self.image_size} pixels instead of resampled to {self.pixel_size.working} um"
            )

    def _dataset(
        self,
        records: list[ImageRecord],
        hidden: list[ImageRecord] | None = None,
        train: bool = False,
        on_error: OnError | None = None,
    ) -> LldDataset:
        return LldDataset(
            records,
            self.num_attributes,
            self.reading.max_image_pixels,
            hidden,
            on_error=on_error or self.reading.on_error,
            fill_skipped=train,
        )

    def _train_dataset(self, records: list[ImageRecord]) -> LldDataset:
        """The training images, made sparse by ``sparse_simulation`` (the full ones kept if asked)."""
        if self.sparse_simulation is None:
            return self._dataset(records, train=True)
        sparse = [simulate_sparse(r, self.sparse_simulation, self.seed) for r in records]
        return self._dataset(sparse, records if self.keep_hidden else None, train=True)

    def _select(
        self, records: list[ImageRecord], domains: list[str] | None, stage: str
    ) -> list[ImageRecord]:
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

    def _hold_out(
        self, records: list[ImageRecord], fraction: float
    ) -> tuple[list[ImageRecord], list[ImageRecord]]:
        """Seeded split of training images into train and val when the data has no val split."""
        order = np.random.default_rng(self.seed).permutation(len(records))
        num_val = max(1, int(round(fraction * len(records)))) if len(records) > 1 else 0
        val_ids = set(order[:num_val].tolist())
        return (
            [r for i, r in enumerate(records) if i not in val_ids],
            [dataclasses.replace(r, split="val") for i, r in enumerate(records) if i in val_ids],
        )

    def _predict_dataset(self) -> LldDataset:
        """Every readable image under ``predict_root``; whatever else is there is skipped and
        listed in `skip_report` whatever ``on_error`` says (one file never costs the others)."""
        if self.predict_root is None:
            raise DataError(
                "no images to predict on: set --data.predict_root to a folder of images"
            )
        folder = Path(self.predict_root)
        if not folder.exists():
            raise DataError.at(folder, "predict_root not found")
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
        manifest = self._predict_manifest()
        records = []
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                self.skip_report.skip_file(
                    NOT_AN_IMAGE,
                    path,
                    f"{path}: suffix {path.suffix!r} is none of {', '.join(sorted(IMAGE_EXTENSIONS))}",
                )
                continue
            try:
                width, height, _ = probe_image(path, self.reading.max_image_pixels)
            except DataError as error:
                self.skip_report.skip_file(UNREADABLE_IMAGE, path, str(error))
                continue
            record = ImageRecord(
                path=path,
                width=width,
                height=height,
                image_id=len(records),
                split="predict",
                attributes=np.zeros((0, self.num_attributes), dtype=np.int64),
                domain=domain_from_path(path, folder) or DEFAULT_DOMAIN,
            )
            try:
                row = manifest.lookup(path.name, "") if manifest is not None else None
            except DataError:  # listed twice: the manifest cannot say which row is this image
                row = None
            if row is not None:  # a manifest that lists the image gives its domain and size
                record.domain = row.values.get(self.reading.domain_column) or record.domain
                record.pixel_size_um = manifest_pixel_size(
                    manifest, row, self.reading.pixel_size_column
                )
            given = self.predict_pixel_size_um
            if given is not None and given != AUTO_PIXEL_SIZE:
                record.pixel_size_um = float(given)
            else:
                record.pixel_size_um = self.pixel_size.of(record)
            records.append(record)
        if not records:
            lines = "; ".join(self.skip_report.summary_lines()) or "the folder is empty"
            raise DataError.at(folder, f"no readable images: {lines}")
        if self.predict_pixel_size_um == AUTO_PIXEL_SIZE:
            self._estimate_pixel_sizes(records, folder)
        if self.pixel_size.working is None:
            self._warn_shrunk(records)
        return self._dataset(records, on_error="skip")

    def _estimate_pixel_sizes(self, records: list[ImageRecord], folder: Path) -> None:
        """Give each domain's images without a pixel size the one measured from their red cells
        (`estimate_pixel_size`, up to `MAX_IMAGES` of them, evenly spaced)."""
        unknown: dict[str, list[ImageRecord]] = {}
        for record in records:
            if record.pixel_size_um is None:
                unknown.setdefault(record.domain, []).append(record)
        console = Console(stderr=True)
        for domain, group in sorted(unknown.items()):
            images = []
            for record in evenly_spaced(group, MAX_IMAGES):
                try:
                    images.append(read_image(record.path, self.reading.max_image_pixels))
                except DataError:  # the loader skips and lists it; the others still measure
                    continue
            try:
                estimate = estimate_pixel_size(images)
            except NoRedCellsError:
                raise DataError.at(
                    folder,
                    f"--pixel_size_um auto: no red cells to measure in {len(images)} image(s) "
                    f"of domain {domain!r}; give the pixel size (--pixel_size_um 0.2) or list it "
                    "in a manifest",
                ) from None
            self.estimated_pixel_sizes[domain] = estimate
            for record in group:
                record.pixel_size_um = estimate.pixel_size_um
            if rank_zero_only.rank == 0:  # every process measures; one says so
                console.print(
                    f"pixel size of {domain!r}: {estimate.pixel_size_um:.4g} um measured from "
                    f"{estimate.cells} cells in {estimate.images} image(s) (red cells "
                    f"{estimate.diameter_px:.0f} px across)"
                )

    def _predict_manifest(self) -> Manifest | None:
        """``reading.manifest`` when it is an absolute path or exists under ``root``: it may give
        the predicted images their domain and pixel size (looked up by file name)."""
        if self.reading.manifest is None:
            return None
        path = Path(self.reading.manifest)
        if not path.is_absolute():
            if self.root is None or not (self.root / path).is_file():
                return None
            path = self.root / path
        return load_manifest(path, domain_column=self.reading.domain_column)

    def _warn_shrunk(self, records: list[ImageRecord]) -> None:
        """Name the images the evaluation letterbox shrinks by more than
        `MAX_SHRINK_WITHOUT_WARNING` (small cells may vanish at the model's input size)."""
        shrunk = [
            (r, max(r.width, r.height) / self.image_size)
            for r in records
            if max(r.width, r.height) > MAX_SHRINK_WITHOUT_WARNING * self.image_size
        ]
        if not shrunk:
            return
        named = ", ".join(f"{r.path} ({r.width}x{r.height}, {f:.1f}x)" for r, f in shrunk[:5])
        more = f" and {len(shrunk) - 5} more" if len(shrunk) > 5 else ""
        rank_zero_warn(
            f"lld predict: {len(shrunk)} image(s) shrunk more than "
            f"{MAX_SHRINK_WITHOUT_WARNING:g}x to the {self.image_size}-pixel model input "
            f"(data.image_size), where small cells may be missed: {named}{more}. Crop or tile "
            "such images to the magnification the model was trained on."
        )

    # ------------------------------------------------------------------------------ dataloaders
    def _loader(self, dataset: LldDataset, shuffle: bool) -> SkipCountingLoader:
        return SkipCountingLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.batch_size,
            report=self.skip_report,
        )

    def train_dataloader(self, shuffle: bool = True) -> SkipCountingLoader:
        """The training images; ``shuffle=False`` reads each once, in order, with no batch
        dropped (for measuring a model on them)."""
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, shuffle=shuffle)

    def val_dataloader(self) -> SkipCountingLoader:
        assert self.val_set is not None, "call setup('fit') first"
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> dict[str, SkipCountingLoader]:
        """One named loader per test domain."""
        if not self.test_sets:
            raise DataError.at(self.data_root, f"no test images in split {self.splits.test!r}")
        return {domain: self._loader(ds, shuffle=False) for domain, ds in self.test_sets.items()}

    def predict_dataloader(self) -> SkipCountingLoader:
        assert self.predict_set is not None, "call setup('predict') first"
        return self._loader(self.predict_set, shuffle=False)

    def teardown(self, stage: str) -> None:
        """Print what the loaders skipped during ``stage`` (each file once), then start afresh."""
        report, self.skip_report = self.skip_report, DataReport(on_error=self.reading.on_error)
        if not report.num_skipped:
            return
        rank = ""
        if self.trainer is not None and self.trainer.world_size > 1:
            rank = f" (rank {self.trainer.global_rank})"
        lines = "\n".join(f"  {line}" for line in report.summary_lines())
        name = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        print(f"lld {name}{rank}: skipped {report.num_skipped} file(s):\n{lines}", file=sys.stderr)

    @property
    def test_domains(self) -> list[str]:
        """The domains of the test images (one test loader each), after `setup`."""
        return list(self.test_sets)

    @property
    def val_domains(self) -> list[str]:
        """The domains of the validation images, after `setup`."""
        return sorted({r.domain for r in self.val_set.records}) if self.val_set is not None else []

    # --------------------------------------------------------------------------- augmentation
    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Augment (training) or letterbox (evaluation) on the device the batch now lives on."""
        if self.trainer is None or not self.trainer.training:
            return self.eval_transform(batch)
        out = self.train_augmentation(batch)
        if self.teacher_view:
            self._add_teacher_view(out, self.eval_transform(batch))
        return out

    @staticmethod
    def _add_teacher_view(batch: Batch, weak: Batch) -> None:
        """Add the weak (evaluation) view as ``teacher_<key>``: the expert labels in that view."""
        for key in TEACHER_KEYS:
            batch[f"teacher_{key}"] = weak[key]  # type: ignore[literal-required]


def _attribute_spec(
    format: str,
    attribute_spec: dict[str, int] | None,
    attribute_columns: dict[str, list[str]] | None,
) -> dict[str, int]:
    """The attribute spec: from ``attribute_columns`` when given, else as asked, else the default."""
    if attribute_columns is not None:
        return {name: len(values) for name, values in attribute_columns.items()}
    if attribute_spec is not None:
        return dict(attribute_spec)
    return dict(LLD_ATTRIBUTE_SPEC) if format != "yolo" else {}
