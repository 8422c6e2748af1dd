"""Evaluation on sparsely annotated images: only what lies inside the annotated regions counts."""

from __future__ import annotations

import torch

from lld_lightning.boxes import box_centres, points_in_boxes


def keep_inside_regions(
    preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """Drop detections whose centre lies outside every annotated region of their image.

    On a sparsely annotated image nothing is known outside the regions, so a detection there is
    neither a true nor a false positive. On a fully annotated image (whole-image region) this keeps
    everything.

    Args:
        preds: per image, detections with ``boxes [N, 4]`` and any other ``[N, ...]`` keys.
        targets: per image, ``regions [R, 4]`` (`lld_lightning.data.sample.unbatch_targets`).

    Returns:
        Per image, the detections kept, every key filtered alike.
    """
    kept = []
    for pred, target in zip(preds, targets, strict=True):
        inside = points_in_boxes(box_centres(pred["boxes"]), target["regions"].to(pred["boxes"]))  # [N]
        kept.append({key: value[inside] for key, value in pred.items()})
    return kept
