"""Simulated sparse annotation: the paper's protocol applied to a fully annotated set."""

from __future__ import annotations

import dataclasses

import numpy as np

from lld_lightning.data.records import ImageRecord


def sparse_rectangle(width: int, height: int, area_fraction: float, rng: np.random.Generator) -> np.ndarray:
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


def simulate_sparse(record: ImageRecord, area_fraction: float, seed: int) -> ImageRecord:
    """Keep one seeded rectangle of ``record`` labelled and drop the cells whose centre is outside.

    The rectangle depends only on ``(seed, record.image_id)``, so every epoch (and every rank) sees
    the same one. The rectangle becomes the image's only annotated region.
    """
    rng = np.random.default_rng([seed, record.image_id])
    rect = sparse_rectangle(record.width, record.height, area_fraction, rng)
    centres = (record.boxes_xyxy[:, :2] + record.boxes_xyxy[:, 2:]) / 2.0  # [N, 2]
    keep = (
        (centres[:, 0] >= rect[0]) & (centres[:, 0] < rect[2])
        & (centres[:, 1] >= rect[1]) & (centres[:, 1] < rect[3])
    )
    return dataclasses.replace(
        record,
        boxes_xyxy=record.boxes_xyxy[keep],
        labels=record.labels[keep],
        attributes=record.attributes[keep],
        regions_xyxy=rect[None, :],
    )
