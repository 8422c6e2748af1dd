"""The detector (backbone -> FPN -> dense head -> region read-out) and its output contract.

Output contract: `Detector.forward` returns raw head outputs only, the same dict in train and
eval, all float32, ``P`` = every location of every level, levels finest first, row-major (y, x)
inside a level:

- ``cls_logits [B, P, C]``; ``quality_logits [B, P]``; ``attr_logits {name: [B, P, K_name]}``;
- ``box_distribution [B, P, 4, n]`` logits over the distances ``0 .. n - 1`` strides per side,
  and ``box_deltas [B, P, 4]`` their expectation (non-negative l, t, r, b in stride units);
- ``points [P, 2]`` (x, y) location centres in input pixels; ``strides [P]`` float32;
- with a region read-out: ``roi_features`` (the pyramid levels, for `Detector.detections`) and,
  when ``rois`` are given, ``roi {cls_logits [N, C], attr_logits {name: [N, K]}}`` for those
  boxes in order.

Decoding: ``x1 = px - l * s``, ``y1 = py - t * s``, ``x2 = px + r * s``, ``y2 = py + b * s``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lld_lightning.models.backbone import TimmBackbone
from lld_lightning.models.box_coding import decode_boxes, encode_boxes
from lld_lightning.models.heads import DenseHead
from lld_lightning.models.neck import FpnNeck
from lld_lightning.models.postprocess import Detections, PostProcess, apply_readout, postprocess
from lld_lightning.models.roi_head import Readout, RoiHead, TrainingRois, training_rois

#: Distinct input sizes whose points are kept; multi-scale training uses a handful at most.
_MAX_CACHED_SIZES: int = 32

__all__ = ["Detector", "decode_boxes", "encode_boxes", "level_points"]


def level_points(
    sizes: list[tuple[int, int]], strides: list[int], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
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
    """timm backbone -> FPN -> dense head (class, box, quality, attributes) -> region read-out.

    The defaults are the recipe of the synthetic LLD-like data (`configs/sparse.yaml`). In a
    config the detector is a component of `LldModule`::

        model:
          detector:
            class_path: lld_lightning.models.Detector
            init_args: {backbone: resnet50, readout: null}

    Args:
        num_classes: number of cell classes ``C`` (given by `LldModule` from the data).
        attribute_spec: ``{name: num_values}`` (given by `LldModule` from the data).
        backbone: any timm model name that supports ``features_only``; fixed-size transformers
            run through timm's ``dynamic_img_size`` or are refused (`TimmBackbone`).
        pretrained: load the backbone's pretrained weights from the model hub.
        pretrained_file: load them from this local full-model checkpoint instead (machines
            without the hub).
        out_indices: backbone stages (``feature_info`` indices, increasing strides) fed to the
            pyramid; ``None``: the stages at strides 8/16/32 (else the three coarsest strides);
            ``[1, 2, 3, 4]`` on a ResNet adds stride 4 for small objects (platelets).
        fpn_channels: channels of the pyramid levels and the head towers.
        head_convs: 3x3 conv blocks per head tower.
        box_bins: each box side is a distribution over ``0 .. box_bins - 1`` strides.
        readout: read each cell's class and attributes from its whole box (`Readout`, `RoiHead`);
            the dense head then proposes one box per cell. ``None``: the dense head's own class
            and attributes.
    """

    def __init__(
        self,
        num_classes: int,
        attribute_spec: dict[str, int],
        backbone: str = "resnet18",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        out_indices: list[int] | None = None,
        fpn_channels: int = 64,
        head_convs: int = 1,
        box_bins: int = 17,
        readout: Readout | None = Readout(),  # noqa: B008 (a frozen-by-convention settings record)
    ) -> None:
        super().__init__()
        self.backbone = TimmBackbone(
            backbone,
            pretrained=pretrained,
            out_indices=out_indices,
            pretrained_file=pretrained_file,
        )
        self.neck = FpnNeck(self.backbone.channels, self.backbone.strides, fpn_channels)
        self.head = DenseHead(fpn_channels, num_classes, attribute_spec, head_convs, box_bins)
        self.readout = readout
        self.roi_head = (
            RoiHead(
                fpn_channels,
                num_classes,
                attribute_spec,
                stride=int(self.neck.strides[0]),
                pixel_crop=readout.pixel_crop,
                crop_classes=readout.crop_classes and readout.pixel_crop > 0,
            )
            if readout is not None
            else None
        )
        self.strides_per_level: list[int] = list(self.neck.strides)
        self._point_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def attribute_spec(self) -> dict[str, int]:
        return dict(self.head.attribute_spec)

    def normalise(self, images: Tensor) -> Tensor:
        """``[0, 1]`` RGB -> the backbone's input statistics: the one place images are normalised
        (the pixel crops of the read-out read the same tensor)."""
        if not images.is_floating_point():
            # uint8 here means the device transform was skipped; dividing silently would hide it.
            raise TypeError(f"expected float images in [0, 1], got {images.dtype}")
        return (images - self.backbone.mean) / self.backbone.std

    def forward(self, images: Tensor, rois: list[Tensor] | None = None) -> dict[str, Any]:
        """Run the detector.

        Args:
            images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``; ``H`` and ``W`` should be multiples
                of the coarsest stride so that ``points`` lie at the true feature centres.
            rois: per image, float ``[n_i, 4]`` xyxy boxes to read out (training passes the
                expert cells, `training_rois`); ignored without a region read-out.

        Returns:
            The contract dict (module docstring).
        """
        normalised = self.normalise(images)
        features = self.neck(self.backbone(normalised))
        outputs: dict[str, Any] = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        outputs["points"], outputs["strides"] = self._points(sizes, images.device)
        if self.roi_head is not None:
            outputs["roi_features"] = list(features)
            if rois is not None:
                outputs["roi"] = self.roi_head(outputs["roi_features"], rois, normalised)
        return outputs

    def training_rois(self, boxes: Tensor, labels: Tensor) -> TrainingRois | None:
        """The boxes a training step reads out: each expert cell (``labels >= 0``) exactly and
        jittered (`Readout`); ``None`` without a region read-out."""
        if self.readout is None:
            return None
        return training_rois(boxes, labels, self.readout.copies, self.readout.jitter)

    def detections(
        self,
        outputs: dict[str, Any],
        images: Tensor,
        settings: PostProcess,
        image_size: tuple[int, int] | Tensor | None = None,
        evaluation: bool = False,
        one_per_cell: bool = False,
    ) -> list[Detections]:
        """Detections from this detector's outputs, one dict per image (`postprocess` keys).

        Without a region read-out this is `postprocess`. With one, the dense head proposes one
        box per cell (class-agnostic NMS) and the `RoiHead` gives each box its classes and
        attributes (`apply_readout`).

        Args:
            outputs: `forward` output for ``images``.
            images: the float ``[B, 3, H, W]`` input of `forward` (the read-out's pixel crops).
            settings: the post-processing settings.
            image_size: see `postprocess`.
            evaluation: keep ``settings.classes_per_box`` class hypotheses per read-out box
                (COCO mAP credits a second guess); otherwise one label per cell.
            one_per_cell: make the dense head's NMS class-agnostic too (what `lld predict` writes;
                a read-out always is).
        """
        dense = settings.dense_settings()
        if self.roi_head is None:
            return postprocess(outputs, image_size=image_size, class_agnostic=one_per_cell, **dense)
        preds = postprocess(outputs, image_size=image_size, class_agnostic=True, **dense)
        readout = self.roi_head(
            outputs["roi_features"], [p["boxes"] for p in preds], self.normalise(images)
        )
        return apply_readout(
            preds,
            readout,
            classes_per_box=settings.classes_per_box if evaluation else 1,
            max_detections=settings.max_detections,
        )

    def _points(self, sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (tuple(sizes), str(device))
        cached = self._point_cache.get(key)
        if cached is None:
            if len(self._point_cache) >= _MAX_CACHED_SIZES:
                self._point_cache.clear()
            cached = level_points(sizes, self.strides_per_level, device)
            self._point_cache[key] = cached
        return cached
