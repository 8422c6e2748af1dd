"""Sparse annotation: one labelled rectangle per image, simulated on a fully annotated set."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lld_lightning.boxes import box_centres, points_in_boxes
from lld_lightning.data.records import ImageRecord


def sparse_rectangle(
    width: int, height: int, area_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """One random rectangle of ``area_fraction`` of the image, aspect ratio in ``[0.5, 2]``.

    Returns:
        float32 ``[4]`` xyxy pixels, inside the image.
    """
    if not 0.0 < area_fraction <= 1.0:
        raise ValueError(f"sparse area fraction must be in (0, 1], got {area_fraction}")
    area = area_fraction * width * height
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    rect_w = min(float(width), np.sqrt(area * aspect))
    rect_h = min(float(height), area / rect_w)
    rect_w = min(float(width), area / rect_h)
    x1 = rng.uniform(0.0, width - rect_w)
    y1 = rng.uniform(0.0, height - rect_h)
    return np.array([x1, y1, x1 + rect_w, y1 + rect_h], dtype=np.float32)


def restrict_to_region(record: ImageRecord, region_xyxy: np.ndarray) -> ImageRecord:
    """Keep the cells whose centre lies in ``region_xyxy`` and make it the only region.

    Args:
        record: a fully annotated record.
        region_xyxy: float32 ``[4]`` rectangle.

    Returns:
        a new record with the kept cells and ``regions_xyxy`` ``[1, 4]``.
    """
    region = np.asarray(region_xyxy, dtype=np.float32).reshape(1, 4)
    centres = box_centres(torch.from_numpy(record.boxes_xyxy).float().reshape(-1, 4))  # [N, 2]
    keep = points_in_boxes(centres, torch.from_numpy(region)).numpy()  # [N]
    return dataclasses.replace(
        record,
        boxes_xyxy=record.boxes_xyxy[keep],
        labels=record.labels[keep],
        attributes=record.attributes[keep],
        regions_xyxy=region,
        label_lines=None if record.label_lines is None else record.label_lines[keep],
    )


def simulate_sparse(record: ImageRecord, area_fraction: float, seed: int) -> ImageRecord:
    """Keep one seeded rectangle of ``record`` labelled and drop the cells whose centre is outside.

    The rectangle depends only on ``(seed, record.image_id)``, so every epoch (and every rank) sees
    the same one. The rectangle becomes the image's only annotated region.
    """
    rng = np.random.default_rng([seed, record.image_id])
    rect = sparse_rectangle(record.width, record.height, area_fraction, rng)
    return restrict_to_region(record, rect)
