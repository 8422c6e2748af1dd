"""`PseudoLabeller`: learn from the whole field of view of sparsely annotated images.

Only the cells inside one rectangle per training image are labelled; the region-masked loss ignores
everything else. This callback turns confident detections **outside** the annotated regions into
extra, down-weighted targets, so the unlabelled 80% of each field of view trains the model too.

Two sources of detections (``mode``):

- ``"teacher"`` (default): an EMA copy of the detector (`torch.optim.swa_utils.AveragedModel`) looks
  at a *weak* view of each image (the evaluation letterbox, `LldDataModule.teacher_view`) while the
  student trains on the strong, augmented view; boxes move between the views with the per-image
  matrices, ``student = transform @ inverse(teacher_transform)``. Inside a region only the expert
  labels count.
- ``"self"``: the reference behaviour of the LLD paper's code, for comparison: the student's own
  current detections on its own view, class-agnostic NMS, score > 0.95, weight 0.1, no overlap with
  an expert box, and no check that they lie outside the region.

The targets are appended to the batch (``boxes``/``labels``/``attributes`` plus ``weights``, see
`SparseDetectionLoss`) in ``on_train_batch_start``; Lightning passes the same dict on to
``training_step``. Everything is vectorised over the batch's detections. See docs/pseudo_labels.md.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import batched_nms

from lld_lightning.calibration import (
    CALIBRATION_GRID,
    RegionCalibration,
    one_class_per_cell,
    region_counts,
)
from lld_lightning.constants import IGNORE_INDEX, MATCH_IOU
from lld_lightning.data.sample import pack_per_image
from lld_lightning.data.transforms import clip_boxes, content_boxes, invert_boxes, transform_boxes

PseudoMode = Literal["teacher", "self"]

#: Defaults that differ by mode: (score threshold, loss weight, expert-overlap IoU).
#: "self" reproduces the reference code: score > 0.95, weight 0.1, *any* overlap with an expert box.
MODE_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "teacher": (0.5, 1.0, 0.5),
    "self": (0.95, 0.1, 0.0),
}


def box_centres(boxes: Tensor) -> Tensor:
    """Centres ``[..., 2]`` of xyxy boxes ``[..., 4]``."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def points_in_boxes(points: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
    """Whether each point lies in any valid box of its own image (``x1 <= x < x2``).

    Args:
        points: float ``[N, 2]``.
        boxes: float ``[N, R, 4]``, the boxes of each point's image.
        valid: bool ``[N, R]``.

    Returns:
        bool ``[N]``.
    """
    x, y = points[:, None, 0], points[:, None, 1]  # [N, 1]
    inside = (x >= boxes[..., 0]) & (x < boxes[..., 2]) & (y >= boxes[..., 1]) & (y < boxes[..., 3])
    return (inside & valid).any(dim=1)


