"""Export a trained checkpoint to ONNX or TorchScript, and run the exported model.

``python -m lld_lightning.tools.export --ckpt_path C --format onnx`` writes ``C``'s detector, its
post-processing and its region read-out as ONE graph (`DetectionGraph`), plus a metadata JSON
beside it (`metadata_path`):

- input ``images``: float32 ``[B, 3, S, S]`` RGB in ``[0, 1]``, letterboxed as evaluation does
  (top-left, scaled by ``S / max(h, w)``, the rest filled with the metadata's ``fill``);
  normalisation is inside the graph;
- outputs, ``N`` = the detections of the whole batch, image-major, highest score first inside an
  image: ``boxes [N, 4]`` float32 xyxy in input pixels, ``scores [N]`` float32, ``classes [N]``
  int64, ``attributes [N, A]`` int64 (value index per attribute, metadata order),
  ``attribute_scores [N, A]`` float32 (its probability), ``batch_index [N]`` int64.

Inside the graph: normalisation, backbone, FPN, dense head, score, top-k, box decoding, clipping,
threshold, class-agnostic NMS (ONNX ``NonMaxSuppression``), the per-image cap, the containment
filter, the region read-out (``RoiAlign`` over the finest pyramid level and over the pixels) and
its re-scoring: the detections of `LldModule.detect`. Beside it: the letterbox (input) and the
mapping of boxes back to original pixels (`lld_lightning.predictor.Predictor` does both), and
`split_detections` (one dict per image from ``batch_index``). The post-processing settings are
fixed at export time (metadata ``postprocess``).

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``), where torchvision
registers ``nms`` and ``roi_align``; ``torch.export`` (``dynamo=True``, torch 2.14) stops at
torchvision's ``batched_nms``, which branches on the data-dependent number of boxes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision  # noqa: F401 (registers torchvision's ops before a TorchScript file loads)
from torch import Tensor, nn
from torchvision.ops import roi_align

from lld_lightning.boxes import grow_boxes, nms
from lld_lightning.models import Detector, PostProcess
from lld_lightning.models.box_coding import decode_boxes
from lld_lightning.models.postprocess import Detections, detection_scores
from lld_lightning.models.roi_head import RoiHead, box_size_features

Format = Literal["onnx", "torchscript"]

#: Output names of the exported graph, in order.
OUTPUT_NAMES: tuple[str, ...] = (
    "boxes",
    "scores",
    "classes",
    "attributes",
    "attribute_scores",
    "batch_index",
)
#: File suffix of each format.
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".torchscript"}
#: ONNX opset: 16 is the first with RoiAlign's half-pixel (``aligned=True``) coordinates.
DEFAULT_OPSET: int = 17
#: Images in the batch traced at export (not 1, so that no size-1 broadcast is baked in).
_TRACE_BATCH: int = 2

_OUTPUT_DOC: dict[str, str] = {
    "boxes": "float32 [N, 4] xyxy in input (letterboxed) pixels",
    "scores": "float32 [N] detection score",
    "classes": "int64 [N] class index (class_names)",
    "attributes": "int64 [N, A] value index per attribute (attributes, in order)",
    "attribute_scores": "float32 [N, A] probability of that value",
    "batch_index": "int64 [N] image of the batch; rows are image-major, best score first",
}


class ExportError(RuntimeError):
    """An export or an exported model cannot run (one line, for the command to print)."""


# ------------------------------------------------------------------------------------ graph
def _positions(values: Tensor) -> Tensor:
    """int64 ``[N]`` ``0 .. N - 1`` built from a tensor, so a trace keeps ``N`` dynamic."""
    return torch.ones_like(values, dtype=torch.int64).cumsum(0) - 1


def read_boxes(
    head: RoiHead,
    features: list[Tensor],
    boxes: Tensor,
    image_index: Tensor,
    normalised: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """`RoiHead.forward` on one flat box list with each box's image index (traceable: no
    per-image Python list, so the batch size stays dynamic in the graph).

    Args:
        head: the detector's region read-out.
        features: its pyramid levels, finest first.
        boxes: float ``[N, 4]`` xyxy input pixels.
        image_index: int64 ``[N]``.
        normalised: the detector's normalised input ``[B, 3, S, S]`` (the pixel crops).

    Returns:
        ``cls_logits [N, C]`` and the attribute logits ``[N, K]`` in ``head.attr_preds`` order.
    """
    index = image_index.to(boxes.dtype)[:, None]  # [N, 1]
    cell = roi_align(
        features[0],
        torch.cat([index, grow_boxes(boxes, head.context)], dim=1),
        output_size=head.pool_size,
        spatial_scale=1.0 / head.stride,
        sampling_ratio=2,
        aligned=True,
    ).to(features[0].dtype)  # [N, C, pool, pool]
    size = box_size_features(boxes, head.stride).to(cell.dtype)
    hidden = head.fc(torch.cat([head.convs(cell).flatten(1), size], dim=1))
    attr_hidden = hidden
    if head.crop_encoder is not None:
        encoder = head.crop_encoder
        crops = roi_align(
            normalised.float(),
            torch.cat([index, grow_boxes(boxes, encoder.context)], dim=1),
            output_size=encoder.crop_size,
            spatial_scale=1.0,
            sampling_ratio=2,
            aligned=True,
        ).to(normalised.dtype)  # [N, 3, crop, crop]
        attr_hidden = torch.cat([attr_hidden, encoder.encode(crops).to(hidden.dtype)], dim=1)
        if head.class_crop_encoder is not None:
            class_crops = head.class_crop_encoder.encode(crops).to(hidden.dtype)
            hidden = torch.cat([hidden, class_crops], dim=1)
    return (
        head.cls_pred(hidden).float(),
        [predictor(attr_hidden).float() for predictor in head.attr_preds.values()],
    )


def _best_values(logits: list[Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax int64 ``[N, A]`` and its softmax probability ``[N, A]`` of ``[N, K]`` logits;
    ``[N, 0]`` without attributes (``boxes [N, 4]`` gives ``N``)."""
    if not logits:
        empty = boxes[:, :0]
        return empty.long(), empty.float()
    best = [values.float().softmax(dim=-1).max(dim=-1) for values in logits]
    return (
        torch.stack([value for _, value in best], dim=1),
        torch.stack([probability for probability, _ in best], dim=1),
    )


