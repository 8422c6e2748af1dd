"""`LldModule`, the one LightningModule: wires detector, loss, post-processing, metrics, optimiser."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC, LLD_CLASSES
from lld_lightning.data.sample import Batch, unbatch_targets
from lld_lightning.data.transforms import invert_boxes
from lld_lightning.ema import WeightEma
from lld_lightning.losses import SparseDetectionLoss
from lld_lightning.metrics import DomainMetrics, render_metrics_table
from lld_lightning.models import build_detector
from lld_lightning.models.roi_head import training_rois

#: The loss terms that are weighted and summed into the training loss.
LOSS_TERMS: tuple[str, ...] = (
    "cls", "box", "quality", "attributes", "roi_cls", "roi_attributes", "dfl"
)
#: The attribute term sums one cross-entropy per attribute (7 for LLD), so at weight 1 it dwarfs the
#: class term and slowed class learning: 0.3 doubled val mAP@.5 after 525 steps on the synthetic
#: sparse data at the same attribute F1 (docs/loss.md).
#: The region read-out's terms (0 without one) follow the same rule. The distribution focal loss
#: (0 without ``box_bins``) takes GFL's weight beside its IoU loss at 2.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "cls": 1.0, "box": 2.0, "quality": 1.0, "attributes": 0.3, "roi_cls": 1.0, "roi_attributes": 0.3,
    "dfl": 0.25,
}
#: The module's hyperparameters that are `postprocess` settings (`LldModule.detections`).
POSTPROCESS_SETTINGS: tuple[str, ...] = (
    "score_threshold", "pre_nms_topk", "nms_iou", "max_detections", "max_containment", "quality_weight"
)


def keep_inside_regions(preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Drop detections whose centre lies outside every annotated region of their image.

    On a sparsely annotated image nothing is known outside the regions, so a detection there is
    neither a true nor a false positive. On a fully annotated image (whole-image region) this keeps
    everything.
    """
    kept = []
    for pred, target in zip(preds, targets, strict=True):
        regions = target["regions"]  # [R, 4]
        centres = (pred["boxes"][:, :2] + pred["boxes"][:, 2:]) / 2  # [N, 2]
        inside = (
            (centres[:, None, 0] >= regions[None, :, 0]) & (centres[:, None, 0] < regions[None, :, 2])
            & (centres[:, None, 1] >= regions[None, :, 1]) & (centres[:, None, 1] < regions[None, :, 3])
        ).any(dim=1)  # [N]
        kept.append({key: value[inside] for key, value in pred.items()})
    return kept