def paired_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """IoU of each box with each box of its own image: ``[N, 4]`` x ``[N, M, 4]`` -> ``[N, M]``."""
    top_left = torch.maximum(boxes[:, None, :2], others[..., :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[..., 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # [N, M]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=-1)  # [N]
    other_area = (others[..., 2:] - others[..., :2]).clamp(min=0).prod(dim=-1)  # [N, M]
    union = area[:, None] + other_area - intersection
    return intersection / union.clamp(min=1e-7)


def pseudo_label_quality(
    boxes: Tensor,
    labels: Tensor,
    image_index: Tensor,
    hidden_boxes: Tensor,
    hidden_labels: Tensor,
    hidden_outside: Tensor,
) -> dict[str, Tensor]:
    """Count pseudo-labels that are right and hidden cells they found (all in original pixels).

    A pseudo-label is correct when some hidden cell of its image has the same class and
    IoU >= `MATCH_IOU`; a hidden cell outside the regions is found when some pseudo-label of its
    image matches it that way.

    Args:
        boxes: float ``[N, 4]`` pseudo-label boxes, xyxy original pixels.
        labels: int64 ``[N]`` their classes.
        image_index: int64 ``[N]`` their image in the batch.
        hidden_boxes: float ``[B, H, 4]`` full annotation, original pixels.
        hidden_labels: int64 ``[B, H]``, ``IGNORE_INDEX`` = padding.
        hidden_outside: bool ``[B, H]``, hidden cells outside every annotated region (the ones
            the pseudo-labeller is meant to find).

    Returns:
        int64 scalars ``num_pseudo``, ``num_correct``, ``num_hidden`` (outside the regions) and
        ``num_found``.
    """
    iou = paired_iou(boxes, hidden_boxes[image_index])  # [N, H]
    same = labels[:, None] == hidden_labels[image_index]  # [N, H]; padding (-1) never equals
    match = (iou >= MATCH_IOU) & same  # [N, H]
    found = torch.zeros_like(hidden_outside)
    rows, cols = match.nonzero(as_tuple=True)
    found[image_index[rows], cols] = True
    found &= hidden_outside
    return {
        "num_pseudo": torch.tensor(boxes.shape[0]),
        "num_correct": match.any(dim=1).sum().cpu(),
        "num_hidden": hidden_outside.sum().cpu(),
        "num_found": found.sum().cpu(),
    }


class PseudoLabeller(Callback):
    """Adds pseudo-labels outside the annotated regions to every training batch after a warm-up.

    Args:
        threshold: minimum score (``sqrt(class prob * quality)``) of a pseudo-label; ``None`` =
            the mode's default (0.5 for ``teacher``; > 0.95 for ``self``).
        class_thresholds: per-class overrides ``{class name: threshold}`` (fixed unless
            ``calibrate_precision`` is set; see docs/pseudo_labels.md).
        weight: loss weight of a pseudo-label (expert cells weigh 1); ``None`` = the mode's
            default (1.0 for ``teacher``, 0.1 for ``self``).
        warmup_steps: optimizer steps on expert labels only; the teacher starts as a copy of the
            student at this step and is an EMA of it afterwards.
        warmup_fraction: instead of ``warmup_steps``, this fraction of the run's ``max_steps``
            (read at every step, so it follows a `TimeBudget`'s estimate of the run's length).
        ema_decay: EMA decay of the teacher per optimizer step (about ``1 / (1 - decay)`` steps of
            memory: 0.999 for long runs, 0.99 for a few hundred steps).
        attribute_threshold: an attribute is copied only where its predicted probability reaches
            this; otherwise it is ``IGNORE_INDEX`` (no attribute loss).
        mode: ``teacher`` (EMA teacher, weak view, outside the regions only) or ``self`` (the
            reference self-training).
        nms_iou: class-agnostic NMS between pseudo-labels (one cell, one class).
        max_per_image: at most this many pseudo-labels per image, highest scores first.
        expert_iou: drop a pseudo-label overlapping an expert box by more than this IoU; ``None``
            = the mode's default (0.5 ``teacher``; 0.0, any overlap, ``self``).
        min_size: drop a pseudo-label narrower or lower than this in the student's view (pixels).
        min_visibility: drop a pseudo-label less than this fraction visible in the student's view.
        pre_nms_topk: candidates per image before NMS.
        background_threshold: teacher mode only. ``None`` (default): outside the regions only
            pseudo-labels train, everything else stays ignored. A score: the whole field of the
            student's view becomes an annotated region, and every teacher detection outside
            the expert regions scoring at least this becomes an *ignore box*; so the area where
            the teacher sees nothing trains as background (what full annotation gives), and a
            cell the teacher missed even at this score is learnt as background (logged as
            ``train/pseudo_background_miss``).
        localise: pseudo-labels train the box and quality terms and carry their confident
            attributes (default). ``False``: they train the class only (box weight 0 through
            ``box_weights``, attributes ignored), for teachers whose boxes or attributes are
            less trustworthy than their classes.
        expert_normaliser: the loss's positive count (which divides every term) counts the
            expert cells only (``normaliser_weights`` 0 for pseudo-labels), so pseudo-labels add
            their terms on top of the expert loss instead of rescaling it. ``False`` (default,
            what `docs/results/sparse.md` was measured with): every positive counts, so a
            field full of pseudo-labels shrinks the expert cells' and the background's share.
        calibrate_precision: teacher mode only. ``None`` (default): the thresholds stay fixed.
            A precision: every batch, the teacher's detections *inside* the labelled regions
            are scored against the expert cells there, and each class's threshold becomes the
            lowest of `CALIBRATION_GRID` whose (recent) precision reaches this
            (`RegionCalibration`); ``threshold``/``class_thresholds`` hold until a class has
            ``calibration_min_detections``. Logged as ``train/pseudo_threshold/<class>``.
        calibration_memory: about how many batches the calibration remembers.
        calibration_min_detections: detections a class needs before it is calibrated.
    """

    def __init__(
        self,
        threshold: float | None = None,
        class_thresholds: dict[str, float] | None = None,
        weight: float | None = None,
        warmup_steps: int = 200,
        warmup_fraction: float | None = None,
        ema_decay: float = 0.999,
        attribute_threshold: float = 0.7,
        mode: PseudoMode = "teacher",
        nms_iou: float = 0.5,
        max_per_image: int = 50,
        expert_iou: float | None = None,
        min_size: float = 2.0,
        min_visibility: float = 0.3,
        pre_nms_topk: int = 1000,
        background_threshold: float | None = None,
        localise: bool = True,
        expert_normaliser: bool = False,
        calibrate_precision: float | None = None,
        calibration_memory: float = 250.0,
        calibration_min_detections: float = 20.0,
    ) -> None:
        if mode not in MODE_DEFAULTS:
            raise ValueError(f"mode must be one of {sorted(MODE_DEFAULTS)}, got {mode!r}")
        if calibrate_precision is not None and mode != "teacher":
            raise ValueError("calibrate_precision needs mode='teacher' (it scores the teacher)")
        self.calibrate_precision = calibrate_precision
        self.calibration_memory = calibration_memory
        self.calibration_min_detections = calibration_min_detections
        self.calibration: RegionCalibration | None = None
        self._pending_calibration: dict[str, Any] | None = None
        if background_threshold is not None and (
            mode != "teacher" or not 0.0 <= background_threshold <= 1.0
        ):
            raise ValueError(
                "background_threshold needs mode='teacher' and a score in [0, 1], got "
                f"{background_threshold!r} with mode={mode!r}"
            )
        self.background_threshold = background_threshold
        self.localise = localise
        self.expert_normaliser = expert_normaliser
        default_threshold, default_weight, default_iou = MODE_DEFAULTS[mode]
        self.mode = mode
        self.threshold = default_threshold if threshold is None else float(threshold)
        self.class_thresholds = dict(class_thresholds or {})
        self.weight = default_weight if weight is None else float(weight)
        self.expert_iou = default_iou if expert_iou is None else float(expert_iou)
        if not 0.0 <= self.threshold <= 1.0 or not all(
            0.0 <= t <= 1.0 for t in self.class_thresholds.values()
        ):
            raise ValueError("pseudo-label thresholds must lie in [0, 1]")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {warmup_fraction}")
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self._run_steps: int | None = None  # the trainer's max_steps, for warmup_fraction
        self.ema_decay = ema_decay
        self.attribute_threshold = attribute_threshold
        self.nms_iou = nms_iou
        self.max_per_image = max_per_image
        self.min_size = min_size
        self.min_visibility = min_visibility
        self.pre_nms_topk = pre_nms_topk
        # "self" keeps score > 0.95 strictly, as the reference does; the teacher keeps >= threshold.
        self.strict = mode == "self"
        self.teacher: AveragedModel | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_step = 0
        self.totals = dict.fromkeys(
            ("num_images", "num_pseudo", "num_correct", "num_hidden", "num_found", "num_missed"), 0
        )

    # ------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if stage == "fit" and getattr(getattr(datamodule, "train_augmentation", None), "mosaic", 0) > 0:
            raise ValueError(
                "PseudoLabeller cannot train on mosaics (data.augmentation mosaic > 0): "
                "pseudo-labels are mapped into the student's view through each image's "
                "transform, which a mosaic image has not got. Set mosaic to 0 in data.augmentation."
            )
        if stage == "fit" and self.mode == "teacher" and hasattr(datamodule, "teacher_view"):
            datamodule.teacher_view = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = list(getattr(pl_module, "class_names", []))
        unknown = sorted(set(self.class_thresholds) - set(names))
        if unknown:
            raise ValueError(f"class_thresholds names unknown classes {unknown}; classes: {names}")
        thresholds = [self.class_thresholds.get(name, self.threshold) for name in names]
        self.thresholds = torch.tensor(thresholds or [self.threshold], device=pl_module.device)
        self.class_names = names
        self._set_thresholds = self.thresholds.clone()  # what calibration falls back to
        if self.calibrate_precision is not None:
            self.calibration = RegionCalibration(
                self.thresholds.numel(), self.calibrate_precision, CALIBRATION_GRID,
                self.calibration_memory, self.calibration_min_detections,
            )
            if self._pending_calibration is not None:  # restored before the fit started
                self.calibration.load_state_dict(self._pending_calibration)
                self._pending_calibration = None
                self.thresholds = self.calibration.thresholds(self._set_thresholds)
        self._last_step = trainer.global_step
        if self.mode == "teacher":
            # A plain attribute of the callback: not a submodule of the LightningModule, so it is
            # in no optimizer param group and outside DDP's gradient synchronisation.
            self.teacher = AveragedModel(
                pl_module.detector,
                multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay),
                use_buffers=True,
            )
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            if self._pending_state is not None:
                self.teacher.load_state_dict(self._pending_state["teacher"])
                self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"totals": dict(self.totals)}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.calibration is not None:
            state["calibration"] = self.calibration.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before `on_fit_start` builds the teacher: apply it there.
        self.totals.update(state_dict.get("totals", {}))
        if "calibration" in state_dict and self.calibrate_precision is not None:
            self._pending_calibration = state_dict["calibration"]  # `on_fit_start` applies it
        if "teacher" in state_dict:
            if self.teacher is not None:
                self.teacher.load_state_dict(state_dict["teacher"])
            else:
                self._pending_state = state_dict

    def active(self, global_step: int) -> bool:
        """Whether pseudo-labels are made at this optimizer step (after the warm-up)."""
        if self.warmup_fraction is None:
            return global_step >= self.warmup_steps
        if self._run_steps is None or self._run_steps < 0:
            raise ValueError("warmup_fraction needs a run with max_steps (or a TimeBudget)")
        return global_step >= self.warmup_fraction * self._run_steps

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.warmup_fraction is not None:
            self._run_steps = int(trainer.max_steps)
        # One EMA update per optimizer step (global_step counts them, also under accumulation).
        if self.teacher is not None and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            if self.active(trainer.global_step) and int(self.teacher.n_averaged) > 0:
                self.teacher.update_parameters(pl_module.detector)

    # ------------------------------------------------------------------------- pseudo-labels
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.warmup_fraction is not None:
            self._run_steps = int(trainer.max_steps)
        if not self.active(trainer.global_step):
            return
        if self.teacher is not None and int(self.teacher.n_averaged) == 0:
            self.teacher.update_parameters(
                pl_module.detector
            )  # the first update copies the student
        # The training precision (e.g. bf16 autocast) for the extra forward pass too.
        with trainer.precision_plugin.forward_context():
            stats = self.add_pseudo_labels(batch, pl_module)
        batch_size = batch["image"].shape[0]
        self.totals["num_images"] += batch_size
        pl_module.log(
            "train/pseudo_per_image",
            stats["num_pseudo"].float() / batch_size,
            batch_size=batch_size,
        )
        if self.calibration is not None:
            for name, value in zip(self.class_names, self.thresholds.tolist(), strict=False):
                pl_module.log(f"train/pseudo_threshold/{name}", value, batch_size=batch_size)
        for key in ("num_pseudo", "num_correct", "num_hidden", "num_found", "num_missed"):
            self.totals[key] += int(stats.get(key, 0))
        if "num_correct" in stats and int(stats["num_pseudo"]) > 0:
            precision = stats["num_correct"].float() / stats["num_pseudo"].float()
            pl_module.log("train/pseudo_precision", precision, batch_size=batch_size)
        if "num_found" in stats and int(stats["num_hidden"]) > 0:
            recall = stats["num_found"].float() / stats["num_hidden"].float()
            pl_module.log("train/pseudo_recall", recall, batch_size=batch_size)
        if "num_missed" in stats and int(stats["num_hidden"]) > 0:
            missed = stats["num_missed"].float() / stats["num_hidden"].float()
            pl_module.log("train/pseudo_background_miss", missed, batch_size=batch_size)

    def summary(self) -> dict[str, float]:
        """Totals over the run: pseudo-labels per image, precision and recall (NaN when unknown)."""
        t = self.totals
        nan = float("nan")
        return {
            "pseudo_per_image": t["num_pseudo"] / t["num_images"] if t["num_images"] else nan,
            "pseudo_precision": t["num_correct"] / t["num_pseudo"]
            if t["num_pseudo"] and t["num_hidden"]
            else nan,
            "pseudo_recall": t["num_found"] / t["num_hidden"] if t["num_hidden"] else nan,
            "background_miss": t["num_missed"] / t["num_hidden"]
            if t["num_hidden"] and self.background_threshold is not None
            else nan,
        }

    @torch.no_grad()
    def detections(
        self, batch: dict[str, Any], pl_module: L.LightningModule
    ) -> tuple[list[dict[str, Tensor]], str]:
        """Raw detections of the teacher (weak view) or of the student (own view).

        Returns:
            Per-image detection dicts (`postprocess`) and the batch-key prefix of the view they
            are in (``"teacher_"`` or ``""``).
        """
        if self.mode == "teacher":
            if "teacher_image" not in batch:
                raise KeyError(
                    "PseudoLabeller(mode='teacher') needs batch['teacher_image']: use LldDataModule "
                    "(its teacher_view is switched on by this callback) or add the weak view yourself"
                )
            model, prefix = self.teacher.module, "teacher_"
        else:
            model, prefix = pl_module.detector, ""
        was_training = model.training
        model.eval()  # running BN statistics, and the student's are not disturbed
        lowest = float(self.thresholds.min())
        if self.calibration is not None:  # scores the whole grid inside the regions
            lowest = min(lowest, self.calibration.grid[0])
        if self.background_threshold is not None:
            lowest = min(lowest, self.background_threshold)
        try:
            images = batch[f"{prefix}image"]
            # The detector's own path: with a region read-out, classes and attributes come from it.
            preds = model.detections(
                model(images),
                score_threshold=max(0.0, lowest - 1e-6) if not self.strict else lowest,
                pre_nms_topk=self.pre_nms_topk,
                nms_iou=self.nms_iou,
                max_detections=int(getattr(pl_module.hparams, "max_detections", 100)),
                image_size=tuple(images.shape[-2:]),
            )
        finally:
            model.train(was_training)
        return preds, prefix

    @torch.no_grad()
    def add_pseudo_labels(
        self, batch: dict[str, Any], pl_module: L.LightningModule
    ) -> dict[str, Tensor]:
        """Append pseudo-labels to ``batch`` in place; returns counts for logging.

        Reads ``boxes``/``labels``/``attributes``/``regions``/``region_valid``/``transform`` of
        the student's view, and the ``teacher_*`` keys of the weak view in teacher mode. Writes
        ``boxes [B, M+K, 4]``, ``labels [B, M+K]``, ``attributes [B, M+K, A]`` and
        ``weights [B, M+K]`` (expert cells keep their weight, pseudo-labels get ``weight``,
        padding 0).

        Returns:
            ``num_pseudo`` and, when the batch has ``hidden_boxes``, ``num_correct``,
            ``num_hidden`` and ``num_found`` (see `pseudo_label_quality`).
        """
        preds, prefix = self.detections(batch, pl_module)
        if self.calibration is not None:
            self.calibrate(batch, preds, prefix, pl_module)
        return self.select_and_append(batch, preds, prefix)

    @torch.no_grad()
    def calibrate(
        self,
        batch: dict[str, Any],
        preds: list[dict[str, Tensor]],
        prefix: str,
        pl_module: L.LightningModule,
    ) -> None:
        """Score the detections inside the labelled regions (after the class-agnostic NMS that
        the pseudo-labels get) against the expert cells, update `RegionCalibration` (summed over
        DDP ranks, so every rank keeps the same thresholds) and set ``self.thresholds``."""
        assert self.calibration is not None
        labels, real = batch[f"{prefix}labels"], batch[f"{prefix}labels"] != IGNORE_INDEX
        targets = [
            {"boxes": batch[f"{prefix}boxes"][i][real[i]].float(), "labels": labels[i][real[i]],
             "regions": batch[f"{prefix}regions"][i][batch[f"{prefix}region_valid"][i]].float()}
            for i in range(len(preds))
        ]
        counts = region_counts(
            one_class_per_cell(preds, self.nms_iou), targets, self.calibration.grid,
            self.thresholds.numel(),
        )
        detections, correct = counts["detections"], counts["correct"]
        trainer = pl_module._trainer
        if trainer is not None and trainer.world_size > 1:
            both = trainer.strategy.reduce(
                torch.stack([detections, correct]).to(pl_module.device), reduce_op="sum"
            )
            detections, correct = both[0], both[1]
        self.calibration.update(detections, correct)
        self.thresholds = self.calibration.thresholds(self._set_thresholds)

    def select_and_append(
        self, batch: dict[str, Any], preds: list[dict[str, Tensor]], prefix: str
    ) -> dict[str, Tensor]:
        """The filtering and appending half of `add_pseudo_labels` (detections given)."""
        batch_size = batch["image"].shape[0]
        device = batch["boxes"].device
        counts = torch.tensor([int(p["boxes"].shape[0]) for p in preds], device=device)
        image_index = torch.repeat_interleave(
            torch.arange(batch_size, device=device), counts
        )  # [N]
        boxes = torch.cat([p["boxes"] for p in preds]).float()  # [N, 4], in the detector's view
        scores = torch.cat([p["scores"] for p in preds]).float()
        labels = torch.cat([p["labels"] for p in preds])
        attributes = torch.cat([p["attributes"] for p in preds])  # [N, A]
        attribute_scores = torch.cat([p["attribute_scores"] for p in preds])

        unsure = (
            scores >= self.background_threshold
            if self.background_threshold is not None
            else torch.zeros_like(scores, dtype=torch.bool)
        )
        thresholds = self.thresholds.to(device)[labels.clamp(max=self.thresholds.numel() - 1)]
        keep = scores > thresholds if self.strict else scores >= thresholds
        # One class per cell: class-agnostic NMS inside each image.
        kept = batched_nms(boxes[keep], scores[keep], image_index[keep], self.nms_iou)
        index = keep.nonzero(as_tuple=True)[0][kept]
        index = index[
            torch.sort(image_index[index], stable=True).indices
        ]  # by image, score order kept

        # Filters in the detector's own view, where the expert boxes and regions are exact.
        expert_boxes = batch[f"{prefix}boxes"].float()  # [B, M, 4]
        expert_real = batch[f"{prefix}labels"] != IGNORE_INDEX  # [B, M]
        box, img = boxes[index], image_index[index]
        keep = torch.ones_like(img, dtype=torch.bool)
        if expert_boxes.shape[1] > 0:
            overlap = paired_iou(box, expert_boxes[img]) * expert_real[img]  # [n, M]
            keep &= ~(overlap > self.expert_iou).any(dim=1)
        if self.mode == "teacher":
            # Inside an annotated region the expert labelled everything: only expert labels count.
            regions = batch[f"{prefix}regions"].float()
            keep &= ~points_in_boxes(
                box_centres(box), regions[img], batch[f"{prefix}region_valid"][img]
            )
        index = index[keep]

        # Into the student's view: clip to its content, drop what is barely visible there.
        student_transform = batch["transform"].float()
        if prefix:
            to_student = (
                student_transform @ torch.linalg.inv(batch[f"{prefix}transform"].double()).float()
            )
        else:  # the detections were made on the student's own view
            to_student = torch.eye(3, device=device).expand(batch_size, 3, 3)
        img = image_index[index]
        moved = transform_boxes(boxes[index][:, None], to_student[img])[:, 0]  # [n, 4]
        output_size = int(batch["image"].shape[-1])
        bounds = content_boxes(
            batch["image_size"].to(device), student_transform, output_size
        )  # [B, 4]
        clipped = clip_boxes(moved[:, None], bounds[img])[:, 0]
        full_area = (moved[:, 2:] - moved[:, :2]).clamp(min=0).prod(dim=1)
        size = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0)  # [n, 2]
        visible = (
            (size.prod(dim=1) >= self.min_visibility * full_area)
            & (size >= self.min_size).all(dim=1)
            & (full_area > 0)
        )
        index, clipped = index[visible], clipped[visible]
        img = image_index[index]
        # Highest scores first inside each image (index is sorted that way): cap the count.
        per_image = torch.bincount(img, minlength=batch_size)
        rank = torch.arange(img.numel(), device=device) - (per_image.cumsum(0) - per_image)[img]
        capped = rank < self.max_per_image
        index, clipped, img = index[capped], clipped[capped], img[capped]

        confident = attribute_scores[index] >= self.attribute_threshold
        if not self.localise:
            confident = torch.zeros_like(confident)
        pseudo_attributes = torch.where(confident, attributes[index], IGNORE_INDEX)
        packed = pack_per_image(
            {"boxes": clipped, "labels": labels[index], "attributes": pseudo_attributes},
            img,
            batch_size,
        )
        valid = packed["valid"]
        weights = batch.get("weights")
        if weights is None:
            weights = (batch["labels"] != IGNORE_INDEX).float()
        batch["boxes"] = torch.cat([batch["boxes"].float(), packed["boxes"]], dim=1)
        batch["labels"] = torch.cat(
            [batch["labels"], torch.where(valid, packed["labels"], IGNORE_INDEX)], dim=1
        )
        batch["attributes"] = torch.cat(
            [
                batch["attributes"],
                torch.where(valid[..., None], packed["attributes"], IGNORE_INDEX),
            ],
            dim=1,
        )
        batch["weights"] = torch.cat([weights.float(), valid.float() * self.weight], dim=1)
        box_weights = batch.get("box_weights", weights)
        box_weight = self.weight if self.localise else 0.0
        batch["box_weights"] = torch.cat([box_weights.float(), valid.float() * box_weight], dim=1)
        if self.expert_normaliser:
            counted = batch.get("normaliser_weights", torch.ones_like(weights))
            batch["normaliser_weights"] = torch.cat(
                [counted.float(), torch.zeros_like(valid, dtype=torch.float32)], dim=1
            )

        stats = {"num_pseudo": torch.tensor(int(index.numel()))}
        if self.background_threshold is not None:
            # Only unsure boxes outside the expert regions: inside, the expert labelled everything.
            unsure_boxes, unsure_image = boxes[unsure], image_index[unsure]  # image-major
            outside = ~points_in_boxes(
                box_centres(unsure_boxes),
                batch[f"{prefix}regions"].float()[unsure_image],
                batch[f"{prefix}region_valid"][unsure_image],
            )
            unsure_boxes, unsure_image = unsure_boxes[outside], unsure_image[outside]
            self._background(batch, unsure_boxes, unsure_image, to_student, bounds)
        if "hidden_boxes" in batch:
            stats.update(self._quality(batch, boxes[index], labels[index], img, prefix))
            if self.background_threshold is not None:
                stats["num_missed"] = self._missed(batch, unsure_boxes, unsure_image, prefix)
        return stats

    def _background(
        self,
        batch: dict[str, Any],
        boxes: Tensor,
        image_index: Tensor,
        to_student: Tensor,
        bounds: Tensor,
    ) -> None:
        """Make the student's whole field a region and the teacher's unsure boxes ignore boxes.

        Args:
            boxes: ``[n, 4]`` teacher detections outside the expert regions scoring at least
                ``background_threshold``, in the teacher's view; ``image_index`` ``[n]`` their
                image, sorted (image-major).
            to_student: ``[B, 3, 3]`` teacher view -> student view.
            bounds: ``[B, 4]`` the image content in the student's view.
        """
        batch_size = batch["image"].shape[0]
        moved = transform_boxes(boxes[:, None], to_student[image_index])[:, 0]
        clipped = clip_boxes(moved[:, None], bounds[image_index])[:, 0]
        packed = pack_per_image({"boxes": clipped}, image_index, batch_size)
        old_boxes = batch.get("ignore_boxes")
        if old_boxes is None:
            old_boxes = clipped.new_zeros((batch_size, 0, 4))
            old_valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=clipped.device)
        else:
            old_valid = batch["ignore_valid"]
        batch["ignore_boxes"] = torch.cat([old_boxes.float(), packed["boxes"]], dim=1)
        batch["ignore_valid"] = torch.cat([old_valid, packed["valid"]], dim=1)
        # The whole content of the student's view is now annotated (background unless ignored).
        batch["regions"] = torch.cat([batch["regions"].float(), bounds[:, None].float()], dim=1)
        batch["region_valid"] = torch.cat(
            [batch["region_valid"], torch.ones_like(batch["region_valid"][:, :1])], dim=1
        )

    def _missed(
        self, batch: dict[str, Any], boxes: Tensor, image_index: Tensor, prefix: str
    ) -> Tensor:
        """Hidden cells outside the regions whose centre no ignore box covers (``boxes``: the
        unsure teacher boxes outside the regions, teacher's view, image-major).

        Those are learnt as background under ``background_threshold``. Counted in the
        teacher's view over the same hidden cells as ``num_hidden``.
        """
        batch_size, num_hidden = batch["hidden_labels"].shape
        centres, outside = self._hidden_outside(batch, prefix)  # [B * H, 2], [B, H]
        packed = pack_per_image({"boxes": boxes}, image_index, batch_size)
        covered = points_in_boxes(
            centres,
            packed["boxes"].repeat_interleave(num_hidden, dim=0),
            packed["valid"].repeat_interleave(num_hidden, dim=0),
        ).reshape(batch_size, num_hidden)
        return (outside & ~covered).sum().cpu()

    def _hidden_outside(self, batch: dict[str, Any], prefix: str) -> tuple[Tensor, Tensor]:
        """Centres ``[B * H, 2]`` of the hidden cells in the detector's view, and which of them
        the pseudo-labeller may find ``[B, H]``: real, outside every region, inside the view."""
        view_transform = batch[f"{prefix}transform"].float()
        hidden_boxes = batch["hidden_boxes"].float()  # [B, H, 4], original pixels
        hidden_labels = batch["hidden_labels"]
        hidden_in_view = box_centres(transform_boxes(hidden_boxes, view_transform))  # [B, H, 2]
        batch_size, num_hidden = hidden_labels.shape
        flat_points = hidden_in_view.reshape(-1, 2)
        regions = batch[f"{prefix}regions"].float().repeat_interleave(num_hidden, dim=0)
        region_valid = batch[f"{prefix}region_valid"].repeat_interleave(num_hidden, dim=0)
        inside_region = points_in_boxes(flat_points, regions, region_valid).reshape(
            batch_size, num_hidden
        )
        output_size = int(batch[f"{prefix}image"].shape[-1])
        bounds = content_boxes(
            batch["image_size"].to(view_transform.device), view_transform, output_size
        )
        in_view = points_in_boxes(
            flat_points,
            bounds.repeat_interleave(num_hidden, dim=0)[:, None],
            torch.ones_like(region_valid[:, :1]),
        ).reshape(batch_size, num_hidden)
        return flat_points, (hidden_labels != IGNORE_INDEX) & ~inside_region & in_view

    def _quality(
        self, batch: dict[str, Any], boxes: Tensor, labels: Tensor, image_index: Tensor, prefix: str
    ) -> dict[str, Tensor]:
        """Precision/recall of kept pseudo-labels (``boxes`` in the detector's view, unclipped)."""
        view_transform = batch[f"{prefix}transform"].float()
        original = invert_boxes(boxes[:, None], view_transform[image_index])[:, 0]  # [n, 4]
        _, outside = self._hidden_outside(batch, prefix)
        return pseudo_label_quality(
            original, labels, image_index, batch["hidden_boxes"].float(), batch["hidden_labels"],
            outside,
        )
