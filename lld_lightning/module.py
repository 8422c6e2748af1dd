"""`LldModule`, the one LightningModule: wires detector, loss, post-processing, metrics, optimiser."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from rich.console import Console

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC, LLD_CLASSES
from lld_lightning.data.sample import Batch, unbatch_targets
from lld_lightning.losses import SparseDetectionLoss
from lld_lightning.metrics import (
    DomainMetrics,
    EvaluationDetails,
    attribute_report_table,
    class_ap_table,
    keep_inside_regions,
    render_metrics_table,
)
from lld_lightning.models import Detector, PostProcess
from lld_lightning.models.postprocess import Detections
from lld_lightning.predictor import to_original_pixels

#: Builds the detector for a label space: ``(num_classes, attribute_spec) -> Detector``. A class
#: (`Detector`) or, from a config, ``class_path``/``init_args`` that jsonargparse binds.
DetectorBuilder = Callable[[int, dict[str, int]], Detector]
#: Builds the loss for a label space: ``(num_classes, attribute_spec) -> SparseDetectionLoss``.
LossBuilder = Callable[[int, dict[str, int]], SparseDetectionLoss]


class LldModule(L.LightningModule):
    """Multi-task WBC detector (class, box, quality, attributes) trained with the sparse-mask loss.

    The detector, the loss and the post-processing are components with the recipe as their
    defaults; a config names only what differs::

        model:
          detector:
            class_path: lld_lightning.models.Detector
            init_args: {backbone: resnet34, fpn_channels: 128}
          loss:
            class_path: lld_lightning.losses.SparseDetectionLoss
            init_args: {cls_loss: quality_focal}
          postprocess: {nms_iou: 0.7}

    Args:
        num_classes: number of cell classes (linked from the data module by the CLI).
        attribute_spec: ``{attribute name: number of values}`` (linked from the data module).
        class_names: class names for tables and logs (linked from the data module).
        detector: the detector (`lld_lightning.models.Detector`), built for the label space.
        loss: the training loss (`lld_lightning.losses.SparseDetectionLoss`), built for the label
            space.
        postprocess: how raw outputs become detections (`lld_lightning.models.PostProcess`).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norm parameters).
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        metrics_backend: ``pycocotools`` or ``faster_coco_eval`` (same numbers, faster) for mAP.
        channels_last: run the detector in channels-last memory format (faster on GPUs).
        compile: wrap the detector in ``torch.compile``.
        init_from: start a new fit from the detector weights of this checkpoint (e.g. a model
            trained on fully annotated images, before sparse fine-tuning): new optimiser,
            schedule and run folder; parameters whose shape differs (another class count or
            attribute set) keep their fresh initialisation, with a warning. Ignored when a fit
            resumes from ``--ckpt_path``.
    """

    def __init__(
        self,
        num_classes: int = len(LLD_CLASSES),
        attribute_spec: dict[str, int] | None = None,
        class_names: list[str] | None = None,
        detector: DetectorBuilder = Detector,
        loss: LossBuilder = SparseDetectionLoss,
        postprocess: PostProcess = PostProcess(),  # noqa: B008 (a settings record, never mutated)
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.05,
        metrics_backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools",
        channels_last: bool = False,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        attribute_spec = dict(LLD_ATTRIBUTE_SPEC) if attribute_spec is None else dict(attribute_spec)
        class_names = list(class_names) if class_names is not None else (
            list(LLD_CLASSES) if num_classes == len(LLD_CLASSES) else [str(i) for i in range(num_classes)]
        )
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if metrics_backend not in ("pycocotools", "faster_coco_eval"):
            raise ValueError(f"metrics_backend must be pycocotools or faster_coco_eval, got {metrics_backend!r}")
        postprocess = _as_postprocess(postprocess)
        self.save_hyperparameters()
        # Checkpoints hold plain values only (loadable with weights_only=True): components given
        # as classes or partials (not from a config) are stored as class_path/init_args.
        for name in ("detector", "loss"):
            self.hparams[name] = component_config(self.hparams[name])
        self.hparams["postprocess"] = dict(vars(postprocess))
        self.attribute_spec = attribute_spec
        self.class_names = class_names
        self.settings = postprocess
        self.detector = build_component(detector)(num_classes, attribute_spec)
        self.criterion = build_component(loss)(num_classes, attribute_spec)
        if channels_last:
            self.detector = self.detector.to(memory_format=torch.channels_last)
        # Kept out of the module tree so the compiled wrapper adds no duplicate state-dict keys.
        self.__dict__["_compiled"] = torch.compile(self.detector) if compile else None
        self.val_metrics: DomainMetrics | None = None
        self.test_metrics: DomainMetrics | None = None
        self.test_results: dict[str, float] = {}
        self._schedule_steps: int | None = None
        self._resuming = False

    def resume(self) -> None:
        """Mark the next fit as a resume: its checkpoint restores every weight, so ``init_from`` is
        not read (the CLI calls this when ``lld fit`` gets ``--ckpt_path``)."""
        self._resuming = True

    # ------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, rois: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Raw head outputs for float images ``[B, 3, H, W]`` in ``[0, 1]`` (see `Detector`)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self._compiled or self.detector)(images, rois)

    def detections(
        self,
        outputs: dict[str, Any],
        images: torch.Tensor,
        evaluation: bool = False,
        one_per_cell: bool = False,
        settings: PostProcess | None = None,
    ) -> list[Detections]:
        """Per-image detections from raw outputs with this module's post-processing (or
        ``settings``, e.g. `lld_lightning.tools.tune`'s candidates); see `Detector.detections`."""
        return self.detector.detections(
            outputs,
            images,
            settings or self.settings,
            image_size=tuple(images.shape[-2:]),
            evaluation=evaluation,
            one_per_cell=one_per_cell,
        )

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Per-image detections (boxes in input pixels, scores, labels, attributes), one class
        per cell: what `lld predict` writes."""
        return self.detections(self(images), images, one_per_cell=True)

    # ----------------------------------------------------------------------------- training
    def training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of an augmented batch and its named terms; the region read-out (when
        the detector has one) reads the expert cells' boxes."""
        rois = self.detector.training_rois(batch["boxes"], batch["labels"])
        outputs = self(batch["image"], None if rois is None else rois.boxes)
        if rois is not None:
            outputs["roi"].update(image_index=rois.image_index, cell_index=rois.cell_index)
        terms = self.criterion(outputs, batch)
        return self.criterion.total(terms), terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, terms = self.training_loss(batch)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}): {values}. Lower the learning rate, check the data, or use "
                f"--trainer.gradient_clip_val."
            )
        batch_size = batch["image"].shape[0]
        # Per step only, unsynced: under DDP the curve is rank 0's own batches, which is enough
        # to follow training and costs no collective call per term per step. An epoch-level
        # value would need ``sync_dist=True`` (Lightning reduces it only then).
        self.log(
            "train/loss", loss, prog_bar=True, batch_size=batch_size, on_step=True, on_epoch=False
        )
        self.log_dict(
            {f"train/{k}": v for k, v in terms.items()},
            batch_size=batch_size, on_step=True, on_epoch=False,
        )
        return loss

    # --------------------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from and not self._resuming:
            load_detector_weights(self.detector, self.hparams.init_from)
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
            loss = self.criterion.total(self.criterion(outputs, batch))
            self.log(f"{stage}/loss", loss, batch_size=len(targets), sync_dist=True)
        preds = self.detections(outputs, batch["image"], evaluation=True)
        metrics.update(keep_inside_regions(preds, targets), targets, batch["domain"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _log_metrics(
        self, metrics: DomainMetrics, stage: str, details: bool = False
    ) -> dict[str, float]:
        """Compute, reset and log ``metrics`` as ``<stage>/<key>`` (``all/`` dropped); every rank
        logs the same keys in the same order (`DomainMetrics` picks scopes, and leaves out
        classes without ground truth and undefined attribute metrics, from synced states).
        With ``details`` the `EvaluationDetails` (PR curves, confusion matrices) are kept in
        ``test_details``."""
        if details:
            results, self.test_details = metrics.compute_with_details()
        else:
            results = metrics.compute()
        metrics.reset()
        for key, value in results.items():
            name = f"{stage}/{key[len('all/'):]}" if key.startswith("all/") else f"{stage}/{key}"
            # `DomainMetrics.compute` has synced its states: every rank holds the same value.
            # Lightning cannot know that and warns once per key about an epoch-level tensor
            # logged without ``sync_dist`` under DDP; ``rank_zero_only`` means "only rank 0 calls
            # self.log", which would leave the other ranks' ModelCheckpoint without its monitor.
            # Reducing equal values by max returns them bit for bit (one all-reduce per key, no
            # batch-size weighting as "mean" has), so callbacks read the same value on every rank.
            self.log(
                name, float(value), prog_bar=key == "all/map_50", sync_dist=True, reduce_fx="max"
            )
        return results

    def on_validation_epoch_end(self) -> None:
        results = self._log_metrics(self.val_metrics, "val")
        if self.trainer.state.fn == "validate":  # `lld validate`: show the table; during fit the logs do
            self._print_table(results, self.val_metrics.domains, "lld validate: per-domain results")

    #: PR curves and confusion matrices of the latest `lld test` (`EvaluationDetails`), which the
    #: CLI saves with the flat ``test_results``; None before a test.
    test_details: EvaluationDetails | None = None

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics(self.test_metrics, "test", details=True)
        self._print_table(self.test_results, self.test_metrics.domains, "lld test: per-domain results")

    @rank_zero_only
    def _print_table(self, results: dict[str, float], domains: list[str], title: str) -> None:
        """The per-domain summary, then AP per class and attribute accuracy / F1 per domain."""
        shown = [d for d in domains if f"{d}/map" in results]
        console = Console()
        console.print(render_metrics_table(results, shown, title=title))
        console.print(class_ap_table(results, self.class_names, shown))
        if self.attribute_spec:
            console.print(attribute_report_table(results, self.attribute_spec, shown))

    # ----------------------------------------------------------------------------- predict
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Detections mapped back to each original image's pixels."""
        preds = self.detect(batch["image"])
        results = []
        for i, pred in enumerate(preds):
            h, w = (int(v) for v in batch["image_size"][i])
            boxes = to_original_pixels(pred["boxes"], batch["transform"][i], h, w)  # [N, 4]
            results.append({**{k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                               for k, v in pred.items()},
                            "boxes": boxes.detach().float().cpu(), "path": batch["path"][i],
                            "domain": batch["domain"][i], "width": w, "height": h,
                            "pixel_size_um": float(batch["pixel_size_um"][i])})
        return results

    # --------------------------------------------------------------------------- optimiser
    def set_schedule_steps(self, steps: int) -> None:
        """Length of the warm-up + cosine schedule in optimizer steps (`TimeBudget` moves it)."""
        self._schedule_steps = max(1, int(steps))

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
        for param in self.detector.parameters():
            if param.requires_grad:
                groups[param.ndim <= 1].append(param)  # biases and norm parameters: no decay
        param_groups = [
            {"params": params, "weight_decay": 0.0 if no_decay else h.weight_decay}
            for no_decay, params in groups.items() if params
        ]
        # One fused kernel for the whole update on a GPU instead of a launch per tensor group;
        # Lightning's mixed precision cannot clip the gradients of a fused optimizer, so with
        # gradient clipping the multi-tensor (foreach) path runs instead.
        clipping = bool(getattr(self.trainer, "gradient_clip_val", None))
        optimizer = torch.optim.AdamW(
            param_groups, lr=h.lr, weight_decay=h.weight_decay,
            fused=self.device.type == "cuda" and not clipping,
        )
        steps = self.trainer.estimated_stepping_batches
        # An unbounded run (max_epochs -1, no max_steps) is sized by a `TimeBudget` once it runs.
        self.set_schedule_steps(int(steps) if math.isfinite(steps) else 10**7)

        def schedule(step: int) -> float:
            total_steps = self._schedule_steps
            warmup = min(h.warmup_steps, max(0, total_steps - 1))
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def load_detector_weights(detector: torch.nn.Module, path: str) -> list[str]:
    """Copy a checkpoint's detector weights into ``detector`` where names and shapes agree.

    Returns:
        The names of ``detector``'s parameters and buffers that kept their own values (absent from
        the checkpoint or of another shape); a warning lists them.

    Raises:
        CheckpointError: the file is not a checkpoint of `LldModule` (one line naming it).
    """
    from lld_lightning.callbacks.checkpoint import read_checkpoint

    prefix = "detector."
    source = {
        key[len(prefix):]: value
        for key, value in read_checkpoint(path)["state_dict"].items()
        if key.startswith(prefix)
    }
    own = detector.state_dict()
    matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    detector.load_state_dict(matching, strict=False)
    kept = sorted(set(own) - set(matching))
    if kept:
        rank_zero_warn(
            f"init_from {path}: {len(matching)} of {len(own)} detector tensors loaded; kept their "
            f"fresh initialisation (absent or another shape): {', '.join(kept[:8])}"
            + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        )
    return kept


def _as_postprocess(value: PostProcess | dict[str, Any]) -> PostProcess:
    if isinstance(value, dict):  # a checkpoint's hyperparameters
        return PostProcess(**value)
    return value


def component_config(builder: Any) -> Any:
    """A component as plain values: ``{"class_path", "init_args"}`` for a class or a
    `functools.partial` binding a class to keyword arguments (also jsonargparse's, which wraps the
    class in its instantiator); anything else (a config mapping from LightningCLI) as it is."""
    if isinstance(builder, type):
        return {"class_path": f"{builder.__module__}.{builder.__qualname__}", "init_args": {}}
    if isinstance(builder, functools.partial):
        classes = [part for part in (builder.func, *builder.args) if isinstance(part, type)]
        if classes:
            config = component_config(classes[-1])
            config["init_args"] = {
                key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for key, value in builder.keywords.items()
            }
            return config
    return builder


def build_component(builder: Any) -> Callable[..., Any]:
    """The callable a component's builder stands for: itself, or the class of a
    ``{"class_path", "init_args"}`` mapping bound to its init_args (a checkpoint's hyperparameters
    loaded without LightningCLI)."""
    if callable(builder):
        return builder
    if isinstance(builder, dict) and "class_path" in builder:
        module_name, _, class_name = str(builder["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        init_args = dict(builder.get("init_args") or {})
        if cls is Detector and isinstance(init_args.get("readout"), dict):
            from lld_lightning.models import Readout

            init_args["readout"] = Readout(**init_args["readout"])
        return functools.partial(cls, **init_args)
    raise TypeError(f"expected a class, a callable or a class_path/init_args mapping, got {builder!r}")
