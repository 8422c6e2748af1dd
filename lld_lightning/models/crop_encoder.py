"""Pixel crops of each cell, encoded by a small CNN of their own, for the region read-out.

The read-out pools backbone features (`RoiHead`), which the detector shares with finding and
classifying cells. Some attributes are cues a few pixels wide: vacuoles (white dots at the rim),
nucleoli (pale spots in the nucleus), the cleft of an irregular nucleus. Features pooled at
stride 8 or 4 blur them away (docs/research.md). `CropEncoder` resamples each box from
the input image itself (`torchvision.ops.roi_align` over the RGB pixels) to a fixed crop and
encodes it with a few convolutions; global max pooling keeps a small cue's presence wherever it
sits in the crop. `RoiHead` gives the attributes one encoder (trained by the attribute loss only)
and, with ``crop_classes``, the class another (trained by the class loss only). Plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from lld_lightning.boxes import grow_boxes
from lld_lightning.models.heads import conv_block


class CropEncoder(nn.Module):
    """``[N]`` boxes of a batch of images -> ``[N, out_dim]`` features of their pixel crops.

    Args:
        crop_size: side of the resampled crop (pixels).
        context: boxes are grown by this factor about their centre first (the outline and a
            rim of background inside the crop).
        width: channels of the first stage (doubled at each of the two stride-2 stages).

    Attributes:
        out_dim: feature width (global max and mean pooling of the last stage).
    """

    def __init__(self, crop_size: int = 64, context: float = 1.25, width: int = 16) -> None:
        super().__init__()
        if crop_size < 16:
            raise ValueError(f"crop_size must be >= 16 pixels, got {crop_size}")
        self.crop_size = crop_size
        self.context = context
        self.convs = nn.Sequential(
            *conv_block(3, width),
            *conv_block(width, 2 * width, stride=2),
            *conv_block(2 * width, 2 * width),
            *conv_block(2 * width, 4 * width, stride=2),
            *conv_block(4 * width, 4 * width),
        )
        self.out_dim = 8 * width  # global max + mean of the last stage's 4 * width channels

    def forward(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """Crop and encode (`crop` then `encode`).

        Args:
            images: float ``[B, 3, H, W]``, the detector's normalised input.
            boxes: per image, float ``[n_i, 4]`` xyxy input pixels.

        Returns:
            ``[sum n_i, out_dim]`` in box order (image 0 first).
        """
        return self.encode(self.crop(images, boxes))

    def crop(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """``[sum n_i, 3, crop_size, crop_size]`` crops of the grown boxes, in ``images``' dtype
        (encoders of the same ``crop_size`` and ``context`` can share them)."""
        crops = roi_align(
            images.float(),
            [grow_boxes(b.float(), self.context) for b in boxes],
            output_size=self.crop_size,
            spatial_scale=1.0,
            sampling_ratio=2,
            aligned=True,
        )  # [N, 3, crop, crop], float32 (roi_align's autocast rule)
        return crops.to(images.dtype)

    def encode(self, crops: Tensor) -> Tensor:
        """``[N, 3, crop_size, crop_size]`` crops -> ``[N, out_dim]`` features."""
        grid = self.convs(crops)
        return torch.cat([grid.amax(dim=(2, 3)), grid.mean(dim=(2, 3))], dim=1)
