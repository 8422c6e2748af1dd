"""Detection mAP and attribute metrics, over all images and per acquisition domain."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lld_lightning.metrics.attributes import UNDEFINED_METRIC, AttributeMetrics
from lld_lightning.metrics.detection import UnevenMeanAveragePrecision

#: Result-key prefix of the metrics over every image.
ALL_DOMAINS: str = "all"

CocoBackend = Literal["pycocotools", "faster_coco_eval"]

#: Index of IoU 0.5 in COCO's IoU thresholds (0.5:0.05:0.95), for the PR curves.
IOU_50_INDEX: int = 0


@dataclass
class EvaluationDetails:
    """What `DomainMetrics` measured beyond its flat scalars, per scope (``"all"``, domains).

    Attributes:
        recall_thresholds: COCO's 101 recall points in ``[0, 1]``, the x axis of every curve.
        pr_curves: ``{scope: {class name: precision at each recall point}}`` at IoU 0.5 (all
            box areas, 100 detections per image); only classes with a ground-truth cell in
            the scope; COCO's interpolated precision, 0 beyond the last recall reached.
        confusion: ``{scope: {attribute: [[count]]}}``, rows = true value, columns = predicted
            value, over the matched cells (see `AttributeMetrics`).
    """

    recall_thresholds: list[float] = field(default_factory=list)
    pr_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    confusion: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)


class ImageCounts(Metric):
    """Number of images seen per scope (index), summed over ranks.

    `DomainMetrics.compute` decides from these *synced* counts which scopes to compute, so every
    rank runs the same sequence of collective calls even when a domain lives on one rank only.
    """

    is_differentiable = False
    full_state_update = False
    counts: Tensor

    def __init__(self, num_scopes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", torch.zeros(num_scopes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, scope_index: Tensor) -> None:
        """Count images; ``scope_index`` is int64 ``[B]`` with one scope index per image."""
        self.counts += torch.bincount(
            scope_index.to(self.counts.device), minlength=len(self.counts)
        )

    def compute(self) -> Tensor:
        return self.counts.clone()


def _module_key(index: int, scope: str) -> str:
    """A valid, unique `nn.ModuleDict` key for a scope name (which may hold '.', '/', ...)."""
    return f"s{index}_" + re.sub(r"\W", "_", scope)


class DomainMetrics(nn.Module):
    """COCO mAP (torchmetrics) and `AttributeMetrics`, for all images and for each domain.

    Every scope (``"all"`` and each domain) has its own `MeanAveragePrecision` (in its
    rank-uneven variant, see `UnevenMeanAveragePrecision`) and its own `AttributeMetrics`
    (none when ``attribute_spec`` is empty). Under DDP the torchmetrics states are synced at
    ``compute()``; scopes are chosen from image counts synced across ranks.

    ``compute()`` returns floats under flat keys, ``<dom>`` being ``"all"`` or a domain name;
    a scope that saw no image is left out:

    - ``<dom>/num_images``;
    - ``<dom>/map``, ``<dom>/map_50``, ``<dom>/map_75``;
    - ``<dom>/ap/<class name>`` per class (``class_metrics=True``); a class with no
      ground-truth cell in the scope has no AP and is left out (torchmetrics' -1 would drag
      down any average taken over the logged values);
    - ``<dom>/ap50/<class name>``: the same classes' AP at IoU 0.5 (``class_metrics=True``);
    - ``<dom>/attr/mean_f1``, ``<dom>/attr/mean_accuracy``, ``<dom>/attr/matched_fraction``,
      ``<dom>/attr/<name>/f1``, ``<dom>/attr/<name>/accuracy`` (see `AttributeMetrics`); an
      undefined one (`UNDEFINED_METRIC` there) is left out.

    The keys depend on synced states only, so every rank computes the same key set.

    Args:
        domains: the domain names images may carry.
        num_classes: number of classes.
        class_names: ``num_classes`` names, index = class id.
        attribute_spec: ``{name: number of values}``; empty to skip attribute metrics.
        backend: COCO evaluation backend of torchmetrics.
        class_metrics: also report AP per class.
        iou_threshold: IoU for matching detections to cells in the attribute metrics.
    """

    def __init__(
        self,
        domains: list[str],
        num_classes: int,
        class_names: list[str],
        attribute_spec: dict[str, int],
        backend: CocoBackend = "pycocotools",
        class_metrics: bool = True,
        iou_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        domains = list(domains)
        if len(set(domains)) != len(domains):
            raise ValueError(f"duplicate domain names in {domains}")
        if ALL_DOMAINS in domains:
            raise ValueError(f"{ALL_DOMAINS!r} is reserved for the metrics over every domain")
        if len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.domains = domains
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.attribute_spec = dict(attribute_spec)
        self.class_metrics = class_metrics
        self.scopes = [ALL_DOMAINS, *domains]
        self._scope_index = {scope: i for i, scope in enumerate(self.scopes)}
        self._keys = {scope: _module_key(i, scope) for i, scope in enumerate(self.scopes)}
        self.detection = nn.ModuleDict(
            {
                key: UnevenMeanAveragePrecision(
                    box_format="xyxy",
                    iou_type="bbox",
                    backend=backend,
                    class_metrics=class_metrics,
                )
                for key in self._keys.values()
            }
        )
        for metric in self.detection.values():
            # COCO's protocol scores the 100 best detections per image; crowded fields (dozens of
            # red cells) legitimately send more, which is not worth a warning every evaluation.
            metric.warn_on_many_detections = False
        self.attributes: nn.ModuleDict | None = None
        if self.attribute_spec:
            self.attributes = nn.ModuleDict(
                {
                    key: AttributeMetrics(self.attribute_spec, iou_threshold=iou_threshold)
                    for key in self._keys.values()
                }
            )
        self.image_counts = ImageCounts(len(self.scopes))

    def update(
        self,
        preds: list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        domains: list[str],
    ) -> None:
        """Add a batch of images.

        Args:
            preds: per image ``boxes`` float ``[N, 4]`` xyxy pixels, ``scores`` ``[N]``,
                ``labels`` int64 ``[N]``, and ``attributes`` int64 ``[N, A]`` when the spec is
                non-empty (``attribute_scores`` is not used).
            targets: per image ``boxes`` float ``[M, 4]``, ``labels`` int64 ``[M]``,
                ``attributes`` int64 ``[M, A]`` (``IGNORE_INDEX`` = missing).
            domains: per image domain name, one of the constructor's ``domains``.

        Raises:
            ValueError: lengths differ, or an unknown domain.
        """
        if not len(preds) == len(targets) == len(domains):
            raise ValueError(
                f"got {len(preds)} predictions, {len(targets)} targets, {len(domains)} domains"
            )
        unknown = sorted({d for d in domains if d not in self._scope_index or d == ALL_DOMAINS})
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; known: {self.domains}")
        if not preds:
            return
        det_preds = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
        det_targets = [{k: t[k] for k in ("boxes", "labels")} for t in targets]

        groups: dict[str, list[int]] = {ALL_DOMAINS: list(range(len(preds)))}
        for i, domain in enumerate(domains):
            groups.setdefault(domain, []).append(i)
        for scope, idx in groups.items():
            key = self._keys[scope]
            self.detection[key].update([det_preds[i] for i in idx], [det_targets[i] for i in idx])
            if self.attributes is not None:
                self.attributes[key].update([preds[i] for i in idx], [targets[i] for i in idx])
        scope_index = [self._scope_index[d] for d in domains] + [0] * len(domains)
        self.image_counts.update(torch.tensor(scope_index, dtype=torch.int64))

    def compute(self) -> dict[str, float]:
        """Flat ``{key: float}`` results (see the class docstring); synced under DDP."""
        return self._compute(with_details=False)[0]

    def compute_with_details(self) -> tuple[dict[str, float], EvaluationDetails]:
        """`compute`'s flat results and the `EvaluationDetails`; synced under DDP, so every
        rank must call it (one more collective call per scope than `compute`)."""
        return self._compute(with_details=True)

    def _compute(self, with_details: bool) -> tuple[dict[str, float], EvaluationDetails]:
        details = EvaluationDetails()
        with warnings.catch_warnings():
            # A rank that saw none of a domain's images (or none at all) still joins every sync.
            warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
            counts = self.image_counts.compute().tolist()
            results: dict[str, float] = {}
            for scope, count in zip(self.scopes, counts, strict=True):
                if count == 0:
                    continue
                key = self._keys[scope]
                results[f"{scope}/num_images"] = float(count)
                # COCO's precision array ([10, 101, K, 4, 3]) is asked for only when wanted: for
                # the details and for AP@.5 per class (its conversion costs little next to COCO's
                # evaluation).
                detection = self.detection[key]
                wanted = with_details or self.class_metrics
                if detection.extended_summary != wanted:
                    detection.extended_summary = wanted
                    detection._computed = None  # torchmetrics' cached result lacks or has it
                det = detection.compute()
                results.update(self._detection_results(scope, det))
                if with_details:
                    details.recall_thresholds = [i / 100 for i in range(101)]
                    details.pr_curves[scope] = self._pr_curves(det)
                if self.attributes is not None:
                    attr = self.attributes[key].compute()
                    results.update(
                        {
                            f"{scope}/attr/{k}": float(v)
                            for k, v in attr.items()
                            if float(v) != UNDEFINED_METRIC
                        }
                    )
                    if with_details:
                        matrices = self.attributes[key].confusion_matrices()
                        details.confusion[scope] = {k: v.tolist() for k, v in matrices.items()}
        return results, details

    def _class_name(self, class_id: int) -> str | None:
        return self.class_names[class_id] if 0 <= class_id < self.num_classes else None

    def _detection_results(self, scope: str, det: dict[str, Tensor]) -> dict[str, float]:
        results = {
            f"{scope}/map": float(det["map"]),
            f"{scope}/map_50": float(det["map_50"]),
            f"{scope}/map_75": float(det["map_75"]),
        }
        if self.class_metrics:
            classes = det["classes"].reshape(-1).tolist()
            aps = det["map_per_class"].reshape(-1).tolist()
            # With no class at all torchmetrics gives one -1 and no class id: nothing to name.
            # A negative AP is COCO's "no ground truth of this class": no AP, not a bad one.
            per_class = {
                self._class_name(c): float(ap)
                for c, ap in zip(classes, aps, strict=False)
                if self._class_name(c) is not None and ap >= 0
            }
            results.update({f"{scope}/ap/{name}": per_class[name] for name in self.class_names
                            if name in per_class})
            ap50 = self._ap50_per_class(det)
            results.update({f"{scope}/ap50/{name}": ap50[name] for name in self.class_names
                            if name in ap50})
        return results

    def _ap50_per_class(self, det: dict[str, Tensor]) -> dict[str, float]:
        """AP at IoU 0.5 per class with ground truth, as COCO averages ``map_50`` (all areas,
        the largest detection budget, mean over the recall points), from its ``precision``
        ``[T, R, K, A, M]``; empty without that array (``extended_summary`` off)."""
        precision = det.get("precision")
        if precision is None or precision.ndim != 5:
            return {}
        at_50 = precision[IOU_50_INDEX, :, :, 0, -1]  # [R, K]
        found = {}
        for k, class_id in enumerate(det["classes"].reshape(-1).tolist()[: at_50.shape[1]]):
            name = self._class_name(class_id)
            valid = at_50[:, k][at_50[:, k] > -1]  # COCO's -1: no ground truth of this class
            if name is not None and valid.numel():
                found[name] = float(valid.mean())
        return found

    def _pr_curves(self, det: dict[str, Tensor]) -> dict[str, list[float]]:
        """Precision over recall at IoU 0.5, all areas, the largest detection budget, per class
        with ground truth, from COCO's ``precision`` ``[T, R, K, A, M]``."""
        precision = det.get("precision")
        if precision is None or precision.ndim != 5:
            return {}
        curves = precision[IOU_50_INDEX, :, :, 0, -1]  # [R, K]
        classes = det["classes"].reshape(-1).tolist()
        found: dict[str, list[float]] = {}
        for k, class_id in enumerate(classes[: curves.shape[1]]):
            name = self._class_name(class_id)
            curve = curves[:, k]
            if name is None or bool((curve < 0).all()):  # no ground truth of this class
                continue
            found[name] = curve.clamp(min=0).tolist()
        return {name: found[name] for name in self.class_names if name in found}

    def reset(self) -> None:
        """Forget every image seen."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()
