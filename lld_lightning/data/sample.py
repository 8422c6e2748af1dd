"""The one sample contract and the batch it collates into.

A **sample** (what `LldDataset.__getitem__` returns) is a dict:

- ``image``: uint8 ``[3, H, W]`` RGB (converted to float in [0, 1] on the device, see
  `transforms.py`; the model normalises, nothing else does);
- ``boxes``: float32 ``[N, 4]`` xyxy pixels;
- ``labels``: int64 ``[N]``;
- ``attributes``: int64 ``[N, A]``, ``IGNORE_INDEX`` (-1) = not annotated;
- ``regions``: float32 ``[R, 4]`` xyxy pixels, the annotated rectangles (whole image when fully
  annotated, empty when unlabelled);
- ``domain``: str; ``image_id``: int; ``path``: str.

A **batch** (what `collate` returns) pads images to the largest ``H, W`` of the batch (top-left
aligned) and cells/regions to the largest count:

- ``image``: uint8 ``[B, 3, Hmax, Wmax]``; ``image_size``: int64 ``[B, 2]`` valid ``(h, w)``;
- ``boxes``: float32 ``[B, M, 4]``; ``labels``: int64 ``[B, M]`` (``IGNORE_INDEX`` = padding);
- ``attributes``: int64 ``[B, M, A]``;
- ``regions``: float32 ``[B, R, 4]``; ``region_valid``: bool ``[B, R]``;
- ``domain``: list[str]; ``image_id``: int64 ``[B]``; ``path``: list[str].

A cell is real where ``labels >= 0``.

Optional, only when every sample has them (a training set made sparse by ``sparse_simulation``):
``hidden_boxes`` float32 ``[B, H, 4]`` (original pixels, never transformed) and ``hidden_labels``
int64 ``[B, H]`` (``IGNORE_INDEX`` = padding), the full annotation the sparse labels came from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lld_lightning.constants import IGNORE_INDEX

Sample = dict[str, Any]
Batch = dict[str, Any]


def collate(samples: list[Sample]) -> Batch:
    """Pad a list of samples into one batch (see the module docstring for the contract)."""
    batch_size = len(samples)
    heights = [int(s["image"].shape[1]) for s in samples]
    widths = [int(s["image"].shape[2]) for s in samples]
    images = samples[0]["image"].new_zeros((batch_size, 3, max(heights), max(widths)))
    for i, sample in enumerate(samples):
        images[i, :, : heights[i], : widths[i]] = sample["image"]

    max_cells = max([int(s["labels"].shape[0]) for s in samples] + [0])
    max_regions = max([int(s["regions"].shape[0]) for s in samples] + [1])
    num_attributes = int(samples[0]["attributes"].shape[1])
    boxes = torch.zeros((batch_size, max_cells, 4), dtype=torch.float32)
    labels = torch.full((batch_size, max_cells), IGNORE_INDEX, dtype=torch.int64)
    attributes = torch.full((batch_size, max_cells, num_attributes), IGNORE_INDEX, dtype=torch.int64)
    regions = torch.zeros((batch_size, max_regions, 4), dtype=torch.float32)
    region_valid = torch.zeros((batch_size, max_regions), dtype=torch.bool)
    for i, sample in enumerate(samples):
        n, r = int(sample["labels"].shape[0]), int(sample["regions"].shape[0])
        boxes[i, :n] = sample["boxes"]
        labels[i, :n] = sample["labels"]
        attributes[i, :n] = sample["attributes"]
        regions[i, :r] = sample["regions"]
        region_valid[i, :r] = True
    batch = {
        "image": images,
        "image_size": torch.tensor(list(zip(heights, widths, strict=True)), dtype=torch.int64),
        "boxes": boxes,
        "labels": labels,
        "attributes": attributes,
        "regions": regions,
        "region_valid": region_valid,
        "domain": [s["domain"] for s in samples],
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
        "path": [str(s["path"]) for s in samples],
    }
    if all("hidden_boxes" in s for s in samples):
        batch.update(_collate_hidden(samples))
    return batch


def _collate_hidden(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Pad the hidden full annotations: ``hidden_boxes [B, H, 4]``, ``hidden_labels [B, H]``."""
    max_hidden = max(int(s["hidden_labels"].shape[0]) for s in samples)
    boxes = torch.zeros((len(samples), max_hidden, 4), dtype=torch.float32)
    labels = torch.full((len(samples), max_hidden), IGNORE_INDEX, dtype=torch.int64)
    for i, sample in enumerate(samples):
        n = int(sample["hidden_labels"].shape[0])
        boxes[i, :n] = sample["hidden_boxes"]
        labels[i, :n] = sample["hidden_labels"]
    return {"hidden_boxes": boxes, "hidden_labels": labels}


def unbatch_targets(batch: Batch) -> list[dict[str, torch.Tensor]]:
    """Per-image target dicts (``boxes``, ``labels``, ``attributes``, ``regions``) without padding."""
    targets = []
    for i in range(batch["labels"].shape[0]):
        real = batch["labels"][i] >= 0
        targets.append({
            "boxes": batch["boxes"][i][real],
            "labels": batch["labels"][i][real],
            "attributes": batch["attributes"][i][real],
            "regions": batch["regions"][i][batch["region_valid"][i]],
        })
    return targets


def pack_per_image(
    values: dict[str, Tensor], image_index: Tensor, batch_size: int, min_width: int = 0
) -> dict[str, Tensor]:
    """Scatter flat per-detection tensors into padded per-image ones, order kept.

    Args:
        values: ``{name: [N, ...]}`` tensors, sorted by ``image_index``.
        image_index: int64 ``[N]`` (sorted).
        batch_size: ``B``.
        min_width: the least ``K`` (e.g. 1 for regions, which a batch always has a slot for).

    Returns:
        ``{name: [B, K, ...]}`` with ``K`` the largest count, plus ``valid`` bool ``[B, K]``;
        padding is zero (callers overwrite labels with ``IGNORE_INDEX``).
    """
    counts = torch.bincount(image_index, minlength=batch_size)  # [B]
    width = max(int(counts.max()) if image_index.numel() else 0, min_width)
    rank = (
        torch.arange(image_index.numel(), device=image_index.device)
        - (counts.cumsum(0) - counts)[image_index]
    )
    packed = {}
    for name, value in values.items():
        out = value.new_zeros((batch_size, width, *value.shape[1:]))
        out[image_index, rank] = value
        packed[name] = out
    valid = torch.zeros((batch_size, width), dtype=torch.bool, device=image_index.device)
    valid[image_index, rank] = True
    packed["valid"] = valid
    return packed
