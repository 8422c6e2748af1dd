"""`LldDataset`: image records -> samples of the one sample contract (see `sample.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from lld_lightning.data.errors import DataError
from lld_lightning.data.images import read_image
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sample import Sample


class LldDataset(Dataset):
    """Decodes images lazily; annotations come from already-validated `ImageRecord` objects.

    Args:
        records: the images of this split (already filtered by domain and made sparse if asked).
        num_attributes: ``A``, the width of the attribute array (used for images without cells).
        max_image_pixels: decode limit; larger images raise `DataError`.
        hidden_records: the same images fully annotated (one per record, same order), given
            only when asked for (``LldDataModule(keep_hidden=True)``) for ``records`` made sparse
            by `simulate_sparse`; each sample then also carries ``hidden_boxes`` and
            ``hidden_labels`` (see `Sample`). Never trained on, only to measure pseudo-labels.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        num_attributes: int,
        max_image_pixels: int,
        hidden_records: Sequence[ImageRecord] | None = None,
    ) -> None:
        self.records = list(records)
        self.num_attributes = num_attributes
        self.max_image_pixels = max_image_pixels
        self.hidden_records = list(hidden_records) if hidden_records is not None else None
        if self.hidden_records is not None and len(self.hidden_records) != len(self.records):
            raise ValueError(
                f"{len(self.hidden_records)} hidden records for {len(self.records)} records"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
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
        }
        if self.hidden_records is not None:
            hidden = self.hidden_records[index]
            sample["hidden_boxes"] = torch.from_numpy(hidden.boxes_xyxy).float().reshape(-1, 4)
            sample["hidden_labels"] = torch.from_numpy(hidden.labels).long()
        return sample
