"""`make benchmark`: a tiny in-process run (keys, JSON line, ratios), flags, targets. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.models import Readout
from lld_lightning.tools import benchmark
from lld_lightning.tools.benchmark import (
    RATIO_KEYS,
    Settings,
    check_targets,
    lld_subject,
    main,
    onnx_row,
    parse_settings,
    ratios,
    render_table,
)
from lld_lightning.tools.benchmark_fcos import build_fcos, fcos_targets

FIGURES = {
    "params_m",
    "train_ips",
    "e2e_ips",
    "e2e_fraction",
    "infer_ips",
    "latency_ms",
    "peak_memory_mb",
    "eval_s",
    "metrics_s",
    "test_images",
}
#: lld's CPU inference of the same images, exported to ONNX (onnxruntime) and eager.
ONNX_FIGURES = {"onnx_cpu_ips", "eager_cpu_ips"}


def test_tiny_run_writes_table_and_json_line(tiny_synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    record = main(
        [
            "--device",
            "cpu",
            "--backbone",
            "test_resnet",
            "--image-size",
            "64",
            "--batch-size",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--data-root",
            str(tiny_synthetic),
            "--num-workers",
            "0",
            "--light",
            "test_resnet",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(record))
    assert {"date", "machine", "settings", "results", "ratios", "targets", "wall_s"} <= set(record)
    assert {"cpu", "torch", "torchvision", "timm", "gpu", "device"} <= set(record["machine"])
    assert record["machine"]["gpu"] is None
    assert record["settings"]["backbone"] == "test_resnet"
    assert set(record["results"]) == {"lld", "fcos", "lld_light"}
    lld, fcos = record["results"]["lld"], record["results"]["fcos"]
    onnx = ONNX_FIGURES if benchmark.onnxruntime_available() else set()
    assert set(lld) == FIGURES | onnx and set(fcos) == FIGURES
    assert all(lld[key] > 0 for key in onnx)
    assert set(record["results"]["lld_light"]) == {
        "params_m",
        "train_ips",
        "infer_ips",
        "latency_ms",
        "peak_memory_mb",
    }
    # Every ratio is lld / FCOS of the figures printed beside it, and the e2e fraction is
    # e2e over the model-only step of the same detector.
    assert set(record["ratios"]) == set(RATIO_KEYS)
    for key, value in record["ratios"].items():
        assert value == pytest.approx(lld[key] / fcos[key])
    assert lld["e2e_fraction"] == pytest.approx(lld["e2e_ips"] / lld["train_ips"])
    # The test split of the tiny set: the same images for both detectors.
    assert lld["test_images"] == fcos["test_images"] > 0
    assert set(record["targets"]) == {"train >= 1.5x FCOS", "inference >= 2.0x FCOS"}
    assert record["targets"]["train >= 1.5x FCOS"] == (record["ratios"]["train_ips"] >= 1.5)

    console = Console(width=200, record=True)
    console.print(render_table(record))
    text = console.export_text()
    assert "lld/FCOS" in text and "lld light (test_resnet)" in text
    if onnx:
        assert f"{lld['onnx_cpu_ips']:.2f}" in text and "onnxruntime CPU" in text
    assert f"{record['ratios']['train_ips']:.2f}x" in text


def test_ratios_and_targets_from_hand_numbers() -> None:
    lld = {"train_ips": 30.0, "infer_ips": 15.0, "latency_ms": 20.0, "peak_memory_mb": 500.0}
    fcos = {"train_ips": 10.0, "infer_ips": 10.0, "latency_ms": 80.0, "peak_memory_mb": 1000.0}
    got = ratios(lld, fcos)
    assert got == {"train_ips": 3.0, "infer_ips": 1.5, "latency_ms": 0.25, "peak_memory_mb": 0.5}
    cpu = {"machine": {"device": "cpu"}, "results": {"lld": lld}, "ratios": got}
    assert check_targets(cpu) == {"train >= 1.5x FCOS": True, "inference >= 2.0x FCOS": False}
    gpu_lld = {
        **lld,
        "train_ips": 400.0,
        "infer_ips": 1000.0,
        "e2e_fraction": 0.95,
        "peak_memory_mb": 13 * 1024.0,
    }
    gpu = {
        "machine": {"device": "cuda:0"},
        "results": {"lld": gpu_lld},
        "ratios": {"train_ips": 2.0},
    }
    assert check_targets(gpu) == {
        "train >= 1.8x FCOS": True,
        "train >= 350 img/s": True,
        "inference >= 1200 img/s": False,
        "end-to-end >= 90% of model-only": True,
        "peak memory <= 12 GiB": False,
    }


def test_gpu_preset_and_overrides() -> None:
    settings = parse_settings(["--preset", "gpu", "--batch-size", "16"])
    assert (settings.backbone, settings.image_size, settings.precision) == ("resnet50", 640, "bf16")
    assert settings.batch_size == 16 and settings.channels_last and settings.light == "resnet18"
    default = parse_settings([])
    assert (default.backbone, default.image_size, default.batch_size) == ("resnet18", 320, 8)
    assert not default.compile and default.light is None and default.fcos and default.onnx
    assert not parse_settings(["--no-onnx"]).onnx
    assert not settings.onnx  # the GPU protocol times the GPU
    assert parse_settings(["--light"]).light == "resnet18"


def test_fcos_keeps_the_input_size_and_drops_padding() -> None:
    model = build_fcos("test_resnet", num_classes=3, image_size=64).eval()
    assert model.transform.min_size == (64,) and model.transform.max_size == 64
    with torch.no_grad():
        images, _ = model.transform([torch.rand(3, 64, 64)])
    assert tuple(images.tensors.shape[-2:]) == (64, 64)
    batch = {
        "boxes": torch.tensor([[[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 0.0, 0.0]]]),
        "labels": torch.tensor([[2, -1]]),
    }
    (target,) = fcos_targets(batch)
    assert target["labels"].tolist() == [2]
    assert target["boxes"].tolist() == [[1.0, 2.0, 10.0, 12.0]]


def test_assigner_range_cache_follows_the_strides_tensor() -> None:
    """Speed work: the per-location ranges are cached per strides object, never stale."""
    from lld_lightning.models.assign import _per_location_ranges

    strides = torch.tensor([8.0, 8.0, 16.0, 32.0])
    lo, hi = _per_location_ranges(strides, None)
    assert lo.tolist() == [0.0, 0.0, 64.0, 128.0] and hi.tolist()[:3] == [64.0, 64.0, 128.0]
    again, _ = _per_location_ranges(strides, None)
    assert again is lo  # a cache hit: no torch.unique, no host sync
    strides[0] = 16.0  # an in-place edit bumps the version counter: recomputed
    lo, hi = _per_location_ranges(strides, None)
    assert lo.tolist() == [64.0, 0.0, 64.0, 128.0] and hi.tolist()[0] == 128.0


def test_lld_row_is_the_recipe_detector_and_its_loss_is_the_training_steps(
    tiny_synthetic: Path,
) -> None:
    datamodule = LldDataModule(root=str(tiny_synthetic), image_size=64, batch_size=2, num_workers=0)
    datamodule.setup("fit")
    batch = datamodule.train_augmentation(next(iter(datamodule.train_dataloader())))
    subject = lld_subject("lld", "test_resnet", datamodule, Settings())
    module = subject.lightning_module
    assert module.detector.readout == Readout()  # the shipped recipe's region read-out
    assert set(module.attribute_spec) == set(datamodule.attribute_spec)
    torch.manual_seed(0)  # the read-out's jittered training boxes
    loss = subject.loss(batch["image"], batch)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="log"):  # no Trainer to log to
        expected = module.training_step(batch, 0)
    assert torch.equal(loss, expected) and loss > 0


def test_onnx_row_without_onnxruntime_is_one_line_and_no_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(benchmark, "onnxruntime_available", lambda: False)
    console = Console(width=200, record=True)
    assert onnx_row(None, torch.zeros(1, 3, 32, 32), Settings(), console) == {}
    text = console.export_text()
    assert "onnxruntime is not installed: no ONNX row" in text and "--no-onnx" in text
