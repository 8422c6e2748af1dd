"""The dense anchor-free head shared across pyramid levels: classes, box, quality, attributes.

See docs/model.md for why the head is dense and anchor-free and why the attributes read the
classification tower by default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Focal-loss prior: every location starts as background with this probability of a cell, so the
#: many easy negatives do not swamp the first steps (RetinaNet's initialisation).
CLASS_PRIOR_PROBABILITY: float = 0.01


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides ``channels``: batch-size
    independent, which matters with the small batches that 640 px images allow."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """3x3 conv + GroupNorm + ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        group_norm(out_channels),
        nn.ReLU(inplace=True),
    ]


def tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` `conv_block` s at constant width."""
    return nn.Sequential(*[layer for _ in range(num_convs) for layer in conv_block(channels, channels)])


def _flatten(level_map: torch.Tensor) -> torch.Tensor:
    """``[B, K, H, W]`` -> ``[B, H * W, K]`` in row-major (y, x) order, as float32."""
    batch, channels = level_map.shape[:2]
    # permute gives NHWC, which is already contiguous under channels_last: the reshape is free.
    return level_map.permute(0, 2, 3, 1).reshape(batch, -1, channels).float()


class DenseHead(nn.Module):
    """FCOS/GFL-style head, one set of weights applied to every pyramid level.

    A classification tower feeds the class logits and one 3x3 conv per attribute; a regression
    tower feeds the box side distributions and the quality logit.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: number of cell classes ``C``.
        attribute_spec: ``{name: num_values}``; one predictor per entry, in this order.
        num_convs: 3x3 conv + GroupNorm + ReLU blocks per tower.
        box_bins: each box side is a distribution over the distances ``0, 1, ..., n - 1``
            strides (GFL's general distribution, Li et al. 2020); the distance is its expected
            value. Distances beyond ``n - 1`` strides cannot be expressed.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        attribute_spec: dict[str, int],
        num_convs: int = 1,
        box_bins: int = 17,
    ) -> None:
        super().__init__()
        if box_bins < 2:
            raise ValueError(f"box_bins must be >= 2, got {box_bins}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, num_values in attribute_spec.items():
            if "." in name or not name:
                raise ValueError(f"attribute name {name!r} must be non-empty and without '.'")
            if num_values < 2:
                raise ValueError(f"attribute {name!r} needs >= 2 values, got {num_values}")
        self.num_classes = num_classes
        self.attribute_spec = dict(attribute_spec)
        self.box_bins = box_bins

        self.cls_tower = tower(in_channels, num_convs)
        self.reg_tower = tower(in_channels, num_convs)
        self.cls_pred = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, 4 * box_bins, 3, padding=1)
        self.quality_pred = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.attr_preds = nn.ModuleDict(
            {
                name: nn.Conv2d(in_channels, num_values, 3, padding=1)
                for name, num_values in attribute_spec.items()
            }
        )
        self.register_buffer("bin_values", torch.arange(box_bins, dtype=torch.float32), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        prior_bias = -math.log((1.0 - CLASS_PRIOR_PROBABILITY) / CLASS_PRIOR_PROBABILITY)
        nn.init.constant_(self.cls_pred.bias, prior_bias)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor | dict]:
        """Apply the head to every level and concatenate the locations.

        Args:
            features: maps ``[B, in_channels, H_l, W_l]``, finest first.

        Returns:
            Float32 dict, ``P = sum_l H_l * W_l`` in level order, row-major within a level:
            ``cls_logits [B, P, C]``, ``box_distribution [B, P, 4, box_bins]`` (logits over the
            distances), ``box_deltas [B, P, 4]`` (their expectation: non-negative l, t, r, b in
            stride units), ``quality_logits [B, P]``, ``attr_logits {name: [B, P, K_name]}``.
        """
        cls_levels, distribution_levels, quality_levels = [], [], []
        attr_levels: dict[str, list[torch.Tensor]] = {name: [] for name in self.attr_preds}
        for feature in features:
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            cls_levels.append(_flatten(self.cls_pred(cls_feature)))
            logits = _flatten(self.box_pred(reg_feature))
            distribution_levels.append(logits.reshape(*logits.shape[:2], 4, self.box_bins))  # [B, P_l, 4, n]
            quality_levels.append(_flatten(self.quality_pred(reg_feature))[..., 0])
            for name, predictor in self.attr_preds.items():
                attr_levels[name].append(_flatten(predictor(cls_feature)))
        distribution = torch.cat(distribution_levels, dim=1)
        return {
            "cls_logits": torch.cat(cls_levels, dim=1),
            "box_distribution": distribution,
            # Elementwise, not a matmul, so that autocast leaves the expectation in float32.
            "box_deltas": (distribution.softmax(dim=-1) * self.bin_values).sum(dim=-1),
            "quality_logits": torch.cat(quality_levels, dim=1),
            "attr_logits": {name: torch.cat(maps, dim=1) for name, maps in attr_levels.items()},
        }
