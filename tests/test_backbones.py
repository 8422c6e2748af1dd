"""Every ``features_only`` timm family as the detector's backbone: levels, refusals, the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from lld_lightning.cli import main
from lld_lightning.models import Detector, TimmBackbone
from lld_lightning.models import backbone as backbone_module
from lld_lightning.models.backbone import BackboneError, default_out_indices
from tests.conftest import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEC = {"size": 3, "shape": 2}
NUM_CLASSES = 4

#: One small member of each CNN family (timm 1.0.31 names), and the stages at strides 8/16/32.
FAMILIES = {
    "test_resnet": [2, 3, 4],
    "test_efficientnet": [2, 3, 4],
    "mobilenetv3_small_050": [2, 3, 4],
    "convnext_atto": [1, 2, 3],  # four stages: the old default [2, 3, 4] overran them
    "regnetx_002": [2, 3, 4],
    "test_mambaout": [1, 2, 3],  # hands its maps back channels-last (timm output_fmt NHWC)
}


def _detector(backbone: str, **options) -> Detector:
    return Detector(NUM_CLASSES, SPEC, backbone=backbone, readout=None, fpn_channels=16, **options)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_feeds_strides_8_16_32_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model = _detector(name)
    reference = timm.create_model(name, features_only=True).feature_info
    assert model.backbone.out_indices == FAMILIES[name]
    assert model.backbone.strides == [8, 16, 32] == model.strides_per_level
    assert model.backbone.channels == reference.channels(FAMILIES[name])

    height, width = 64, 96
    features = model.backbone(model.normalise(torch.rand(1, 3, height, width)))
    assert [tuple(f.shape) for f in features] == [
        (1, c, height // s, width // s)
        for c, s in zip(model.backbone.channels, (8, 16, 32), strict=True)
    ]
    outputs = model(torch.rand(1, 3, height, width))
    num_points = sum((height // s) * (width // s) for s in (8, 16, 32))
    assert outputs["cls_logits"].shape == (1, num_points, NUM_CLASSES)
    assert outputs["box_deltas"].shape == (1, num_points, 4)
    assert outputs["points"].shape == (num_points, 2)
    assert sorted(set(outputs["strides"].tolist())) == [8.0, 16.0, 32.0]
    assert torch.isfinite(outputs["cls_logits"]).all()


@pytest.mark.parametrize(
    ("strides", "expected"),
    [
        ([2, 4, 8, 16, 32], [2, 3, 4]),  # ResNet, EfficientNet, RegNet
        ([4, 8, 16, 32], [1, 2, 3]),  # ConvNeXt, Swin
        ([4, 8, 8, 16, 16, 32], [2, 4, 5]),  # repeated strides: the deepest stage of each
        ([2, 4, 8, 16, 32, 64], [2, 3, 4]),  # a stride-64 stage is left out
        ([16, 32, 64], [0, 1, 2]),  # no stride 8: the three coarsest
        ([2, 4, 8, 16, 16], [1, 2, 4]),  # output stride 16
    ],
)
def test_default_levels_from_feature_info(strides: list[int], expected: list[int]) -> None:
    assert default_out_indices("m", [(s, 8) for s in strides]) == expected


def test_a_model_without_a_pyramid_is_refused_in_one_line() -> None:
    with pytest.raises(BackboneError, match="no feature pyramid") as error:
        default_out_indices("m", [(16, 8)] * 12)
    assert "strides [16] only" in _one_line(error)


def test_explicit_out_indices_win() -> None:
    backbone = TimmBackbone("test_resnet", out_indices=[1, 2, 3])
    assert backbone.out_indices == [1, 2, 3]
    assert backbone.strides == [4, 8, 16]
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features] == [4, 8, 16]
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_default_build_drops_stages_past_the_chosen_ones(monkeypatch) -> None:
    # A model whose deepest stage is past the default strides (a stride-64 stage, say).
    monkeypatch.setattr(backbone_module, "DEFAULT_STRIDES", (4, 8, 16))
    backbone = TimmBackbone("test_resnet")
    assert backbone.out_indices == [1, 2, 3]
    assert not any(name.startswith("layer4") for name, _ in backbone.body.named_parameters())
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features] == [4, 8, 16]
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in backbone.parameters())


@pytest.mark.parametrize(
    ("out_indices", "problem"),
    [([2, 3, 4], "are out of range"), ([3, 2], "give strides [32, 16]"), ([-1], "out of range")],
)
def test_bad_out_indices_name_the_stages(out_indices: list[int], problem: str) -> None:
    with pytest.raises(BackboneError) as error:
        _detector("test_convnext", out_indices=out_indices)
    message = _one_line(error)
    assert problem in message and "'test_convnext'" in message
    assert "0: stride 4, 1: stride 8, 2: stride 16, 3: stride 32" in message


def test_default_build_keeps_the_parameter_names_of_the_old_default() -> None:
    # Checkpoints trained under out_indices [2, 3, 4] must still load.
    for name in ("test_resnet", "test_efficientnet"):
        old = timm.create_model(name, features_only=True, out_indices=(2, 3, 4))
        assert list(TimmBackbone(name).body.state_dict()) == list(old.state_dict())


def test_plain_vit_is_refused_by_default_in_one_line() -> None:
    with pytest.raises(
        BackboneError, match="'vit_tiny_patch16_224' has no feature pyramid"
    ) as error:
        _detector("vit_tiny_patch16_224")
    assert "strides [16] only" in _one_line(error)


@pytest.mark.parametrize("size", [(64, 96), (96, 96)])
def test_fixed_size_vit_runs_at_other_sizes_on_a_named_stage(size: tuple[int, int]) -> None:
    # timm fixes test_vit3 to 160x160; its last block feeds a one-level pyramid at any size.
    model = _detector("test_vit3", out_indices=[8])
    assert model.backbone.strides == [16]
    height, width = size
    outputs = model(torch.rand(1, 3, height, width))
    assert outputs["cls_logits"].shape == (1, (height // 16) * (width // 16), NUM_CLASSES)


def test_a_model_that_cannot_run_at_other_sizes_fails_at_construction(monkeypatch) -> None:
    # Without timm's dynamic_img_size the ViT takes 160x160 only: the probe says so in one line.
    monkeypatch.setattr(backbone_module, "_fixed_input_size", lambda name: None)
    with pytest.raises(BackboneError, match="'test_vit3' cannot run on a 64x80") as error:
        _detector("test_vit3", out_indices=[8])
    _one_line(error)


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(BackboneError, match="not a timm model; close names: convnext_atto"):
        _detector("convnext_attto")


def test_cli_parses_another_backbone(capsys: pytest.CaptureFixture) -> None:
    config = str(REPO / "configs" / "tiny.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                config,
                "--model.detector.backbone",
                "convnext_atto",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "backbone: convnext_atto" in printed
    assert "out_indices: null" in printed


def test_a_backbone_timm_cannot_serve_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lld_lightning.cli import main as lld

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        lld(["fit", "--config", str(config), "--model.detector.backbone", "vit_tiny_patch16_224",
             "--data.synthetic.dir", str(tmp_path / "data"), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lld:")]
    assert len(lines) == 1 and "vit_tiny_patch16_224" in lines[0]
