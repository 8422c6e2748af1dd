"""The feature pyramid: torchvision's FPN over the backbone maps, with optional extra levels."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)

ExtraLevels = Literal["none", "maxpool", "p6p7"]


class FpnNeck(nn.Module):
    """Top-down FPN (`torchvision.ops.FeaturePyramidNetwork`) with ``out_channels`` everywhere.

    Args:
        in_channels: channels of each backbone map, finest first.
        in_strides: stride of each backbone map, finest first.
        out_channels: channels of every pyramid level.
        extra_levels: ``"none"``; ``"maxpool"`` adds one parameter-free level (stride x2);
            ``"p6p7"`` adds two strided 3x3 convs on the coarsest FPN output (stride x2, x4),
            for cells larger than the coarsest stride can hold.

    Attributes:
        channels: ``out_channels`` per output level.
        strides: stride per output level, finest first.
    """

    def __init__(
        self,
        in_channels: list[int],
        in_strides: list[int],
        out_channels: int = 128,
        extra_levels: ExtraLevels = "none",
    ) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides):
            raise ValueError(f"{len(in_channels)} channel counts for {len(in_strides)} strides")
        extra: ExtraFPNBlock | None
        num_extra = {"none": 0, "maxpool": 1, "p6p7": 2}.get(extra_levels)
        if num_extra is None:
            raise ValueError(f"extra_levels must be none, maxpool or p6p7, got {extra_levels!r}")
        if extra_levels == "maxpool":
            extra = LastLevelMaxPool()
        elif extra_levels == "p6p7":
            # in == out makes torchvision build P6 from P5 (cheaper than from C5).
            extra = LastLevelP6P7(out_channels, out_channels)
        else:
            extra = None
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra)
        self.strides: list[int] = list(in_strides) + [
            in_strides[-1] * 2 ** (i + 1) for i in range(num_extra)
        ]
        self.channels: list[int] = [out_channels] * len(self.strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fuse backbone maps into the pyramid.

        Args:
            features: backbone maps ``[B, in_channels[i], H_i, W_i]``, finest first.

        Returns:
            ``[B, out_channels, H_l, W_l]`` per level in ``strides`` order.
        """
        named = OrderedDict((f"c{i}", feature) for i, feature in enumerate(features))
        return list(self.fpn(named).values())

