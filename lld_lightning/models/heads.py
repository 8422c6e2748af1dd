"""The dense anchor-free head shared across pyramid levels: classes, box, quality, attributes.

See docs/model.md for why the head is dense and anchor-free and why the attributes read the
classification tower by default.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["group", "batch", "none"]

#: Focal-loss prior: every location starts as background with this probability of a cell, so the
#: many easy negatives do not swamp the first steps (RetinaNet's initialisation).
CLASS_PRIOR_PROBABILITY: float = 0.01


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == "group":
        # The largest group count <= 32 that divides channels (32 at the usual 128/256).
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        # Plain BatchNorm2d so that `SyncBatchNorm.convert_sync_batchnorm` can swap it.
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be group, batch or none, got {norm!r}")


def _tower(channels: int, num_convs: int, norm: Norm) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _flatten(level_map: torch.Tensor) -> torch.Tensor:
    """``[B, K, H, W]`` -> ``[B, H * W, K]`` in row-major (y, x) order, as float32."""
    batch, channels = level_map.shape[:2]
    # permute gives NHWC, which is already contiguous under channels_last: the reshape is free.
    return level_map.permute(0, 2, 3, 1).reshape(batch, -1, channels).float()


class DenseHead(nn.Module):
    """FCOS/GFL-style head, one set of weights applied to every pyramid level.

    A classification tower feeds the class logits and (by default) one 3x3 conv per attribute;
    a regression tower feeds the box distances and the quality logit.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: number of cell classes ``C``.
        attribute_spec: ``{name: num_values}``; one predictor per entry, in this order.
        num_convs: 3x3 conv + norm + ReLU blocks per tower (2 to 4 are sensible).
        norm: ``"group"`` (default; batch-size independent), ``"batch"`` or ``"none"``.
        num_levels: number of pyramid levels, one learnable box scale each.
        attribute_convs: 0 (default) reads the attributes from the classification tower; ``n > 0``
            gives them their own ``n``-conv tower (about +25% head compute per tower conv pair,
            see docs/model.md).
        box_bins: 0 (default) predicts each distance directly (softplus of a scaled raw value);
            ``n >= 2`` predicts a distribution over the distances ``0, 1, ..., n - 1`` strides
            per side (GFL's general distribution, Li et al. 2020): the distance is its expected
            value, and the logits are returned as ``box_distribution`` for the distribution
            focal loss. Distances beyond ``n - 1`` strides cannot be expressed.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        attribute_spec: dict[str, int],
        num_convs: int = 2,
        norm: Norm = "group",
        num_levels: int = 3,
        attribute_convs: int = 0,
        box_bins: int = 0,
    ) -> None:
        super().__init__()
        if box_bins == 1 or box_bins < 0:
            raise ValueError(f"box_bins must be 0 (direct distances) or >= 2, got {box_bins}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, num_values in attribute_spec.items():
            if "." in name or not name:
                raise ValueError(f"attribute name {name!r} must be non-empty and without '.'")
            if num_values < 2:
                raise ValueError(f"attribute {name!r} needs >= 2 values, got {num_values}")
        self.num_classes = num_classes
        self.attribute_spec = dict(attribute_spec)
        self.num_levels = num_levels
        self.box_bins = box_bins

        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.reg_tower = _tower(in_channels, num_convs, norm)
        self.attr_tower = _tower(in_channels, attribute_convs, norm) if attribute_convs else None
        self.cls_pred = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, 4 * max(box_bins, 1), 3, padding=1)
        self.quality_pred = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.attr_preds = nn.ModuleDict(
            {
                name: nn.Conv2d(in_channels, num_values, 3, padding=1)
                for name, num_values in attribute_spec.items()
            }
        )
        # Per-level multiplier on the raw distance, so one shared conv can serve levels whose
        # objects differ in size (in stride units). A distribution needs none: its bins are
        # already in stride units, and an unused parameter would trip DDP.
        self.scales = nn.Parameter(torch.ones(num_levels)) if box_bins == 0 else None
        if box_bins:
            self.register_buffer(
                "bin_values", torch.arange(box_bins, dtype=torch.float32), persistent=False
            )
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
            features: ``num_levels`` maps ``[B, in_channels, H_l, W_l]``, finest first.

        Returns:
            Float32 dict, ``P = sum_l H_l * W_l`` in level order, row-major within a level:
            ``cls_logits [B, P, C]``, ``box_deltas [B, P, 4]`` (non-negative l, t, r, b in
            stride units), ``quality_logits [B, P]``, ``attr_logits {name: [B, P, K_name]}``;
            with ``box_bins`` also ``box_distribution [B, P, 4, box_bins]`` (logits over the
            distances; ``box_deltas`` is their expectation).
        """
        if len(features) != self.num_levels:
            raise ValueError(f"head built for {self.num_levels} levels, got {len(features)}")
        cls_levels, box_levels, quality_levels, distribution_levels = [], [], [], []
        attr_levels: dict[str, list[torch.Tensor]] = {name: [] for name in self.attr_preds}
        for level, feature in enumerate(features):
            cls_feature = self.cls_tower(feature)
            reg_feature = self.reg_tower(feature)
            attr_feature = cls_feature if self.attr_tower is None else self.attr_tower(feature)
            cls_levels.append(_flatten(self.cls_pred(cls_feature)))
            if self.box_bins:
                logits = _flatten(self.box_pred(reg_feature))
                logits = logits.reshape(*logits.shape[:2], 4, self.box_bins)  # [B, P_l, 4, n]
                distribution_levels.append(logits)
                # Elementwise, not a matmul, so that autocast leaves the expectation in float32.
                box_levels.append((logits.softmax(dim=-1) * self.bin_values).sum(dim=-1))
            else:
                # softplus keeps distances non-negative like relu but never kills the gradient of
                # a side that went negative, and grows linearly instead of exploding like exp.
                raw_box = _flatten(self.box_pred(reg_feature)) * self.scales[level]
                box_levels.append(F.softplus(raw_box))
            quality_levels.append(_flatten(self.quality_pred(reg_feature))[..., 0])
            for name, predictor in self.attr_preds.items():
                attr_levels[name].append(_flatten(predictor(attr_feature)))
        outputs = {
            "cls_logits": torch.cat(cls_levels, dim=1),
            "box_deltas": torch.cat(box_levels, dim=1),
            "quality_logits": torch.cat(quality_levels, dim=1),
            "attr_logits": {name: torch.cat(maps, dim=1) for name, maps in attr_levels.items()},
        }
        if self.box_bins:
            outputs["box_distribution"] = torch.cat(distribution_levels, dim=1)
        return outputs
