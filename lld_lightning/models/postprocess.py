"""Raw detector outputs -> per-image detections with class, score and attribute read-outs.

Vectorised over the batch: one top-k over ``[B, P * C]``, one mask (threshold and box area),
one class-aware NMS call for the whole batch (group = image * C + class), then a split into
per-image dicts. `PostProcess` holds the settings; `Detector.detections` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lld_lightning.boxes import nms
from lld_lightning.models.box_coding import decode_boxes

Detections = dict[str, torch.Tensor]


def _clip(
    boxes_xyxy: torch.Tensor,
    image_size: tuple[int, int] | torch.Tensor | None,
    image_index: torch.Tensor,
) -> torch.Tensor:
    """Clip ``[N, 4]`` boxes to ``(h, w)`` (one size) or ``[B, 2]`` sizes (``image_index`` picks)."""
    if image_size is None:
        return boxes_xyxy
    if isinstance(image_size, torch.Tensor) and image_size.dim() == 2:
        size = image_size.to(boxes_xyxy.device, boxes_xyxy.dtype)[image_index]  # [N, 2] (h, w)
        height, width = size[:, 0:1], size[:, 1:2]
    else:
        height_value, width_value = (float(v) for v in image_size)
        height = boxes_xyxy.new_tensor(height_value)
        width = boxes_xyxy.new_tensor(width_value)
    xs = torch.minimum(boxes_xyxy[:, 0::2].clamp(min=0.0), width)
    ys = torch.minimum(boxes_xyxy[:, 1::2].clamp(min=0.0), height)
    return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)


def _contained(boxes: torch.Tensor, groups: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool ``[N]``: which boxes have more than ``threshold`` of their area inside an earlier box
    of the same NMS group (``boxes`` sorted by descending score within each group).

    Not greedy: an earlier box that is itself dropped still counts (it only matters for chains
    of three nested boxes).
    """
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # [N, N]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=-1)  # [N]
    inside = inter / area.clamp(min=1e-6)[:, None]  # row i's fraction inside column j
    n = boxes.shape[0]
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).tril(diagonal=-1)  # j < i
    same_group = groups[:, None] == groups[None, :]
    return ((inside > threshold) & earlier & same_group).any(dim=1)


