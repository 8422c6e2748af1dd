"""`LldDataset`: image records -> samples of the one sample contract (see `sample.py`), and
`SkipCountingLoader`, which counts the images the dataset skipped in the main process."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lld_lightning.data.errors import DataError, DataReport, OnError
from lld_lightning.data.images import read_image
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sample import SKIPPED_KEY, Batch, Sample, SkippedImage

#: `DataReport` reason of an image that failed to decode when a loader read it.
UNREADABLE_IMAGE: str = "unreadable image"


class LldDataset(Dataset):
    """Decodes images lazily; annotations come from already-validated `ImageRecord` objects.

    A decode error (truncated or corrupt file, a size that differs from the label's) follows
    ``on_error`` whenever it is found: ``raise`` raises the `DataError` naming the file;
    ``skip`` skips the image, and the batch reports it under `SKIPPED_KEY` (see `collate`).

    Args:
        records: the images of this split (already filtered by domain and made sparse if asked).
        num_attributes: ``A``, the width of the attribute array (used for images without cells).
        max_image_pixels: decode limit; larger images raise `DataError`.
        hidden_records: the same images fully annotated (one per record, same order), given
            only when asked for (``LldDataModule(keep_hidden=True)``) for ``records`` made sparse
            by `simulate_sparse`; each sample then also carries ``hidden_boxes`` and
            ``hidden_labels`` (see `Sample`). Never trained on, only to measure pseudo-labels.
        on_error: ``raise`` or ``skip`` an image that cannot be decoded.
        fill_skipped: under ``skip``, return the next readable image in place of an unreadable
            one, so that every batch keeps its size and every process takes the same number of
            steps (training); otherwise return a marker that `collate` drops (evaluation and
            prediction, where an image must not count twice).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        num_attributes: int,
        max_image_pixels: int,
        hidden_records: Sequence[ImageRecord] | None = None,
        on_error: OnError = "raise",
        fill_skipped: bool = False,
    ) -> None:
        self.records = list(records)
        self.num_attributes = num_attributes
        self.max_image_pixels = max_image_pixels
        self.hidden_records = list(hidden_records) if hidden_records is not None else None
        if self.hidden_records is not None and len(self.hidden_records) != len(self.records):
            raise ValueError(
                f"{len(self.hidden_records)} hidden records for {len(self.records)} records"
            )
        self.on_error = on_error
        self.fill_skipped = fill_skipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if self.on_error == "raise":
            return self._sample(index)
        skipped: list[SkippedImage] = []
        # Deterministic stand-ins (the next indices) keep a resumed epoch identical.
        for offset in range(len(self.records) if self.fill_skipped else 1):
            candidate = (index + offset) % len(self.records)
            try:
                sample = self._sample(candidate)
            except DataError as error:
                skipped.append(SkippedImage(str(self.records[candidate].path), str(error)))
                continue
            if skipped:
                sample[SKIPPED_KEY] = skipped
            return sample
        if self.fill_skipped:
            raise DataError.at(
                self.records[index].path.parent,
                f"none of the {len(self.records)} images of this split can be decoded; the "
                f"first: {skipped[0].message}",
            )
        return {SKIPPED_KEY: skipped}  # type: ignore[typeddict-item]

    def _sample(self, index: int) -> Sample:
        record = self.records[index]
        image = read_image(record.path, self.max_image_pixels)  # uint8 [3, H, W]
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError.at(
                record.path,
                f"decoded size {image.shape[2]}x{image.shape[1]} differs from the annotated size "
                f"{record.width}x{record.height}",
            )
        attributes = torch.from_numpy(record.attributes).long()
        if attributes.numel() == 0:
            attributes = attributes.reshape(record.num_cells, self.num_attributes)
        sample: Sample = {
            "image": image,
            "boxes": torch.from_numpy(record.boxes_xyxy).float().reshape(-1, 4),
            "labels": torch.from_numpy(record.labels).long(),
            "attributes": attributes,
            "regions": torch.from_numpy(record.regions_xyxy).float().reshape(-1, 4),
            "domain": record.domain,
            "image_id": record.image_id,
            "path": str(record.path),
            "pixel_size_um": math.nan if record.pixel_size_um is None else record.pixel_size_um,
        }
        if self.hidden_records is not None:
            hidden = self.hidden_records[index]
            sample["hidden_boxes"] = torch.from_numpy(hidden.boxes_xyxy).float().reshape(-1, 4)
            sample["hidden_labels"] = torch.from_numpy(hidden.labels).long()
        return sample


class SkipCountingLoader(DataLoader):
    """A `DataLoader` that counts, in the main process, the images its dataset skipped.

    Workers cannot share a counter with the main process, so each batch carries the images it
    skipped (`SKIPPED_KEY`); this loader moves them into ``report`` and never yields a batch
    left without images.

    Args:
        report: receives each skipped file once (`DataReport.skip_file`); None = not counted.
        *args: as `DataLoader`.
        **kwargs: as `DataLoader`.
    """

    def __init__(self, *args: Any, report: DataReport | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        for batch in super().__iter__():
            for skipped in batch.pop(SKIPPED_KEY, []):
                if self.report is not None:
                    self.report.skip_file(UNREADABLE_IMAGE, skipped.path, skipped.message)
            if "image" in batch:
                yield batch
