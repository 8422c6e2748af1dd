"""The feature pyramid: torchvision's FPN over the backbone maps."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork


class FpnNeck(nn.Module):
    """Top-down FPN (`torchvision.ops.FeaturePyramidNetwork`) with ``out_channels`` everywhere.

    Args:
        in_channels: channels of each backbone map, finest first.
        in_strides: stride of each backbone map, finest first.
        out_channels: channels of every pyramid level.

    Attributes:
        channels: ``out_channels`` per output level.
        strides: stride per output level, finest first.
    """

    def __init__(self, in_channels: list[int], in_strides: list[int], out_channels: int = 64) -> None:
        super().__init__()
        if len(in_channels) != len(in_strides):
            raise ValueError(f"{len(in_channels)} channel counts for {len(in_strides)} strides")
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.strides: list[int] = list(in_strides)
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