def _attribute_readout(
    logits: list[torch.Tensor], count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax value int64 ``[N, A]`` and its softmax probability ``[N, A]`` of each attribute's
    ``[N, K]`` logits (one small op per attribute, not per cell); ``[N, 0]`` without attributes."""
    if not logits:
        return (
            torch.zeros((count, 0), dtype=torch.int64, device=device),
            torch.zeros((count, 0), dtype=torch.float32, device=device),
        )
    best = [values.float().softmax(dim=-1).max(dim=-1) for values in logits]
    return (
        torch.stack([value for _, value in best], dim=1),
        torch.stack([probability for probability, _ in best], dim=1),
    )


def detection_scores(
    cls_logits: torch.Tensor, quality_logits: torch.Tensor, quality_weight: float = 0.5
) -> torch.Tensor:
    """Float32 ``[B, P, C]`` detection scores ``sigmoid(cls) ** (1 - w) * sigmoid(quality) ** w``
    from ``cls_logits [B, P, C]`` and ``quality_logits [B, P]``, ``w = quality_weight``.

    The default 0.5 is the geometric mean ``sqrt(sigmoid(cls) * sigmoid(quality))``; 0 ranks by
    the class probability alone (with ``cls_loss: quality_focal`` that is itself an IoU
    estimate), 1 by the quality alone.
    """
    if not 0.0 <= quality_weight <= 1.0:
        raise ValueError(f"quality_weight must be in [0, 1], got {quality_weight}")
    probability = cls_logits.float().sigmoid()
    quality = quality_logits.float().sigmoid().unsqueeze(-1)  # [B, P, 1]
    if quality_weight == 0.5:  # the scores every earlier run had, bit for bit (two pows differ by ULPs)
        return torch.sqrt(probability * quality)
    return probability.pow(1.0 - quality_weight) * quality.pow(quality_weight)


def postprocess(
    outputs: dict[str, Any],
    score_threshold: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou: float = 0.6,
    max_detections: int = 100,
    image_size: tuple[int, int] | torch.Tensor | None = None,
    class_agnostic: bool = False,
    max_containment: float | None = None,
    quality_weight: float = 0.5,
) -> list[Detections]:
    """Turn the detector's output dict into detections, one dict per image.

    Args:
        outputs: `Detector.forward` output (``cls_logits [B, P, C]``, ``box_deltas [B, P, 4]``,
            ``quality_logits [B, P]``, ``attr_logits {name: [B, P, K]}``, ``points [P, 2]``,
            ``strides [P]``).
        score_threshold: keep candidates with score strictly greater than this.
        pre_nms_topk: candidates (location, class) pairs kept per image before NMS.
        nms_iou: IoU above which the lower-scored box of the same image and class is dropped.
        max_detections: detections kept per image after NMS, highest scores first.
        image_size: ``(h, w)`` to clip every image's boxes to, or an int ``[B, 2]`` tensor of
            per-image ``(h, w)`` (the batch's ``image_size``); ``None`` does not clip. Boxes
            with no area left after clipping are dropped.
        class_agnostic: one detection per cell: each location keeps only its best class and
            NMS compares boxes of different classes too. The default keeps one detection per
            (cell, class) hypothesis, which COCO mAP rewards when the class is uncertain.
        max_containment: drop a detection when more than this fraction of its area lies inside
            a higher-scoring detection of the same image (and class, unless class-agnostic),
            after NMS and the ``max_detections`` cap. IoU-NMS keeps a partial box nested in a
            cell's box (their IoU is the area ratio, often < 0.5); cells in a film do not nest.
            ``None`` (default) keeps them.
        quality_weight: how the class probability and the localisation quality make the score
            (`detection_scores`; 0.5, the default, is their geometric mean).

    Returns:
        Per image, sorted by descending score: ``boxes`` float ``[N, 4]`` xyxy pixels,
        ``scores`` float ``[N]`` (`detection_scores`), ``labels`` int64
        ``[N]``, ``attributes`` int64 ``[N, A]`` (argmax per attribute, spec order, at the
        detection's location), ``attribute_scores`` float ``[N, A]`` (its softmax probability).
    """
    cls_logits = outputs["cls_logits"]
    batch, num_points, num_classes = cls_logits.shape
    device = cls_logits.device
    scores = detection_scores(cls_logits, outputs["quality_logits"], quality_weight)  # [B, P, C]
    if class_agnostic:  # one hypothesis per location: its best class
        best_scores, best_labels = scores.max(dim=-1)  # [B, P]
        k = min(pre_nms_topk, num_points)
        top_scores, top_point = best_scores.topk(k, dim=1)  # [B, k]
        top_index = top_point * num_classes + best_labels.gather(1, top_point)
    else:
        k = min(pre_nms_topk, num_points * num_classes)
        top_scores, top_index = scores.reshape(batch, -1).topk(k, dim=1)  # [B, k]
        top_point = torch.div(top_index, num_classes, rounding_mode="floor")  # [B, k]
    # Decode all B * k candidates (cheap) so that threshold and area make one mask, one sync.
    deltas = outputs["box_deltas"].float().gather(1, top_point[..., None].expand(-1, -1, 4))
    boxes = decode_boxes(
        outputs["points"][top_point], outputs["strides"][top_point], deltas
    ).reshape(-1, 4)  # [B * k, 4]
    all_images = torch.arange(batch, device=device).repeat_interleave(k)  # [B * k]
    boxes = _clip(boxes, image_size, all_images)
    # Boxes clipped to nothing (predicted from letterbox padding) are not detections.
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # [B * k]
    candidate = (top_scores.reshape(-1) > score_threshold) & has_area
    selected = candidate.nonzero().squeeze(1)  # [N]
    boxes, candidate_scores = boxes[selected], top_scores.reshape(-1)[selected]
    image_index, point_index = all_images[selected], top_point.reshape(-1)[selected]
    labels = top_index.reshape(-1)[selected] % num_classes  # [N]

    # Indices in descending score order over the whole batch. torchvision picks the strategy:
    # one call with groups shifted apart for small inputs, a loop over groups for large ones
    # (a single O(N^2) call over tens of thousands of candidates is far slower).
    groups = image_index if class_agnostic else image_index * num_classes + labels
    kept = nms(boxes, candidate_scores, nms_iou, groups)
    # A stable sort by image keeps the score order inside each image.
    kept = kept[torch.sort(image_index[kept], stable=True).indices]
    kept_image = image_index[kept]
    counts = torch.bincount(kept_image, minlength=batch)  # [B]
    first_of_image = counts.cumsum(0) - counts  # [B]
    rank = torch.arange(kept.numel(), device=device) - first_of_image[kept_image]
    kept = kept[rank < max_detections]
    if max_containment is not None and kept.numel() > 1:
        kept = kept[~_contained(boxes[kept], groups[kept], max_containment)]
    counts = torch.bincount(image_index[kept], minlength=batch)

    kept_image, kept_point = image_index[kept], point_index[kept]
    attributes, attribute_probabilities = _attribute_readout(
        [logits[kept_image, kept_point] for logits in outputs["attr_logits"].values()],
        kept.numel(),
        device,
    )

    split_sizes = counts.tolist()
    per_key = {
        "boxes": boxes[kept].split(split_sizes),
        "scores": candidate_scores[kept].split(split_sizes),
        "labels": labels[kept].split(split_sizes),
        "attributes": attributes.split(split_sizes),
        "attribute_scores": attribute_probabilities.split(split_sizes),
    }
    return [{key: parts[i] for key, parts in per_key.items()} for i in range(batch)]


def apply_readout(
    preds: list[Detections],
    readout: dict[str, Any],
    classes_per_box: int = 1,
    max_detections: int = 100,
) -> list[Detections]:
    """Re-class one-per-cell detections with a region read-out (`RoiHead` output).

    Each box becomes ``classes_per_box`` detections, its most probable classes, scored
    ``objectness * p(class)`` where the objectness is the box's dense score: a box the dense head
    barely believes in stays low however sure the read-out is of its class (a geometric mean
    lifted 0.1-objectness boxes over `PredictionWriter`'s 0.3 and tripled the cells `lld predict`
    wrote). Attributes and their probabilities come from the read-out (the same for every class
    of a box).

    Args:
        preds: per image, `postprocess(..., class_agnostic=True)` output.
        readout: ``cls_logits [N, C]`` and ``attr_logits {name: [N, K]}`` for the boxes of
            ``preds`` in order (image 0 first).
        classes_per_box: class hypotheses kept per box (1 for one label per cell; more lets
            mAP credit a second guess at a lower score).
        max_detections: detections kept per image, highest scores first.

    Returns:
        Per image, the keys of `postprocess`, sorted by descending score.
    """
    batch = len(preds)
    probabilities = readout["cls_logits"].float().softmax(dim=-1)  # [N, C]
    device = probabilities.device
    k = min(classes_per_box, probabilities.shape[1])
    class_probability, labels = probabilities.topk(k, dim=1)  # [N, k]
    attributes, attribute_probabilities = _attribute_readout(
        list(readout["attr_logits"].values()), probabilities.shape[0], device
    )
    boxes = torch.cat([p["boxes"] for p in preds]) if preds else probabilities.new_zeros((0, 4))
    objectness = torch.cat([p["scores"].float() for p in preds]) if preds else boxes[:, 0]
    counts = torch.tensor([int(p["boxes"].shape[0]) for p in preds], device=device)
    box_image = torch.repeat_interleave(torch.arange(batch, device=device), counts)  # [N]

    # All B * N * k hypotheses at once: score order, then a stable sort by image, then a per-image
    # rank cap (as in `postprocess`), with no loop over images.
    scores = (objectness[:, None] * class_probability).reshape(-1)  # [N * k]
    order = scores.argsort(descending=True)
    order = order[torch.sort(box_image[order // k], stable=True).indices]
    image = box_image[order // k]
    per_image = torch.bincount(image, minlength=batch)
    rank = torch.arange(order.numel(), device=device) - (per_image.cumsum(0) - per_image)[image]
    order = order[rank < max_detections]
    box_of = order // k  # the box each kept hypothesis belongs to
    split_sizes = per_image.clamp(max=max_detections).tolist()
    per_key = {
        "boxes": boxes[box_of].split(split_sizes),
        "scores": scores[order].split(split_sizes),
        "labels": labels.reshape(-1)[order].split(split_sizes),
        "attributes": attributes[box_of].split(split_sizes),
        "attribute_scores": attribute_probabilities[box_of].split(split_sizes),
    }
    return [{key: parts[i] for key, parts in per_key.items()} for i in range(batch)]


@dataclass
class PostProcess:
    """How raw outputs become detections (`postprocess`, `apply_readout`).

    The defaults are the recipe; ``python -m lld_lightning.tools.tune`` measures other values on a
    trained checkpoint from one forward pass.

    Args:
        score_threshold: keep candidates scoring strictly above this.
        pre_nms_topk: (location, class) candidates kept per image before NMS.
        nms_iou: IoU above which the lower-scored of two boxes (same image, same class unless one
            class per cell) is dropped.
        max_detections: detections kept per image, highest scores first.
        max_containment: drop a detection when more than this fraction of its area lies inside a
            higher-scoring one (cells in a film do not nest; IoU-NMS keeps a partial box nested
            in a cell's box); ``None`` keeps them.
        quality_weight: the score is ``p_class ** (1 - w) * quality ** w`` (0.5: geometric mean).
        classes_per_box: class hypotheses per box that evaluation keeps with a region read-out
            (COCO mAP credits a second guess at a lower score); prediction writes one.
    """

    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_iou: float = 0.6
    max_detections: int = 100
    max_containment: float | None = 0.5
    quality_weight: float = 0.5
    classes_per_box: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.quality_weight <= 1.0:  # checked when built, not at the first validation
            raise ValueError(f"quality_weight must be in [0, 1], got {self.quality_weight}")
        if self.classes_per_box < 1:
            raise ValueError(f"classes_per_box must be >= 1, got {self.classes_per_box}")

    def dense_settings(self) -> dict[str, Any]:
        """The keyword arguments of `postprocess`."""
        return {
            "score_threshold": self.score_threshold,
            "pre_nms_topk": self.pre_nms_topk,
            "nms_iou": self.nms_iou,
            "max_detections": self.max_detections,
            "max_containment": self.max_containment,
            "quality_weight": self.quality_weight,
        }