class DetectionGraph(nn.Module):
    """`LldModule.detect` as one traceable graph (what is exported).

    Every step of `Detector.detections` with ``one_per_cell=True`` (`postprocess` with
    class-agnostic NMS, then `apply_readout` with one class per box), written without Python
    values read from data so that a trace keeps the batch size and detection counts dynamic.

    Args:
        detector: the trained detector (eval mode).
        settings: its post-processing settings (fixed in the graph).
    """

    def __init__(self, detector: Detector, settings: PostProcess) -> None:
        super().__init__()
        self.detector = detector
        self.settings = settings

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """Detect.

        Args:
            images: float ``[B, 3, S, S]`` in ``[0, 1]``, letterboxed.

        Returns:
            The tensors of `OUTPUT_NAMES`, in that order.
        """
        s = self.settings
        outputs = self.detector(images)
        height, width = float(images.shape[-2]), float(images.shape[-1])

        # Dense proposals: each location's best class, the top-k locations per image.
        scores = detection_scores(
            outputs["cls_logits"], outputs["quality_logits"], s.quality_weight
        )
        best_scores, best_labels = scores.max(dim=-1)  # [B, P]
        num_points = best_scores.shape[1]
        k = min(s.pre_nms_topk, num_points)
        top_scores, top_point = best_scores.topk(k, dim=1)  # [B, k]
        top_labels = best_labels.gather(1, top_point)
        deltas = outputs["box_deltas"].float().gather(1, top_point[..., None].expand(-1, -1, 4))
        boxes = decode_boxes(outputs["points"][top_point], outputs["strides"][top_point], deltas)
        xs = boxes[..., 0::2].clamp(min=0.0).clamp(max=width)
        ys = boxes[..., 1::2].clamp(min=0.0).clamp(max=height)
        boxes = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)  # [B, k, 4]
        image_ids = _positions(top_scores[:, 0])  # [B]
        image = image_ids[:, None].expand_as(top_point).reshape(-1)  # [B * k]
        boxes, top_scores = boxes.reshape(-1, 4), top_scores.reshape(-1)
        has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        selected = ((top_scores > s.score_threshold) & has_area).nonzero()[:, 0]  # [M]
        boxes, top_scores, image = boxes[selected], top_scores[selected], image[selected]
        point = top_point.reshape(-1)[selected]
        labels = top_labels.reshape(-1)[selected]

        # One box per cell: NMS inside each image, at most max_detections per image.
        kept = nms(boxes, top_scores, s.nms_iou, image)  # best score first
        one_hot = (image[kept][:, None] == image_ids[None, :]).long()  # [K, B]
        rank = (one_hot.cumsum(0) * one_hot).sum(dim=1) - 1  # rank inside its image
        kept = kept[rank < s.max_detections]
        if s.max_containment is not None:
            kept = kept[~self._contained(boxes[kept], image[kept], s.max_containment)]
        boxes, top_scores, image = boxes[kept], top_scores[kept], image[kept]
        point, labels = point[kept], labels[kept]

        head = self.detector.roi_head
        if head is None:
            flat = image * num_points + point  # [N] row of the [B * P, K] attribute logits
            attr_logits = [
                logits.reshape(-1, logits.shape[-1])[flat]
                for logits in outputs["attr_logits"].values()
            ]
            classes, final_scores = labels, top_scores
        else:
            # One extra box, dropped again below: onnxruntime cannot reshape the zero-row maps of
            # an image without detections inside the read-out's GroupNorm.
            extra = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=boxes.dtype, device=boxes.device)
            padded_boxes = torch.cat([boxes, extra])  # [N + 1, 4]
            padded_image = torch.cat([image, image_ids[:1]])
            cls_logits, attr_logits = read_boxes(
                head,
                outputs["roi_features"],
                padded_boxes,
                padded_image,
                self.detector.normalise(images),
            )
            cls_logits, attr_logits = cls_logits[:-1], [logits[:-1] for logits in attr_logits]
            class_probability, classes = cls_logits.softmax(dim=-1).topk(1, dim=1)
            classes = classes[:, 0]
            final_scores = top_scores * class_probability[:, 0]
        attributes, attribute_scores = _best_values(attr_logits, boxes)

        # Image-major, best score first: scores lie in [0, 1], so image + (1 - score) orders
        # both at once (float64 keeps float32 score differences apart).
        order = (image.double() * 2.0 + 1.0 - final_scores.double()).argsort()
        return (
            boxes[order],
            final_scores[order],
            classes[order],
            attributes[order],
            attribute_scores[order],
            image[order],
        )

    @staticmethod
    def _contained(boxes: Tensor, groups: Tensor, threshold: float) -> Tensor:
        """`lld_lightning.models.postprocess._contained` with the earlier-box mask built from
        positions (traceable): bool ``[N]``."""
        top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
        bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # [N, N]
        area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=-1)  # [N]
        inside = inter / area.clamp(min=1e-6)[:, None]
        position = _positions(groups)
        earlier = position[None, :] < position[:, None]  # column j comes before row i
        same_group = groups[:, None] == groups[None, :]
        return ((inside > threshold) & earlier & same_group).any(dim=1)


