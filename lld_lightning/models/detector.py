"""The detector (backbone -> FPN -> dense head, optional region read-out) and its output contract.

Output contract (docs/architecture.md, "Detector output"): `Detector.forward` returns raw head
outputs only, the same dict in train and eval, all float32, ``P`` = every location of every
level, levels finest first, row-major (y, x) inside a level:

- ``cls_logits [B, P, C]``; ``box_deltas [B, P, 4]`` non-negative (l, t, r, b) in stride units;
- ``quality_logits [B, P]``; ``attr_logits {name: [B, P, K_name]}`` in spec order;
- with a distribution box head (``box_bins = n``): ``box_distribution [B, P, 4, n]`` logits over
  the distances ``0 .. n - 1`` strides, whose expectation is ``box_deltas``;
- ``points [P, 2]`` (x, y) location centres in input pixels; ``strides [P]`` float32;
- with a region read-out (`RoiHead`): ``roi_features`` (the pyramid levels) and
  ``roi_images`` (the input, for pixel crops), kept for `Detector.detections`, and, when
  ``rois`` are given, ``roi {cls_logits [N, C], attr_logits {name: [N, K]}}`` for those boxes
  in order.

Decoding: ``x1 = px - l * s``, ``y1 = py - t * s``, ``x2 = px + r * s``, ``y2 = py + b * s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lld_lightning.models.backbone import TimmBackbone
from lld_lightning.models.box_coding import decode_boxes, encode_boxes
from lld_lightning.models.heads import DenseHead, Norm
from lld_lightning.models.neck import ExtraLevels, FpnNeck
from lld_lightning.models.postprocess import Detections, apply_readout, postprocess
from lld_lightning.models.roi_head import RoiHead

#: Distinct input sizes whose points are kept; multi-scale training uses a handful at most.
_MAX_CACHED_SIZES: int = 32

__all__ = ["Detector", "build_detector", "decode_boxes", "encode_boxes", "level_points"]


def level_points(
    sizes: list[tuple[int, int]], strides: list[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Location centres of every level, in the order the head flattens them.

    Args:
        sizes: ``(H_l, W_l)`` per level.
        strides: stride per level.
        device: where to build them.

    Returns:
        ``points [P, 2]`` (x, y) with the first point of level l at ``(s_l / 2, s_l / 2)``, and
        ``strides [P]`` float32.
    """
    points, point_strides = [], []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))  # [H*W, 2] row-major
        point_strides.append(torch.full((height * width,), float(stride), device=device))
    return torch.cat(points), torch.cat(point_strides)


