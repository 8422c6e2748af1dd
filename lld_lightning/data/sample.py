"""The sample and batch contracts: every key once, with its dtype, shape and writer.

Images stay uint8 until the device; nothing in ``data/`` normalises (the model does, once). Boxes
and regions are xyxy in continuous pixels (pixel ``i`` spans ``[i, i + 1]``). A cell is real where
``labels >= 0``; ``IGNORE_INDEX`` (-1) marks padding and missing attributes.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple, TypedDict

import torch
from torch import Tensor

from lld_lightning.constants import IGNORE_INDEX

#: Key of the images a sample or batch skipped (`SkippedImage` list); `LldDataset` writes it under
#: ``on_error: skip``, `collate` gathers it and `SkipCountingLoader` takes it out of the batch.
SKIPPED_KEY: Final = "skipped"


class SkippedImage(NamedTuple):
    """An image the dataset skipped: its file and the `DataError` message naming it."""

    path: str
    message: str


class _SampleRequired(TypedDict):
    image: Tensor  # uint8 [3, H, W] RGB
    boxes: Tensor  # float32 [N, 4] xyxy pixels
    labels: Tensor  # int64 [N]
    attributes: Tensor  # int64 [N, A], IGNORE_INDEX = not annotated
    regions: Tensor  # float32 [R, 4] xyxy; the whole image when fully annotated, none if unlabelled
    domain: str
    image_id: int
    path: str


class Sample(_SampleRequired, total=False):
    """One image, as `LldDataset.__getitem__` returns it.

    Only with ``LldDataModule(sparse_simulation=..., keep_hidden=True)``, on training images: the
    full annotation the sparse labels were cut from (never trained on; it scores pseudo-labels).
    """

    hidden_boxes: Tensor  # float32 [H, 4] xyxy, original pixels
    hidden_labels: Tensor  # int64 [H]
    # LldDataset (always): micrometres per pixel of this image, NaN = unknown; absent = unknown.
    pixel_size_um: float
    # LldDataset under on_error: skip: the unreadable images this sample stands in for. A
    # dict holding only this key is a marker: the image was skipped and nothing stands in.
    skipped: list[SkippedImage]


class _BatchRequired(TypedDict):
    # Written by `collate` (on the CPU); images padded top-left to the largest H, W of the batch,
    # cells and regions padded to the largest count.
    image: Tensor  # uint8 [B, 3, Hmax, Wmax]; float32 [B, 3, S, S] in [0, 1] after the device step
    image_size: Tensor  # int64 [B, 2] valid (h, w) of each original image
    boxes: Tensor  # float32 [B, M, 4] xyxy
    labels: Tensor  # int64 [B, M], IGNORE_INDEX = padding
    attributes: Tensor  # int64 [B, M, A], IGNORE_INDEX = padding or not annotated
    regions: Tensor  # float32 [B, R, 4] xyxy, R >= 1
    region_valid: Tensor  # bool [B, R], False = padding
    domain: list[str]
    image_id: Tensor  # int64 [B]
    path: list[str]
    pixel_size_um: Tensor  # float32 [B] micrometres per original pixel; NaN = unknown


class Batch(_BatchRequired, total=False):
    """A batch of samples, from the loader to the loss. Who writes which keys:

    - `collate` (CPU): the required keys, ``hidden_*`` when every sample has them and
      ``skipped`` when the dataset skipped an image (`SkipCountingLoader` removes it).
    - `LldDataModule.on_after_batch_transfer` (device), through `DeviceAugmentation`: replaces
      ``image`` by float32 ``[B, 3, S, S]`` in ``[0, 1]`` (``S`` = ``crop_size`` in training when
      set, else ``image_size``), maps ``boxes``/``regions`` into output pixels (dropped cells become
      padding, empty regions invalid) and adds ``transform``. ``image_size`` keeps the originals.
      With ``teacher_view`` (training only) it adds the ``teacher_*`` keys: the evaluation letterbox
      of the same images, with ``transform @ inverse(teacher_transform)`` mapping the teacher's
      view to the student's.
    - `PseudoLabeller` (training, after the teacher ran): appends pseudo-labels to ``boxes``,
      ``labels``, ``attributes`` (``M`` grows) and writes the per-cell ``weights`` (and
      ``box_weights``, ``normaliser_weights`` where asked). The loss reads each of these keys as
      optional: a missing weight is 1.
    """

    # collate, with keep_hidden: the full annotation, original pixels, never transformed.
    hidden_boxes: Tensor  # float32 [B, H, 4]
    hidden_labels: Tensor  # int64 [B, H], IGNORE_INDEX = padding
    # collate, under on_error: skip: the images skipped in this batch; the only key when no
    # image is left.
    skipped: list[SkippedImage]
    # DeviceAugmentation.
    transform: Tensor  # float32 [B, 3, 3]: original pixels -> output pixels
    # LldDataModule with teacher_view (training): the weak (evaluation) view.
    teacher_image: Tensor  # float32 [B, 3, S', S'] in [0, 1], S' = image_size
    teacher_transform: Tensor  # float32 [B, 3, 3]
    teacher_boxes: Tensor  # float32 [B, M, 4]
    teacher_labels: Tensor  # int64 [B, M]
    teacher_regions: Tensor  # float32 [B, R, 4]
    teacher_region_valid: Tensor  # bool [B, R]
    # PseudoLabeller; the loss reads each one as optional.
    weights: Tensor  # float32 [B, M]: each cell's weight in every loss term (expert 1)
    box_weights: Tensor  # float32 [B, M]: replaces `weights` in the box terms
    normaliser_weights: Tensor  # float32 [B, M]: how much a positive counts in num_foreground


def collate(samples: list[Sample]) -> Batch:
    """Pad a list of samples into one `Batch` (its required keys, plus ``hidden_*``).

    Skip markers (a sample holding only `SKIPPED_KEY`) are dropped and every skipped image is
    listed under `SKIPPED_KEY`; a batch of markers only is ``{SKIPPED_KEY: [...]}``.
    """
    skipped = [image for sample in samples for image in sample.get(SKIPPED_KEY, [])]
    samples = [sample for sample in samples if "image" in sample]
    if not samples:
        return {SKIPPED_KEY: skipped}  # type: ignore[typeddict-item]
    batch = _collate_images(samples)
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch


def _collate_images(samples: list[Sample]) -> Batch:
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
    attributes = torch.full(
        (batch_size, max_cells, num_attributes), IGNORE_INDEX, dtype=torch.int64
    )
    regions = torch.zeros((batch_size, max_regions, 4), dtype=torch.float32)
    region_valid = torch.zeros((batch_size, max_regions), dtype=torch.bool)
    for i, sample in enumerate(samples):
        n, r = int(sample["labels"].shape[0]), int(sample["regions"].shape[0])
        boxes[i, :n] = sample["boxes"]
        labels[i, :n] = sample["labels"]
        attributes[i, :n] = sample["attributes"]
        regions[i, :r] = sample["regions"]
        region_valid[i, :r] = True
    batch: Batch = {
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
        "pixel_size_um": torch.tensor(
            [float(s.get("pixel_size_um", math.nan)) for s in samples], dtype=torch.float32
        ),
    }
    if all("hidden_boxes" in s for s in samples):
        batch["hidden_boxes"], batch["hidden_labels"] = _collate_hidden(samples)
    return batch


def _collate_hidden(samples: list[Sample]) -> tuple[Tensor, Tensor]:
    """Pad the hidden full annotations: ``hidden_boxes [B, H, 4]``, ``hidden_labels [B, H]``."""
    max_hidden = max(int(s["hidden_labels"].shape[0]) for s in samples)
    boxes = torch.zeros((len(samples), max_hidden, 4), dtype=torch.float32)
    labels = torch.full((len(samples), max_hidden), IGNORE_INDEX, dtype=torch.int64)
    for i, sample in enumerate(samples):
        n = int(sample["hidden_labels"].shape[0])
        boxes[i, :n] = sample["hidden_boxes"]
        labels[i, :n] = sample["hidden_labels"]
    return boxes, labels


def unbatch_targets(batch: Batch) -> list[dict[str, torch.Tensor]]:
    """Per-image target dicts (``boxes``, ``labels``, ``attributes``, ``regions``) without padding."""
    targets = []
    for i in range(batch["labels"].shape[0]):
        real = batch["labels"][i] >= 0
        targets.append(
            {
                "boxes": batch["boxes"][i][real],
                "labels": batch["labels"][i][real],
                "attributes": batch["attributes"][i][real],
                "regions": batch["regions"][i][batch["region_valid"][i]],
            }
        )
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