def split_detections(outputs: Sequence[Any], batch_size: int) -> list[Detections]:
    """The exported graph's flat outputs -> one dict per image, as `LldModule.detect` returns.

    Args:
        outputs: the tensors (or numpy arrays) of `OUTPUT_NAMES`, in order.
        batch_size: ``B`` of the input.

    Returns:
        Per image: ``boxes [n, 4]``, ``scores [n]``, ``labels [n]``, ``attributes [n, A]``,
        ``attribute_scores [n, A]`` (torch tensors, best score first).
    """
    values = dict(zip(OUTPUT_NAMES, (torch.as_tensor(np.asarray(o)) for o in outputs), strict=True))
    counts = torch.bincount(values["batch_index"], minlength=batch_size).tolist()
    if len(counts) != batch_size:
        raise ExportError(f"detections name image {len(counts) - 1} of a batch of {batch_size}")
    keys = {
        "boxes": "boxes",
        "scores": "scores",
        "labels": "classes",
        "attributes": "attributes",
        "attribute_scores": "attribute_scores",
    }
    parts = {key: values[name].split(counts) for key, name in keys.items()}
    return [{key: part[i] for key, part in parts.items()} for i in range(batch_size)]


# ----------------------------------------------------------------------------------- export
def metadata_path(model_path: str | Path) -> Path:
    """Where the metadata of an exported model lives: ``<model file>.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def package_version() -> str:
    """The installed lld-lightning version (``unknown`` from a source tree that is not)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lld-lightning")
    except PackageNotFoundError:
        return "unknown"