class LldModule(L.LightningModule):
    """Multi-task WBC detector (class, box, quality, attributes) trained with the sparse-mask loss.

    Args:
        num_classes: number of cell classes (linked from the data module by the CLI).
        attribute_spec: ``{attribute name: number of values}`` (linked from the data module).
        class_names: class names for tables and logs (linked from the data module).
        backbone: any timm model name that supports ``features_only``.
        pretrained: load the backbone's pretrained weights from the model hub.
        pretrained_file: load the backbone's weights from this local file instead.
        out_indices: backbone stages fed to the feature pyramid.
        fpn_channels: channels of the feature pyramid and heads.
        head_convs: convolutions per head tower.
        attribute_convs: convolutions of an attribute tower of its own (0 = attributes read the
            classification tower).
        roi_readout: read each cell's class and attributes from features pooled over its whole
            box (`RoiHead`); the dense head then proposes one box per cell.
        roi_pixel_crop: > 0: the read-out's attributes also read each box's input pixels,
            resampled to this side and encoded by a small CNN of their own (`CropEncoder`).
        roi_crop_classes: with ``roi_pixel_crop``, the read-out's class predictor reads the
            crops too.
        roi_copies: read-outs per expert cell in a training step (the first exact, the others
            jittered by ``roi_jitter`` of the box size).
        roi_jitter: see ``roi_copies``.
        classes_per_box: with ``roi_readout``, class hypotheses per box in validation and test
            (mAP credits a second guess at a lower score); prediction always writes one.
        loss_mode: ``masked`` ignores everything outside the annotated regions; ``naive`` treats
            it as background (the baseline).
        loss_weights: weight of each named loss term (``cls``, ``box``, ``quality``, ``attributes``,
            ``roi_cls``, ``roi_attributes``, ``dfl``); missing names keep `DEFAULT_LOSS_WEIGHTS`.
        box_loss: IoU loss for boxes (``giou``, ``diou`` or ``ciou``).
        box_bins: 0 (default): the head predicts each box side's distance directly. ``n >= 2``:
            a distribution over ``0 .. n - 1`` strides per side, trained by the extra
            distribution focal loss term ``dfl`` (docs/model.md, "Box sides as distributions").
        cls_loss: ``focal`` (one-hot targets) or ``quality_focal`` (a positive's class target is
            its predicted box's IoU; `quality_focal_loss`).
        assigner: which locations train as a cell's positives: ``fcos`` (a centre window on the
            level its size fits) or ``task_aligned`` (the locations inside the cell whose current
            prediction fits it best; `assign_task_aligned`). The sparse mask is the same.
        lr: AdamW learning rate of the neck and heads.
        backbone_lr_mult: the backbone's learning rate is ``lr * backbone_lr_mult``.
        weight_decay: AdamW weight decay (not applied to biases and norm parameters).
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        score_threshold, pre_nms_topk, nms_iou, max_detections, max_containment, quality_weight:
            post-processing (`postprocess`; `lld_lightning.tune` measures them on a checkpoint).
        metrics_backend: ``pycocotools`` or ``faster_coco_eval`` for mAP.
        channels_last: run the detector in channels-last memory format (faster on GPUs).
        compile: wrap the detector in ``torch.compile``.
        ema_decay: keep an exponential moving average of the weights (`WeightEma`, added for
            fitting): validation, checkpoints and the model after training use the average.
            ``None`` (default): no average.
        ema_ramp_steps: optimizer steps over which the average's decay rises to ``ema_decay``.
    """

    def __init__(
        self,
        num_classes: int = len(LLD_CLASSES),
        attribute_spec: dict[str, int] | None = None,
        class_names: list[str] | None = None,
        backbone: str = "resnet18",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        out_indices: list[int] | None = None,
        fpn_channels: int = 128,
        head_convs: int = 2,
        attribute_convs: int = 0,
        roi_readout: bool = False,
        roi_pixel_crop: int = 0,
        roi_crop_classes: bool = False,
        roi_copies: int = 2,
        roi_jitter: float = 0.1,
        classes_per_box: int = 3,
        loss_mode: Literal["masked", "naive"] = "masked",
        loss_weights: dict[str, float] | None = None,
        box_loss: Literal["giou", "diou", "ciou"] = "giou",
        box_bins: int = 0,
        cls_loss: Literal["focal", "quality_focal"] = "focal",
        assigner: Literal["fcos", "task_aligned"] = "fcos",
        lr: float = 1e-3,
        backbone_lr_mult: float = 1.0,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        score_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_iou: float = 0.6,
        max_detections: int = 100,
        max_containment: float | None = None,
        quality_weight: float = 0.5,
        metrics_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
        channels_last: bool = False,
        compile: bool = False,
        ema_decay: float | None = None,
        ema_ramp_steps: float = 2000.0,
    ) -> None:
        super().__init__()
        attribute_spec = dict(LLD_ATTRIBUTE_SPEC) if attribute_spec is None else dict(attribute_spec)
        class_names = list(class_names) if class_names is not None else (
            list(LLD_CLASSES) if num_classes == len(LLD_CLASSES) else [str(i) for i in range(num_classes)]
        )
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        unknown = set(loss_weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        if not 0.0 <= quality_weight <= 1.0:  # checked here, not at the first validation
            raise ValueError(f"quality_weight must be in [0, 1], got {quality_weight}")
        out_indices = list(out_indices) if out_indices is not None else [2, 3, 4]
        # Saved after resolving the defaults above, so a checkpoint reloads to exactly this model.
        self.save_hyperparameters()
        self.attribute_spec = attribute_spec
        self.class_names = class_names
        self.loss_weights = loss_weights
        self.detector = build_detector(
            backbone=backbone,
            num_classes=num_classes,
            attribute_spec=attribute_spec,
            pretrained=pretrained,
            out_indices=tuple(out_indices),
            fpn_channels=fpn_channels,
            head_convs=head_convs,
            attribute_convs=attribute_convs,
            pretrained_file=pretrained_file,
            roi_readout=roi_readout,
            roi_pixel_crop=roi_pixel_crop,
            roi_crop_classes=roi_crop_classes,
            box_bins=box_bins,
        )
        if channels_last:
            self.detector = self.detector.to(memory_format=torch.channels_last)
        # Kept out of the module tree so the compiled wrapper adds no duplicate state-dict keys.
        self.__dict__["_compiled"] = torch.compile(self.detector) if compile else None
        self.criterion = SparseDetectionLoss(
            num_classes=num_classes, attribute_spec=attribute_spec, mode=loss_mode, box_loss=box_loss,
            cls_loss=cls_loss, assigner=assigner,
        )
        self.val_metrics: DomainMetrics | None = None
        self.test_metrics: DomainMetrics | None = None
        self.test_results: dict[str, float] = {}

    def configure_callbacks(self) -> list[L.Callback]:
        """`WeightEma` when ``ema_decay`` is set, for fitting only (validate, test and predict
        read checkpoints, which already hold the averaged weights)."""
        if self.hparams.ema_decay is None or self._trainer is None:
            return []
        if self.trainer.state.fn != TrainerFn.FITTING:
            return []
        return [WeightEma(self.hparams.ema_decay, self.hparams.ema_ramp_steps)]

    # ------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, rois: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Raw head outputs for float images ``[B, 3, H, W]`` in ``[0, 1]`` (see `Detector`)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self._compiled or self.detector)(images, rois)

    @property
    def postprocess_settings(self) -> dict[str, Any]:
        """This module's `postprocess` settings (its hyperparameters), by keyword."""
        h = self.hparams
        return {name: h[name] for name in POSTPROCESS_SETTINGS}

    def detections(
        self,
        outputs: dict[str, Any],
        image_size: tuple[int, int],
        classes_per_box: int = 1,
        one_per_cell: bool = False,
        **overrides: Any,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image detections from raw outputs, with this module's post-processing settings
        (``overrides`` replaces some of them, e.g. ``nms_iou=0.7``; `lld_lightning.tune`).

        ``one_per_cell`` makes the dense head's post-processing class-agnostic (the region
        read-out always is); evaluation keeps every (cell, class) hypothesis, as COCO mAP wants.
        """
        unknown = set(overrides) - set(POSTPROCESS_SETTINGS)
        if unknown:
            raise ValueError(f"unknown post-processing settings {sorted(unknown)}; known: {POSTPROCESS_SETTINGS}")
        return self.detector.detections(
            outputs,
            image_size=image_size,
            classes_per_box=classes_per_box,
            class_agnostic=one_per_cell,
            **{**self.postprocess_settings, **overrides},
        )

    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per-image detections (boxes in input pixels, scores, labels, attributes), one class
        per cell: what `lld predict` writes."""
        return self.detections(self(images), tuple(images.shape[-2:]), one_per_cell=True)

    def weighted_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.loss_weights[name] * terms[name] for name in LOSS_TERMS)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.detector.roi_head is None:
            outputs = self(batch["image"])
        else:
            rois = training_rois(
                batch["boxes"], batch["labels"], self.hparams.roi_copies, self.hparams.roi_jitter
            )
            outputs = self(batch["image"], rois.boxes)
            outputs["roi"].update(image_index=rois.image_index, cell_index=rois.cell_index)
        terms = self.criterion(outputs, batch)
        loss = self.weighted_loss(terms)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): {values}. Lower the learning rate, check the data, or use "
                f"--trainer.gradient_clip_val."
            )
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch_size)
        return loss

    # --------------------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        kwargs = dict(
            num_classes=self.hparams.num_classes,
            class_names=self.class_names,
            attribute_spec=self.attribute_spec,
            backend=self.hparams.metrics_backend,
        )
        if stage in ("fit", "validate"):
            domains = datamodule.val_domains if datamodule is not None else []
            self.val_metrics = DomainMetrics(domains=domains or ["default"], **kwargs)
        if stage == "test":
            domains = datamodule.test_domains if datamodule is not None else []
            self.test_metrics = DomainMetrics(domains=domains or ["default"], **kwargs)

    def _eval_step(self, batch: Batch, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        outputs = self(batch["image"])
        targets = unbatch_targets(batch)
        if stage == "val":
            terms = self.criterion(outputs, batch)
            self.log(f"{stage}/loss", self.weighted_loss(terms), batch_size=len(targets), sync_dist=True)
        preds = self.detections(
            outputs, tuple(batch["image"].shape[-2:]), classes_per_box=self.hparams.classes_per_box
        )
        metrics.update(keep_inside_regions(preds, targets), targets, batch["domain"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _log_metrics(self, metrics: DomainMetrics, stage: str) -> dict[str, float]:
        results = metrics.compute()
        metrics.reset()
        for key, value in results.items():
            name = f"{stage}/{key[len('all/'):]}" if key.startswith("all/") else f"{stage}/{key}"
            self.log(name, float(value), prog_bar=key in ("all/map_50",), sync_dist=False)
        return results

    def on_validation_epoch_end(self) -> None:
        results = self._log_metrics(self.val_metrics, "val")
        if self.trainer.state.fn == "validate":  # `lld validate`: show the table; during fit the logs do
            self._print_table(results, self.val_metrics.domains, "lld validate: per-domain results")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics(self.test_metrics, "test")
        self._print_table(self.test_results, self.test_metrics.domains, "lld test: per-domain results")

    @rank_zero_only
    def _print_table(self, results: dict[str, float], domains: list[str], title: str) -> None:
        shown = [d for d in domains if f"{d}/map" in results]
        Console().print(render_metrics_table(results, shown, title=title))

    # ----------------------------------------------------------------------------- predict
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Detections mapped back to each original image's pixels."""
        preds = self.detect(batch["image"])
        results = []
        for i, pred in enumerate(preds):
            boxes = invert_boxes(pred["boxes"][None], batch["transform"][i : i + 1])[0]  # [N, 4]
            h, w = (int(v) for v in batch["image_size"][i])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            results.append({**{k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                               for k, v in pred.items()},
                            "boxes": boxes.detach().float().cpu(), "path": batch["path"][i],
                            "domain": batch["domain"][i], "width": w, "height": h})
        return results

    # --------------------------------------------------------------------------- optimiser
    @property
    def training_progress(self) -> float | None:
        """Optimizer steps taken over the schedule's length (None before the optimizer exists)."""
        steps = getattr(self, "_schedule_steps", None)
        if steps is None or self._trainer is None:
            return None
        return min(1.0, self.global_step / steps)

    def set_schedule_steps(self, steps: int) -> None:
        """Length of the warm-up + cosine schedule in optimizer steps (`TimeBudget` moves it)."""
        self._schedule_steps = max(1, int(steps))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        backbone_ids = {id(p) for p in self.detector.backbone.parameters()}
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for param in self.detector.parameters():
            if not param.requires_grad:
                continue
            key = (id(param) in backbone_ids, param.ndim <= 1)  # (backbone?, bias or norm?)
            groups.setdefault(key, []).append(param)
        param_groups = [
            {"params": params,
             "lr": h.lr * (h.backbone_lr_mult if is_backbone else 1.0),
             "weight_decay": 0.0 if no_decay else h.weight_decay}
            for (is_backbone, no_decay), params in sorted(groups.items())
        ]
        # One fused kernel for the whole update on a GPU instead of a launch per tensor group;
        # Lightning's mixed precision cannot clip the gradients of a fused optimizer, so with
        # gradient clipping (every shipped config) the multi-tensor (foreach) path runs instead.
        clipping = bool(getattr(self.trainer, "gradient_clip_val", None))
        optimizer = torch.optim.AdamW(
            param_groups,
            lr=h.lr,
            weight_decay=h.weight_decay,
            fused=self.device.type == "cuda" and not clipping,
        )
        self.set_schedule_steps(int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            total_steps = self._schedule_steps
            warmup = min(h.warmup_steps, max(0, total_steps - 1))
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
