"""`lld export`: ONNX (onnxruntime on the CPU) and TorchScript give `LldModule.detect`'s detections."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lld_lightning.constants import LLD_ATTRIBUTE_VALUES
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.models import Detector, Readout
from lld_lightning.models.postprocess import detection_scores
from lld_lightning.module import LldModule
from lld_lightning.predictor import load_checkpoint
from lld_lightning.tools.export import (
    OUTPUT_NAMES,
    SUFFIXES,
    ExportedModel,
    ExportError,
    export_checkpoint,
    export_module,
    main,
    metadata_path,
    split_detections,
)

pytest.importorskip("onnxruntime", reason="the export extra (pip install -e '.[export]')")

#: The evaluation letterbox of the tiny checkpoint.
IMAGE_SIZE = 128


def make_tiny_checkpoint(path: Path, data_root: Path, image_size: int = IMAGE_SIZE) -> Path:
    """``configs/tiny.yaml``'s detector, saved as ``Trainer.save_checkpoint`` saves it (model and
    data hyperparameters, state dict), with every weight perturbed and the heads pushed so that
    cells score above ``lld predict``'s 0.3, boxes differ in size (NMS and containment act) and
    the read-out's classes vary from cell to cell."""
    datamodule = LldDataModule(
        root=str(data_root), image_size=image_size, batch_size=2, num_workers=0
    )
    torch.manual_seed(0)
    module = LldModule(
        num_classes=datamodule.num_classes,
        attribute_spec=datamodule.attribute_spec,
        class_names=datamodule.class_names,
        detector=functools.partial(
            Detector,
            backbone="test_resnet",
            fpn_channels=32,
            box_bins=2,
            readout=Readout(pixel_crop=16),
        ),
    )
    generator = torch.Generator().manual_seed(1)
    head, roi_head = module.detector.head, module.detector.roi_head
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        head.box_pred.weight.add_(torch.randn(head.box_pred.weight.shape, generator=generator))
        head.cls_pred.bias.add_(3.0)
        head.quality_pred.bias.add_(2.0)
        roi_head.cls_pred.weight.add_(
            0.3 * torch.randn(roi_head.cls_pred.weight.shape, generator=generator)
        )
    torch.save(
        {
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": L.__version__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": dict(datamodule.hparams),
        },
        path,
    )
    return path