def export_module(
    module: Any,
    out: str | Path,
    format: Format = "onnx",
    image_size: int = 640,
    fill: float = 0.5,
    value_names: dict[str, list[str]] | None = None,
    opset: int = DEFAULT_OPSET,
    source: str | None = None,
    working_pixel_size: float | None = None,
) -> Path:
    """Export an `LldModule` (its detector, post-processing and read-out) and write the metadata.

    Args:
        module: the trained `LldModule`.
        out: the model file to write (its metadata goes to `metadata_path`).
        format: ``onnx`` or ``torchscript``.
        image_size: side ``S`` of the square input (the letterbox size of evaluation).
        fill: grey level of the letterbox outside the image (recorded for the runtime).
        value_names: names of each attribute's values (default: the value indices).
        opset: ONNX opset.
        source: the checkpoint it came from (recorded).
        working_pixel_size: micrometres per pixel the model works at (recorded: the runtime
            resamples images to it instead of letterboxing them); None = it letterboxes.

    Returns:
        The model file.
    """
    if format not in SUFFIXES:
        raise ExportError(f"format must be one of {sorted(SUFFIXES)}, got {format!r}")
    if image_size < 32:
        raise ExportError(f"image_size must be at least 32 pixels, got {image_size}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    detector = module.detector
    was_training = detector.training
    graph = DetectionGraph(detector.eval(), module.settings).eval()
    # Any fixed images trace the same graph: no branch below depends on their values.
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((_TRACE_BATCH, 3, image_size, image_size), generator=generator)
    example = example.to(next(detector.parameters()).device)
    try:
        with warnings.catch_warnings():
            # The trace reports each shape it reads as a constant; S is fixed by design.
            warnings.simplefilter("ignore")
            if format == "onnx":
                _export_onnx(graph, example, out, opset)
            else:
                with torch.no_grad():
                    traced = torch.jit.trace(graph, example, check_trace=False)
                torch.jit.save(traced, str(out))
    finally:
        detector.train(was_training)
    attribute_spec = dict(module.attribute_spec)
    names = value_names or {n: [str(i) for i in range(k)] for n, k in attribute_spec.items()}
    metadata = {
        "format": format,
        "lld_lightning": package_version(),
        "torch": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": source,
        "image_size": image_size,
        "input": {
            "name": "images",
            "shape": ["batch", 3, image_size, image_size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "normalisation": "inside the model",
        },
        "letterbox": {
            "scale": "image_size / max(height, width)"
            if working_pixel_size is None
            else "pixel_size_um / working_pixel_size_um (the image's own pixel size)",
            "anchor": "top-left",
            "fill": fill,
        },
        "working_pixel_size_um": working_pixel_size,
        "outputs": {name: _OUTPUT_DOC[name] for name in OUTPUT_NAMES},
        "class_names": list(module.class_names),
        "attributes": {name: list(names[name]) for name in attribute_spec},
        "readout": detector.roi_head is not None,
        "postprocess": {k: v for k, v in vars(module.settings).items() if k != "classes_per_box"},
    }
    if format == "onnx":
        metadata["opset"] = opset
    metadata_path(out).write_text(json.dumps(metadata, indent=1) + "\n")
    return out


def _export_onnx(graph: DetectionGraph, example: Tensor, out: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401 (torch's exporter writes the file with it)
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx package: pip install 'lld-lightning[export]'"
        ) from None
    dynamic = {"images": {0: "batch"}}
    dynamic.update({name: {0: "detections"} for name in OUTPUT_NAMES})
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
        )


def export_checkpoint(
    ckpt_path: str | Path,
    format: Format = "onnx",
    out: str | Path | None = None,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a checkpoint (`export_module`); ``out`` defaults to the checkpoint's path with
    the format's suffix, ``image_size`` to the checkpoint's data ``image_size``."""
    from lld_lightning.predictor import load_checkpoint

    loaded = load_checkpoint(ckpt_path)
    out = Path(out) if out is not None else Path(ckpt_path).with_suffix(SUFFIXES[format])
    return export_module(
        loaded.module,
        out,
        format=format,
        image_size=image_size or loaded.image_size,
        fill=loaded.fill,
        value_names=loaded.value_names,
        opset=opset,
        source=str(ckpt_path),
        working_pixel_size=loaded.working_pixel_size,
    )


# ---------------------------------------------------------------------------------- runtime
class ExportedModel:
    """An exported model and its metadata: letterboxed images in, per-image detections out.

    ONNX files run in onnxruntime (``pip install 'lld-lightning[export]'``), TorchScript files in
    ``torch.jit``.

    Args:
        path: the ``.onnx`` or ``.torchscript`` file (its metadata JSON beside it).
        device: where a TorchScript model runs (ONNX runs on onnxruntime's CPU provider unless
            ``providers`` says otherwise).
        threads: onnxruntime intra-op threads (default: torch's thread count, so the two
            runtimes compare on the same cores).
        providers: onnxruntime execution providers.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no exported model there")
        meta_file = metadata_path(self.path)
        if not meta_file.is_file():
            raise ExportError(f"{self.path}: its metadata {meta_file.name} is missing beside it")
        try:
            self.metadata: dict[str, Any] = json.loads(meta_file.read_text())
        except json.JSONDecodeError as error:
            raise ExportError(f"{meta_file}: not JSON ({error})") from None
        self.format: str = self.metadata["format"]
        self.device = torch.device(device)
        if self.format == "onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ExportError(
                    "running an ONNX model needs onnxruntime: pip install 'lld-lightning[export]'"
                ) from None
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads or torch.get_num_threads()
            self._session = onnxruntime.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
            self.device = torch.device("cpu")
        elif self.format == "torchscript":
            self._module = torch.jit.load(str(self.path), map_location=self.device).eval()
        else:
            raise ExportError(f"{meta_file}: unknown format {self.format!r}")

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square input."""
        return int(self.metadata["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def value_names(self) -> dict[str, list[str]]:
        """``{attribute: [value names]}`` in the order of the ``attributes`` columns."""
        return {name: list(values) for name, values in self.metadata["attributes"].items()}

    @property
    def fill(self) -> float:
        """Grey level of the letterbox outside the image."""
        return float(self.metadata["letterbox"]["fill"])

    def run(self, images: Tensor | np.ndarray) -> list[np.ndarray]:
        """The graph's raw outputs (`OUTPUT_NAMES` order) for float ``[B, 3, S, S]`` images."""
        shape = tuple(images.shape)
        size = self.image_size
        if len(shape) != 4 or shape[1:] != (3, size, size):
            raise ExportError(
                f"{self.path.name}: expected images [B, 3, {size}, {size}], got {list(shape)}"
            )
        if self.format == "onnx":
            array = images.detach().cpu().numpy() if isinstance(images, Tensor) else images
            return self._session.run(
                None, {"images": np.ascontiguousarray(array, dtype=np.float32)}
            )
        tensor = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        with torch.inference_mode():
            return [o.cpu().numpy() for o in self._module(tensor)]

    def detect(self, images: Tensor | np.ndarray) -> list[Detections]:
        """Per-image detections, as `LldModule.detect` gives them (`split_detections`)."""
        return split_detections(self.run(images), int(images.shape[0]))

    __call__ = detect


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lld export",
        description="Export a checkpoint's detector, post-processing and region read-out as one "
        "ONNX or TorchScript graph (letterboxed float images in, detections out), with a "
        "metadata JSON beside it (docs/export.md).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to export")
    parser.add_argument(
        "--format", choices=sorted(SUFFIXES), default="onnx", help="onnx (default) or torchscript"
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="square input side (default: the checkpoint's data image_size)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="model file to write (default: the checkpoint's path with .onnx or .torchscript)",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``lld export``: write the model and its metadata; 0 on success, 2 with one line on error."""
    args = parse_args(argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        print(f"lld export: no checkpoint at {ckpt}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        out = export_checkpoint(ckpt, args.format, args.out, args.image_size, args.opset)
    except (ExportError, OSError, KeyError, ValueError) as error:
        print(f"lld export: {ckpt}: {error}", file=sys.stderr)
        return 2
    print(
        f"lld export: {args.format} model -> {out} (metadata {metadata_path(out).name}, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