class Detector(nn.Module):
    """Backbone -> neck -> dense head, returning the raw output dict of the contract.

    Args:
        backbone: maps ``[B, 3, H, W]`` in ``[0, 1]`` to feature maps (normalises itself).
        neck: fuses them into pyramid levels; must expose ``strides`` (one per output level).
        head: a `DenseHead` (or any module with the same output dict) over the levels.
        roi_head: optional `RoiHead` reading class and attributes over each box of the finest
            level; detections then take their class and attributes from it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        roi_head: RoiHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.roi_head = roi_head
        self.strides_per_level: list[int] = list(neck.strides)
        self._point_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def attribute_spec(self) -> dict[str, int]:
        return dict(self.head.attribute_spec)

    def forward(
        self, images: torch.Tensor, rois: list[torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Run the detector.

        Args:
            images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``; ``H`` and ``W`` should be multiples
                of the coarsest stride so that ``points`` lie at the true feature centres.
            rois: per image, float ``[n_i, 4]`` xyxy boxes to read out with the `RoiHead`
                (training passes the expert cells); ignored without a region read-out.

        Returns:
            The contract dict (module docstring): ``cls_logits``, ``box_deltas``,
            ``quality_logits``, ``attr_logits``, ``points``, ``strides`` (and ``roi_features``,
            ``roi`` with a region read-out).
        """
        features = self.neck(self.backbone(images))
        outputs: dict[str, Any] = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        outputs["points"], outputs["strides"] = self._points(sizes, images.device)
        if self.roi_head is not None:
            roi_features = list(features)
            outputs["roi_features"] = roi_features
            outputs["roi_images"] = images  # the pixel crops' source (a reference, no copy)
            if rois is not None:
                outputs["roi"] = self.roi_head(roi_features, rois, images)
        return outputs

    def detections(
        self,
        outputs: dict[str, Any],
        image_size: tuple[int, int] | torch.Tensor | None = None,
        classes_per_box: int = 1,
        **settings: Any,
    ) -> list[Detections]:
        """Detections from this detector's outputs, one dict per image (`postprocess` keys).

        Without a region read-out this is `postprocess`. With one, the dense head proposes
        one box per cell (class-agnostic NMS) and the `RoiHead` gives each box its classes
        and attributes (`apply_readout`).

        Args:
            outputs: `forward` output.
            image_size: see `postprocess`.
            classes_per_box: class hypotheses per box with a region read-out (1 = one label
                per cell; evaluation uses more so that mAP can credit a second guess).
            **settings: `postprocess` settings (``score_threshold``, ``pre_nms_topk``,
                ``nms_iou``, ``max_detections``, ``class_agnostic``).
        """
        if self.roi_head is None:
            return postprocess(outputs, image_size=image_size, **settings)
        settings["class_agnostic"] = True
        preds = postprocess(outputs, image_size=image_size, **settings)
        readout = self.roi_head(
            outputs["roi_features"], [p["boxes"] for p in preds], outputs.get("roi_images")
        )
        return apply_readout(
            preds,
            readout,
            classes_per_box=classes_per_box,
            max_detections=int(settings.get("max_detections", 100)),
        )

    def _points(
        self, sizes: list[tuple[int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(sizes), str(device))
        cached = self._point_cache.get(key)
        if cached is None:
            if len(self._point_cache) >= _MAX_CACHED_SIZES:
                self._point_cache.clear()
            cached = level_points(sizes, self.strides_per_level, device)
            self._point_cache[key] = cached
        return cached


def build_detector(
    backbone: str,
    num_classes: int,
    attribute_spec: dict[str, int],
    pretrained: bool = False,
    out_indices: tuple[int, ...] = (2, 3, 4),
    fpn_channels: int = 128,
    head_convs: int = 2,
    pretrained_file: str | Path | None = None,
    extra_levels: ExtraLevels = "none",
    attribute_convs: int = 0,
    head_norm: Norm = "group",
    roi_readout: bool = False,
    roi_pixel_crop: int = 0,
    roi_crop_classes: bool = False,
    box_bins: int = 0,
) -> Detector:
    """Build timm backbone + FPN + `DenseHead` from plain values.

    Args:
        backbone: timm model name.
        num_classes: number of classes ``C``.
        attribute_spec: ``{name: num_values}`` (e.g. `LLD_ATTRIBUTE_SPEC`).
        pretrained: load the timm default weights (needs the hub or its cache).
        out_indices: backbone stages fed to the FPN.
        fpn_channels: channels of every pyramid level and of the head towers.
        head_convs: convs per head tower.
        pretrained_file: local full-model checkpoint (implies pretrained weights).
        extra_levels: ``"none"``, ``"maxpool"`` or ``"p6p7"`` (see `FpnNeck`).
        attribute_convs: own attribute tower depth; 0 shares the classification tower.
        head_norm: ``"group"``, ``"batch"`` or ``"none"``.
        roi_readout: add a `RoiHead` over the finest level for class and attributes.
        roi_pixel_crop: > 0: the `RoiHead`'s attributes also read each box's pixels resampled to
            this side (`CropEncoder`).
        roi_crop_classes: the `RoiHead`'s class predictor reads the pixel crops too.
        box_bins: 0 for direct distances, ``n >= 2`` for a distribution over ``n`` distances
            per side (`DenseHead`).

    Returns:
        The `Detector`.
    """
    body = TimmBackbone(backbone, pretrained, tuple(out_indices), pretrained_file)
    neck = FpnNeck(body.channels, body.strides, fpn_channels, extra_levels)
    head = DenseHead(
        fpn_channels,
        num_classes,
        attribute_spec,
        num_convs=head_convs,
        norm=head_norm,
        num_levels=len(neck.strides),
        attribute_convs=attribute_convs,
        box_bins=box_bins,
    )
    roi_head = (
        RoiHead(
            fpn_channels,
            num_classes,
            attribute_spec,
            stride=int(neck.strides[0]),
            norm=head_norm,
            pixel_crop=roi_pixel_crop,
            crop_classes=roi_crop_classes,
        )
        if roi_readout
        else None
    )
    return Detector(body, neck, head, roi_head)
