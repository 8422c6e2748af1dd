"""The `lld` CLI, in-process, on the tiny config (seconds on a CPU)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from lld_lightning.cli import main
from lld_lightning.module import LldModule
from tests.conftest import LLD_SAMPLES, REPO

TINY = str(REPO / "configs" / "tiny.yaml")
#: The shared fit's last checkpoint, through the link to the latest run.
LAST = "run/latest/checkpoints/last.ckpt"


def _args(workdir: Path) -> list[str]:
    return [
        "--config", TINY,
        "--data.synthetic.dir", str(workdir / "data"),
        "--trainer.default_root_dir", str(workdir / "run"),
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny fit shared by the CLI tests: returns the work dir (the run in run/version_0)."""
    workdir = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["fit", *_args(workdir)])
    run = workdir / "run" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists() and (workdir / LAST).exists()
    assert (run / "metrics.csv").is_file(), "CSV logger wrote nothing"
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard logger wrote nothing"
    return workdir


#: Overlays are layered on the config they name.
OVERLAYS = {"pseudo.yaml": "sparse.yaml", "txl_4min.yaml": "txl.yaml"}


@pytest.mark.parametrize("config", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--config", str(REPO / "configs" / OVERLAYS[config.name])] if config.name in OVERLAYS else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_gpu_overlay_builds_a_time_budgeted_four_minute_run(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # configs/gpu/*.yaml are overlays: they only make sense on top of the config they name.
    from lld_lightning.callbacks.time_budget import TimeBudget
    from lld_lightning.cli import LldCLI
    from lld_lightning.data.datamodule import LldDataModule

    monkeypatch.chdir(tmp_path)
    cli = LldCLI(LldModule, LldDataModule, run=False, args=[
        "--config", str(REPO / "configs/txl.yaml"), "--config", str(REPO / "configs/gpu/txl_4min.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    ])
    budgets = [c for c in cli.trainer.callbacks if isinstance(c, TimeBudget)]
    assert len(budgets) == 1 and budgets[0].budget_s == 240
    checkpoints = [c for c in cli.trainer.callbacks if type(c).__name__ == "RunCheckpoint"]
    assert len(checkpoints) == 1 and checkpoints[0].monitor == "val/map"
    assert cli.trainer._val_check_time_interval == 60
    assert cli.model.detector.backbone.body.__class__.__name__ == "FeatureListNet"
    assert cli.model.hparams.detector["init_args"]["backbone"] == "resnet34"
    assert cli.model.criterion.cls_loss == "quality_focal"
    assert cli.model.hparams.metrics_backend == "faster_coco_eval"
    assert cli.model.detector.head.box_bins == 17 and cli.model.detector.neck.channels[0] == 128
    assert cli.datamodule.hparams.batch_size == 64 and cli.datamodule.hparams.image_size == 640
    # Everything else still comes from txl.yaml.
    assert cli.datamodule.class_names == ["WBC", "RBC", "Platelets"]


def test_validate_and_test_print_per_domain_table(fitted: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(fitted)
    ckpt = str(fitted / LAST)
    main(["validate", *_args(fitted), "--ckpt_path", ckpt])
    cli = main(["test", *_args(fitted), "--ckpt_path", ckpt])
    results = cli.model.test_results
    domains = cli.datamodule.test_domains
    assert len(domains) >= 2
    for domain in domains:
        assert 0.0 <= results[f"{domain}/map_50"] <= 1.0
    assert "all/map" in results
    out = capsys.readouterr().out
    assert "lld validate: per-domain results" in out and "lld test: per-domain results" in out
    assert all(d in out for d in domains)
    assert "Test metric" not in out  # Lightning's own key-by-key table is off by default


def test_predict_writes_json_csv_and_overlays(fitted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fitted)
    images = LLD_SAMPLES if LLD_SAMPLES.exists() else next((fitted / "data").rglob("images/test"))
    out = fitted / "pred"
    main([
        "predict", *_args(fitted), "--ckpt_path", str(fitted / LAST),
        "--data.predict_root", str(images), "--predict_writer.output_dir", str(out),
        "--predict_writer.min_score", "0.0",
    ])
    num_images = len([p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg")])
    coco = json.loads((out / "detections.json").read_text())
    assert len(coco["images"]) == num_images
    with open(out / "detections.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(coco["annotations"])
    assert rows and "nuclear_chromatin" in rows[0] and "class" in rows[0]
    assert len(list((out / "overlays").glob("*.png"))) == num_images
    for ann in coco["annotations"]:
        image = coco["images"][ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
    # One class per cell: no two written cells of an image overlap above cell_iou (0.5).
    for image in coco["images"]:
        boxes = torch.tensor([a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]])
        if len(boxes) > 1:
            xyxy = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
            iou = box_iou(xyxy, xyxy).fill_diagonal_(0)
            assert float(iou.max()) <= 0.5 + 1e-4


def test_checkpoint_reload_gives_identical_outputs(fitted: Path) -> None:
    ckpt = fitted / LAST
    model_a = LldModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    model_b = LldModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out_a, out_b = model_a(images), model_b(images)
    for key in ("cls_logits", "box_deltas", "quality_logits"):
        torch.testing.assert_close(out_a[key], out_b[key], rtol=0, atol=0)
    # The region read-out (configs/tiny.yaml has it) reloads too: same detections, classes included.
    assert model_a.detector.roi_head is not None
    with torch.no_grad():
        dets_a, dets_b = model_a.detect(images), model_b.detect(images)
    for det_a, det_b in zip(dets_a, dets_b, strict=True):
        for key in det_a:
            torch.testing.assert_close(det_a[key], det_b[key], rtol=0, atol=0)
    # The checkpoint is plain values and tensors: it loads without unpickling any object.
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model_a.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert model_a.hparams.detector["init_args"]["backbone"] == "test_resnet"
    assert model_a.detector.roi_head.crop_encoder.crop_size == 16


def test_non_finite_loss_stops_with_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from lld_lightning.losses import SparseDetectionLoss

    original = SparseDetectionLoss.forward

    def poisoned(self, outputs, targets):
        terms = original(self, outputs, targets)
        terms["box"] = terms["box"] * float("nan")
        return terms

    monkeypatch.setattr(SparseDetectionLoss, "forward", poisoned)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite training loss at global step 0" in err and "box=nan" in err


def test_data_error_is_one_paragraph(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad" / "H_100x_C1"
    (bad / "images" / "train").mkdir(parents=True)
    (bad / "labels" / "train").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(bad / "images" / "train" / "a.png")
    (bad / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--data.root", str(tmp_path / "bad"),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lld: data error:" in err and "a.txt:1" in err and "Traceback" not in err


def test_lld_command_exits_with_status_zero(fitted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console script passes its function's return value to sys.exit: it must be None."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lld"]
    module_name, function_name = target.split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    monkeypatch.chdir(fitted)
    ckpt = str(fitted / LAST)
    monkeypatch.setattr(sys, "argv", ["lld", "validate", *_args(fitted), "--ckpt_path", ckpt])
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(command())
    assert exit_info.value.code in (None, 0)


def test_score_thresholds_measures_the_checkpoint_per_class(fitted: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    from lld_lightning.tools.score_thresholds import main as score_thresholds

    monkeypatch.chdir(fitted)
    out = fitted / "thresholds.json"
    report = score_thresholds([
        "--ckpt_path", str(fitted / LAST), "--thresholds", "0.5", "0.0",
        "--precision", "0.0", "--out", str(out), *_args(fitted),
    ])
    assert report["thresholds"] == [0.0, 0.5]
    detections, correct = torch.tensor(report["detections"]), torch.tensor(report["correct"])
    cells = torch.tensor(report["cells"])
    assert cells.sum() > 0 and detections[0].sum() > 0
    assert (detections[1] <= detections[0]).all() and (correct <= detections).all()
    assert (correct <= cells).all()
    # at precision 0 every class with a detection at the lowest threshold gets that threshold
    assert all(report["suggested"][name] == 0.0 for name, n in zip(report["classes"], detections[0],
                                                                      strict=True) if n > 0)
    assert json.loads(out.read_text())["classes"] == report["classes"]
    assert "PseudoLabeller class_thresholds" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no checkpoint at"):
        score_thresholds(["--ckpt_path", str(fitted / "missing.ckpt"), *_args(fitted)])
    # the test split is one loader per domain, read one after the other
    test_split = score_thresholds([
        "--ckpt_path", str(fitted / LAST), "--split", "test",
        "--thresholds", "0.0", *_args(fitted),
    ])
    assert test_split["split"] == "test" and test_split["cells_total"] > 0


def test_score_thresholds_on_the_training_images_inside_and_outside_the_regions(
    fitted: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lld_lightning.tools.score_thresholds import main as score_thresholds

    monkeypatch.chdir(fitted)
    args = ["--ckpt_path", str(fitted / LAST), "--split", "train",
            "--thresholds", "0.0", "--precision", "0.0", *_args(fitted)]
    whole = score_thresholds([*args, "--data.sparse_simulation", "1.0"])
    assert sum(whole["outside"]["detections"][0]) == 0 and whole["outside"]["cells_total"] == 0
    sparse = score_thresholds([*args, "--data.sparse_simulation", "0.3"])
    inside, outside = sparse, sparse["outside"]
    # One rectangle splits the same detections and cells that the whole image holds (a cell cut
    # by the rectangle's edge may be in neither: not labelled, and its centre inside).
    assert 0 < inside["cells_total"] and 0 < outside["cells_total"]
    assert inside["cells_total"] + outside["cells_total"] <= whole["cells_total"]
    assert sum(inside["detections"][0]) + sum(outside["detections"][0]) == sum(whole["detections"][0])
    assert "outside the labelled regions" in " ".join(capsys.readouterr().out.split())


def test_explicit_model_keys_reads_typed_model_flags() -> None:
    from lld_lightning.cli import explicit_model_keys

    argv = ["test", "--config", "c.yaml", "--model.postprocess.nms_iou", "0.7", "--model.lr=2",
            "--data.batch_size", "4", "--model.postprocess.nms_iou=0.5", "--ckpt_path", "x.ckpt",
            "--model.detector.init_args.backbone", "resnet50", "--model.loss.weights.cls", "2"]
    assert explicit_model_keys(argv) == ["postprocess.nms_iou", "lr", "detector.backbone", "loss.weights.cls"]
    assert explicit_model_keys({"model": {"lr": 0.7}}) == []


def test_explicit_model_keys_reads_a_whole_model_mapping(tmp_path: Path) -> None:
    from lld_lightning.cli import explicit_model_keys

    assert explicit_model_keys(["test", "--model", '{"postprocess": {"nms_iou": 0.7}, "lr": 0.1}']) == [
        "postprocess", "lr"]
    assert explicit_model_keys(["--model={lr: 0.25}", "--model.postprocess.nms_iou", "0.6"]) == [
        "lr", "postprocess.nms_iou"]
    file = tmp_path / "model.yaml"
    file.write_text("class_path: lld_lightning.module.LldModule\ninit_args:\n  warmup_steps: 1\n")
    assert explicit_model_keys(["--model", str(file)]) == ["warmup_steps"]
    # Not a mapping, unreadable, or no value: nothing (the parser reports what it cannot use).
    assert explicit_model_keys(["--model", "[1, 2]"]) == []
    assert explicit_model_keys(["--model", "{unclosed"]) == []
    assert explicit_model_keys(["--model"]) == []


def test_bf16_on_a_cpu_without_bf16_units_trains_in_fp32(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from lld_lightning import cli as cli_module
    from lld_lightning.cli import KEEP_CPU_BF16, LldCLI, cpu_bf16_is_emulated
    from lld_lightning.data.datamodule import LldDataModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEEP_CPU_BF16, raising=False)
    args = [*_args(tmp_path), "--trainer.precision", "bf16-mixed"]

    def build() -> str:
        return LldCLI(LldModule, LldDataModule, run=False, args=args).trainer.precision

    monkeypatch.setattr(cli_module, "cpu_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="without bf16 units"):
        assert build() == "32-true"
    monkeypatch.setenv(KEEP_CPU_BF16, "1")
    assert build() == "bf16-mixed"
    monkeypatch.delenv(KEEP_CPU_BF16)
    monkeypatch.setattr(cli_module, "cpu_bf16_units", lambda: True)
    assert build() == "bf16-mixed"
    monkeypatch.setattr(cli_module, "cpu_bf16_units", lambda: False)
    assert not cpu_bf16_is_emulated({"precision": "bf16-mixed", "accelerator": "cuda"})
    assert not cpu_bf16_is_emulated({"precision": "32-true", "accelerator": "cpu"})
    assert cpu_bf16_is_emulated({"precision": "bf16-true", "accelerator": "cpu"})


def test_tune_with_the_region_read_out_matches_lld_validate(fitted: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny.yaml's model reads classes and attributes over each box (roi_readout): the kept
    # outputs then include the feature maps and images the read-out crops from.
    from lld_lightning.tools.tune import main as tune

    monkeypatch.chdir(fitted)
    ckpt = str(fitted / LAST)
    report = tune(["--ckpt_path", ckpt, "--nms-iou", "0.6", "0.4", "--quality-weight", "0.5", *_args(fitted)])
    assert len(report["rows"]) == 2
    for row in report["rows"]:
        flags = [] if row["current"] else row["flags"].split()
        logged = main(["validate", *_args(fitted), "--ckpt_path", ckpt, "--trainer.limit_val_batches", "1.0",
                       *flags]).trainer.callback_metrics
        for key in ("map", "map_50", "attr/mean_f1"):
            # An undefined metric (no matched cell) is left out of both.
            assert (f"val/{key}" in logged) == (f"all/{key}" in row["results"]), key
            if f"all/{key}" in row["results"]:
                assert float(logged[f"val/{key}"]) == pytest.approx(row["results"][f"all/{key}"], abs=1e-6)
