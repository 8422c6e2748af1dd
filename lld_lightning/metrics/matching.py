"""One-to-one matching of detections to ground-truth cells, for the attribute metrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

#: `match_detections` output for a ground-truth cell that no detection matched.
UNMATCHED: int = -1


def match_detections(
    pred_boxes: Tensor, pred_scores: Tensor, gt_boxes: Tensor, iou_threshold: float = 0.5
) -> Tensor:
    """Greedy one-to-one, class-agnostic matching of detections to ground-truth cells.

    Candidate pairs are those with IoU >= ``iou_threshold``. They are visited by descending
    detection score (ties broken by descending IoU); a pair is accepted when neither its detection
    nor its cell is taken yet. So each detection, most confident first, takes the best-overlapping
    free cell, as in COCO evaluation. Class labels are ignored on purpose: the attribute metrics
    judge the attribute read-out of a *found* cell, whether or not its class is right.

    Args:
        pred_boxes: float ``[N, 4]`` xyxy detections.
        pred_scores: float ``[N]`` detection confidences.
        gt_boxes: float ``[M, 4]`` xyxy ground-truth cells.
        iou_threshold: minimum IoU of a match.

    Returns:
        int64 ``[M]``: for each cell the index of its detection in ``[0, N)``, or `UNMATCHED`.
    """
    num_cells = int(gt_boxes.shape[0])
    matched = torch.full((num_cells,), UNMATCHED, dtype=torch.int64, device=gt_boxes.device)
    if num_cells == 0 or pred_boxes.shape[0] == 0:
        return matched
    iou = box_iou(pred_boxes.float(), gt_boxes.float())  # [N, M]
    det_idx, cell_idx = (iou >= iou_threshold).nonzero(as_tuple=True)
    if det_idx.numel() == 0:
        return matched
    # Lexicographic order (score desc, IoU desc) from two stable sorts, minor key first.
    order = torch.argsort(iou[det_idx, cell_idx], descending=True, stable=True)
    order = order[torch.argsort(pred_scores[det_idx[order]], descending=True, stable=True)]
    # The greedy acceptance is inherently sequential; it only visits candidate pairs (a few per
    # cell), never all N x M.
    cell_to_det = [UNMATCHED] * num_cells
    taken_dets: set[int] = set()
    for det, cell in zip(det_idx[order].tolist(), cell_idx[order].tolist(), strict=True):
        if det in taken_dets or cell_to_det[cell] != UNMATCHED:
            continue
        taken_dets.add(det)
        cell_to_det[cell] = det
    return torch.tensor(cell_to_det, dtype=torch.int64, device=gt_boxes.device)
