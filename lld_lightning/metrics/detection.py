"""COCO mAP whose states survive ranks holding different numbers of images."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (rank order); ``[obj]`` outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _to_cpu(item: Any) -> Any:
    return item.detach().cpu() if isinstance(item, Tensor) else item


class UnevenMeanAveragePrecision(MeanAveragePrecision):
    """`MeanAveragePrecision` that syncs correctly when ranks saw different numbers of images.

    torchmetrics keeps one tensor per image in list states and all-gathers them one tensor at a
    time, which needs the same number of images on every rank. Per-domain metrics break that
    (a domain may be seen by one rank only). Here all list states of a rank travel as one
    pickled object in a single ``all_gather_object``, so any per-rank count, zero included, works.
    Images stay aligned because every state is concatenated in the same rank-major order.
    """

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # CPU copies: a CUDA tensor unpickled on another rank would land on the sender's device.
        local = {attr: [_to_cpu(x) for x in getattr(self, attr)] for attr in self._reductions}
        gathered = all_gather_objects(local, process_group or self.process_group)
        device = self.device
        for attr in self._reductions:
            merged = [item for part in gathered for item in part[attr]]
            setattr(
                self,
                attr,
                [x.to(device) if isinstance(x, Tensor) else x for x in merged],
            )
