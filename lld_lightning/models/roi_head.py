"""Region read-out: class and attributes of a cell read from features pooled over its whole box.

The dense head reads a cell at the few locations near its centre. Cues that sit at the rim
(the outline of a scalloped or blebbed cell, vacuoles at the edge of the cytoplasm, the nuclear
outline) are then seen only through the receptive field. `RoiHead` pools a fixed grid over
each cell's box, grown by ``context`` so the outline and a rim of background are inside it, and
classifies the grid with a small conv + MLP head, as a two-stage detector's box head does.
Pooling to a fixed grid removes the cell's size, which is evidence (the ``cell_size`` attribute,
and the classes' size priors), so the log of the box's width and height (in strides) joins the
pooled features before the fully connected layer.

Training reads out the expert cells (with a few jittered copies, so that the head also sees
boxes as loose as detections); inference reads out the detections of the dense head
(`Detector.detections`). Plain PyTorch, with `torchvision.ops.roi_align`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from lld_lightning.boxes import grow_boxes
from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.models.crop_encoder import CropEncoder
from lld_lightning.models.heads import tower


@dataclass
class Readout:
    """The region read-out's settings (`RoiHead`, `training_rois`).

    Args:
        pixel_crop: > 0: the attributes also read each box's own pixels, resampled to this side
            and encoded by a small CNN (`CropEncoder`); 0 reads pooled features only.
        crop_classes: with ``pixel_crop``, the class reads pixel crops too, through an encoder
            of its own.
        copies: read-outs per expert cell in a training step: the exact box, then jittered
            copies, so the head also sees boxes as loose as detections.
        jitter: a jittered copy moves its centre by up to this fraction of the box size and
            scales width and height by up to ``1 +- jitter``.
    """

    pixel_crop: int = 64
    crop_classes: bool = True
    copies: int = 2
    jitter: float = 0.1


@dataclass
class TrainingRois:
    """The boxes read out in a training step and the expert cell each one belongs to.

    Attributes:
        boxes: per image, float ``[n_i, 4]`` xyxy pixels (the input of `RoiHead`).
        image_index: int64 ``[N]``, ``N = sum n_i``, in the order `RoiHead` returns them.
        cell_index: int64 ``[N]``, the cell's column in the batch's ``boxes``/``labels``.
    """

    boxes: list[Tensor]
    image_index: Tensor
    cell_index: Tensor


def training_rois(
    boxes: Tensor,
    labels: Tensor,
    copies: int = 2,
    jitter: float = 0.1,
    generator: torch.Generator | None = None,
) -> TrainingRois:
    """The expert cells of a batch, each once exactly and ``copies - 1`` times jittered.

    Args:
        boxes: float ``[B, M, 4]`` xyxy pixels.
        labels: int64 ``[B, M]``; ``IGNORE_INDEX`` marks padding (not read out).
        copies: read-outs per cell (>= 1); the first is the exact box.
        jitter: the jittered copies move their centre by up to ``jitter`` of the box size and
            scale width and height by up to ``1 +- jitter`` (uniform).
        generator: random source of the jitter (default: torch's global one).

    Returns:
        `TrainingRois`, image-major.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    image_index, cell_index = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # [n]
    exact = boxes[image_index, cell_index].float()  # [n, 4]
    if copies > 1 and exact.numel():
        n = exact.shape[0]
        size = (exact[:, 2:] - exact[:, :2]).repeat(copies - 1, 1)  # [n * (c-1), 2]
        centre = ((exact[:, 2:] + exact[:, :2]) / 2).repeat(copies - 1, 1)
        # Drawn where the generator lives (a CPU generator cannot fill a CUDA tensor), then moved.
        noise_device = generator.device if generator is not None else exact.device
        noise = torch.rand((n * (copies - 1), 4), generator=generator, device=noise_device)
        noise = noise.to(exact.device) * 2 - 1
        centre = centre + noise[:, :2] * jitter * size
        size = size * (1 + noise[:, 2:] * jitter)
        jittered = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        exact = torch.cat([exact, jittered])
        image_index = image_index.repeat(copies)
        cell_index = cell_index.repeat(copies)
    order = torch.sort(image_index, stable=True).indices  # image-major, as roi_align wants
    image_index, cell_index, all_boxes = image_index[order], cell_index[order], exact[order]
    counts = torch.bincount(image_index, minlength=boxes.shape[0]).tolist()
    return TrainingRois(list(all_boxes.split(counts)), image_index, cell_index)


def box_size_features(boxes: Tensor, stride: int) -> Tensor:
    """``[N, 2]`` log of each box's width and height in strides (1 px floor)."""
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    return torch.log(sides / stride)


class RoiHead(nn.Module):
    """Class and attribute logits of boxes, from features pooled over each (grown) box.

    Args:
        in_channels: channels of the pyramid levels it reads.
        num_classes: number of cell classes ``C``.
        attribute_spec: ``{name: num_values}``, one linear predictor each, in this order.
        stride: stride of the pyramid level it reads (the finest).
        pool_size: the cell grid is ``pool_size x pool_size``.
        num_convs: 3x3 conv + norm + ReLU blocks on the cell grid.
        hidden: width of the fully connected layer.
        context: boxes are grown by this factor about their centre for the cell grid.
        pixel_crop: > 0: the attribute predictors also read a `CropEncoder` of each box's
            pixels resampled to ``pixel_crop x pixel_crop`` (``forward`` then needs the images).
        crop_classes: with ``pixel_crop``, the class predictor reads pixel crops too, through
            a `CropEncoder` of its own (one shared with the attributes would be pulled towards
            the class's coarse cues and lose the attributes' small ones).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        attribute_spec: dict[str, int],
        stride: int,
        pool_size: int = 7,
        num_convs: int = 2,
        hidden: int = 256,
        context: float = 1.25,
        pixel_crop: int = 0,
        crop_classes: bool = False,
    ) -> None:
        super().__init__()
        if context < 1.0:
            raise ValueError(f"context must be >= 1 (the whole cell), got {context}")
        self.num_classes = num_classes
        self.attribute_spec = dict(attribute_spec)
        self.stride = int(stride)
        self.pool_size = pool_size
        self.context = context
        self.convs = tower(in_channels, num_convs)
        # + 2: log width and log height of the box in strides (`box_size_features`).
        self.fc = nn.Sequential(
            nn.Linear(in_channels * pool_size**2 + 2, hidden), nn.ReLU(inplace=True)
        )
        if crop_classes and not pixel_crop:
            raise ValueError("crop_classes needs pixel_crop")
        self.class_crop_encoder = (
            CropEncoder(pixel_crop, context) if crop_classes else None
        )
        crop_dim = self.class_crop_encoder.out_dim if self.class_crop_encoder is not None else 0
        self.cls_pred = nn.Linear(hidden + crop_dim, num_classes)
        self.crop_encoder = CropEncoder(pixel_crop, context) if pixel_crop else None
        attr_in = hidden + (self.crop_encoder.out_dim if self.crop_encoder is not None else 0)
        self.attr_preds = nn.ModuleDict(
            {name: nn.Linear(attr_in, num_values) for name, num_values in attribute_spec.items()}
        )

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], images: Tensor | None = None
    ) -> dict[str, Tensor | dict]:
        """Read out every box.

        Args:
            features: the pyramid levels ``[B, in_channels, H_l, W_l]``, finest first; the
                first is read.
            boxes: per image, float ``[n_i, 4]`` xyxy in input pixels.
            images: the detector's normalised input ``[B, 3, H, W]`` (needed with ``pixel_crop``).

        Returns:
            Float32 ``cls_logits [N, C]`` and ``attr_logits {name: [N, K]}``, boxes in order
            (image 0 first).
        """
        boxes = [b.float() for b in boxes]
        # roi_align runs in float32 (its autocast rule), whatever the feature's dtype.
        cell = roi_align(
            features[0],
            [grow_boxes(b, self.context) for b in boxes],
            output_size=self.pool_size,
            spatial_scale=1.0 / self.stride,
            sampling_ratio=2,
            aligned=True,
        )  # [N, C, pool, pool]
        cell = cell.to(features[0].dtype)
        all_boxes = torch.cat(boxes) if boxes else cell.new_zeros(0, 4)
        size = box_size_features(all_boxes, self.stride).to(cell.dtype)
        hidden = self.fc(torch.cat([self.convs(cell).flatten(1), size], dim=1))
        attr_hidden = hidden
        if self.crop_encoder is not None:
            if images is None:
                raise ValueError("a read-out with pixel crops needs the input images")
            crops = self.crop_encoder.crop(images, boxes)  # once, for both encoders
            attr_crops = self.crop_encoder.encode(crops).to(attr_hidden.dtype)
            attr_hidden = torch.cat([attr_hidden, attr_crops], dim=1)
            if self.class_crop_encoder is not None:
                class_crops = self.class_crop_encoder.encode(crops).to(hidden.dtype)
                hidden = torch.cat([hidden, class_crops], dim=1)
        return {
            "cls_logits": self.cls_pred(hidden).float(),
            "attr_logits": {
                name: head(attr_hidden).float() for name, head in self.attr_preds.items()
            },
        }