def letterboxed_test_images(data_root: Path, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """The synthetic test images (the first batch of each domain), letterboxed as evaluation does."""
    datamodule = LldDataModule(
        root=str(data_root), image_size=image_size, batch_size=2, num_workers=0
    )
    datamodule.setup("test")
    batches = [next(iter(loader)) for loader in datamodule.test_dataloader().values()]
    return torch.cat([datamodule.eval_transform(batch)["image"] for batch in batches])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> dict[str, Path]:
    """The tiny checkpoint and both of its exports, made through the command."""
    folder = tmp_path_factory.mktemp("export")
    ckpt = make_tiny_checkpoint(folder / "tiny.ckpt", tiny_synthetic)
    assert main(["--ckpt_path", str(ckpt), "--format", "onnx"]) == 0
    torchscript = export_checkpoint(ckpt, "torchscript")
    assert torchscript == ckpt.with_suffix(".torchscript")
    return {"ckpt": ckpt, "onnx": ckpt.with_suffix(".onnx"), "torchscript": torchscript}


@pytest.fixture(scope="module")
def module(exported: dict[str, Path]) -> LldModule:
    """The tiny checkpoint's model, loaded as `Predictor.from_checkpoint` loads it."""
    return load_checkpoint(exported["ckpt"]).module


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    """Same cells per image (count and classes), boxes within 1e-3 relative, same attributes."""
    assert len(got) == len(expected)
    for image, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["labels"].tolist() == e["labels"].tolist(), f"image {image}"
        torch.testing.assert_close(g["boxes"], e["boxes"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(g["scores"], e["scores"], rtol=1e-3, atol=1e-5)
        assert g["attributes"].tolist() == e["attributes"].tolist(), f"image {image}"
        torch.testing.assert_close(
            g["attribute_scores"], e["attribute_scores"], rtol=1e-3, atol=1e-5
        )


@pytest.mark.parametrize("format", sorted(SUFFIXES))
def test_exported_model_gives_the_detections_of_eager_pytorch(
    exported: dict[str, Path], module: LldModule, tiny_synthetic: Path, format: str
) -> None:
    model = ExportedModel(exported[format])
    images = letterboxed_test_images(tiny_synthetic)
    assert images.shape[0] >= 3  # not the traced batch of 2: the batch size is dynamic
    with torch.inference_mode():
        expected = module.detect(images)
        outputs = module(images)
    got = model.detect(images)
    assert_same_detections(got, expected)
    counts = [len(d["scores"]) for d in expected]
    assert min(counts) > 0, "every test image should have detections"
    # NMS and the per-image cap removed candidates: the graph's own post-processing was tested.
    candidates = detection_scores(outputs["cls_logits"], outputs["quality_logits"]).amax(-1)
    above = (candidates > module.settings.score_threshold).sum(dim=1).tolist()
    assert all(n > c for n, c in zip(above, counts, strict=True))
    # The read-out gave the classes (not the dense head's): several classes among the cells.
    assert len({label for d in expected for label in d["labels"].tolist()}) > 1
    # One image alone gives what it gives inside the batch.
    assert_same_detections(model.detect(images[1:2]), expected[1:2])


def test_metadata_names_classes_attributes_and_settings(
    exported: dict[str, Path], module: LldModule
) -> None:
    import onnxruntime

    meta = json.loads(metadata_path(exported["onnx"]).read_text())
    assert meta["format"] == "onnx" and meta["image_size"] == IMAGE_SIZE
    assert meta["class_names"] == module.class_names
    assert meta["attributes"] == {k: list(v) for k, v in LLD_ATTRIBUTE_VALUES.items()}
    assert meta["readout"] is True and meta["letterbox"]["fill"] == 0.5
    assert meta["postprocess"]["nms_iou"] == module.settings.nms_iou
    assert meta["checkpoint"] == str(exported["ckpt"]) and meta["lld_lightning"]
    assert list(meta["outputs"]) == list(OUTPUT_NAMES)
    session = onnxruntime.InferenceSession(
        str(exported["onnx"]), providers=["CPUExecutionProvider"]
    )
    (given,) = session.get_inputs()
    assert given.name == "images" and given.shape[1:] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert isinstance(given.shape[0], str)  # a dynamic batch
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    ts_meta = json.loads(metadata_path(exported["torchscript"]).read_text())
    assert ts_meta["format"] == "torchscript" and ts_meta["class_names"] == module.class_names


def test_a_model_that_finds_nothing_gives_empty_outputs(module: LldModule, tmp_path: Path) -> None:
    """No candidate above the threshold: zero-row outputs of the right widths (onnxruntime
    cannot run the read-out on zero boxes; the graph gives it one extra box and drops it)."""
    blind = copy.deepcopy(module)
    with torch.no_grad():
        blind.detector.head.cls_pred.bias.fill_(-30.0)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = export_module(blind, tmp_path / "empty.onnx", "onnx", image_size=64)
    detections = ExportedModel(path).detect(images)
    assert [d["boxes"].shape for d in detections] == [(0, 4)] * 3
    assert [d["attributes"].shape for d in detections] == [(0, 7)] * 3


def test_a_detector_without_readout_exports_its_dense_classes(tmp_path: Path) -> None:
    """``readout: null``: classes and attributes come from the dense head, in the graph too."""
    torch.manual_seed(0)
    dense = LldModule(
        detector=functools.partial(
            Detector, backbone="test_resnet", fpn_channels=32, box_bins=2, readout=None
        )
    ).eval()
    generator = torch.Generator().manual_seed(2)
    head = dense.detector.head
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        head.cls_pred.bias.add_(3.0)
    images = torch.rand(3, 3, 64, 64, generator=generator)
    with torch.inference_mode():
        expected = dense.detect(images)
    path = export_module(dense, tmp_path / "dense.onnx", "onnx", image_size=64)
    assert json.loads(metadata_path(path).read_text())["readout"] is False
    assert sum(len(d["labels"]) for d in expected) > 0
    assert_same_detections(ExportedModel(path).detect(images), expected)


def test_split_detections_gives_each_image_its_rows() -> None:
    outputs = [
        torch.tensor([[0.0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]]),
        torch.tensor([0.9, 0.5, 0.7]),
        torch.tensor([3, 1, 2]),
        torch.tensor([[0], [1], [0]]),
        torch.tensor([[0.6], [0.8], [0.9]]),
        torch.tensor([0, 0, 2]),
    ]
    first, second, third = split_detections([o.numpy() for o in outputs], batch_size=3)
    assert first["labels"].tolist() == [3, 1] and first["scores"].tolist() == pytest.approx(
        [0.9, 0.5]
    )
    assert second["boxes"].shape == (0, 4) and second["attributes"].shape == (0, 1)
    assert third["boxes"].tolist() == [[2.0, 2.0, 3.0, 3.0]]
    with pytest.raises(ExportError, match="image 2 of a batch of 2"):
        split_detections(outputs, batch_size=2)


def test_wrong_input_and_missing_files_are_one_line_errors(
    exported: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = ExportedModel(exported["onnx"])
    with pytest.raises(
        ExportError, match=r"expected images \[B, 3, 128, 128\], got \[1, 3, 64, 64\]"
    ):
        model.detect(torch.zeros(1, 3, 64, 64))
    missing = tmp_path / "none.ckpt"
    assert main(["--ckpt_path", str(missing), "--format", "onnx"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"lld export: no checkpoint at {missing}"
    not_a_checkpoint = tmp_path / "bad.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert main(["--ckpt_path", str(not_a_checkpoint)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"lld export: {not_a_checkpoint}: ") and "\n" not in error
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(exported["onnx"].read_bytes())
    with pytest.raises(ExportError, match="lone.onnx.json is missing"):
        ExportedModel(lone)


def test_lld_export_runs_the_export_command(exported: dict[str, Path], tmp_path: Path) -> None:
    from lld_lightning.cli import main as lld

    out = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as exit_info:
        lld(["export", "--ckpt_path", str(exported["ckpt"]), "--format", "torchscript", "--out", str(out)])
    assert exit_info.value.code == 0
    assert out.is_file() and metadata_path(out).is_file()
    with pytest.raises(SystemExit) as exit_info:
        lld(["export", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 2

