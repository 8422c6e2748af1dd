"""The sparse study runner, on the tiny model and data (`--quick`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from research import study


def test_plan_has_every_row_and_the_extra_fraction_once() -> None:
    args = study.parse_args(
        ["--datasets", "synthetic", "--fractions", "0.2", "0.1", "--fraction-dataset", "synthetic"]
    )
    runs = [(dataset, fraction, row) for dataset, fraction, row, _, _ in study.plan(args)]
    assert runs == [
        ("synthetic", None, "full"),
        ("synthetic", 0.2, "naive"),
        ("synthetic", 0.2, "masked"),
        ("synthetic", 0.2, "masked+teacher"),
        ("synthetic", 0.2, "masked+self"),
        ("synthetic", 0.1, "naive"),
        ("synthetic", 0.1, "masked"),
        ("synthetic", 0.1, "masked+teacher"),
        ("synthetic", 0.1, "masked+self"),
    ]
    config = study.run_config(args, Path("run"), "self", 240)
    labeller = config["trainer"]["callbacks"][-1]["init_args"]
    assert labeller == {"mode": "self", "warmup_steps": 120}  # the reference's own 0.95 / 0.1
    # Pseudo-label rows read the hidden annotation (their precision); only the teacher the weak view.
    assert config["data"] == {"keep_hidden": True, "teacher_view": False}
    teacher = study.run_config(args, Path("run"), "teacher", 240)
    assert teacher["data"] == {"keep_hidden": True, "teacher_view": True}
    assert "data" not in study.run_config(args, Path("run"), None, 240)
    plain = teacher["trainer"]["callbacks"][-1]
    assert plain["class_path"] == "lld_lightning.callbacks.pseudo.PseudoLabeller"
    assert plain["init_args"] == {
        "mode": "teacher",
        "warmup_steps": 120,
        "threshold": 0.6,
        "weight": 0.5,
        "ema_decay": 0.98,
    }
    assert "attribute_threshold" not in plain["init_args"]
    args = study.parse_args(["--datasets", "synthetic", "--pseudo-attribute-threshold", "1.01"])
    teacher = study.run_config(args, Path("run"), "teacher", 240)["trainer"]["callbacks"][-1]
    assert teacher["init_args"]["attribute_threshold"] == 1.01
    reference = study.run_config(args, Path("run"), "self", 240)["trainer"]["callbacks"][-1]
    assert (
        "attribute_threshold" not in reference["init_args"]
    )  # the reference row stays the reference


def test_findings_compare_rows() -> None:
    def row(name: str, map_50: float, fraction: float | None = 0.2) -> study.RunResult:
        return study.RunResult(
            "d",
            fraction,
            name,
            map_50 / 2,
            map_50,
            None,
            10,
            1.0,
            "best.ckpt",
            {"pseudo_precision": 0.5} if "+" in name else {},
        )

    lines = study.findings(
        [row("full", 0.8, None), row("naive", 0.4), row("masked", 0.6), row("masked+teacher", 0.76)]
    )
    assert (
        lines[0] == "- d, fraction 0.2: region-masked beats naive sparse (mAP@.5 0.600 vs 0.400)."
    )
    assert "+0.160 vs masked, 95.0% of full" in lines[1] and "precision 0.500" in lines[1]


@pytest.mark.slow
def test_quick_study_writes_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sparse.md"
    results = study.main(["--quick", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert [r.row for r in results] == ["full", "naive", "masked", "masked+teacher", "masked+self"]
    text = out.read_text()
    assert (
        "| synthetic | 0.2 | masked+teacher |" in text
        and "Command: `python -m research.study" in text
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["results"]) == 5 and all(0.0 <= r["map_50"] <= 1.0 for r in data["results"])
    # The pseudo-label rows were scored against the hidden annotation (data.keep_hidden).
    assert all(r["pseudo"]["pseudo_recall"] >= 0.0 for r in data["results"][3:])
    assert "teacher" in (tmp_path / "runs/synthetic/masked+teacher_f0.2/study.yaml").read_text()


def test_steps_per_dataset_and_whole_field_synthetic() -> None:
    args = study.parse_args(["--datasets", "synthetic", "--synthetic-steps", "7"])
    spec = study.dataset_specs(args)["synthetic"]
    assert spec.max_steps == 7
    assert spec.overrides["data.augmentation.crop_size"] is None  # the model sees whole fields
    assert spec.overrides["data.synthetic.sparse_fraction"] == 0.0  # sparse rows are simulated
    args = study.parse_args(["--datasets", "synthetic", "--max-steps", "5"])
    assert study.dataset_specs(args)["synthetic"].max_steps == 5
    config = study.run_config(args, Path("run"), "teacher", 5)
    assert config["trainer"]["max_steps"] == 5
    # The model is the study's choice, not inherited from the configs' recipe.
    overrides = study.dataset_specs(args)["synthetic"].overrides
    assert overrides["model.detector.readout"] is None
    assert overrides["model.postprocess.max_containment"] is None
    assert overrides["model.loss.cls_loss"] == "focal"
    args = study.parse_args(["--datasets", "synthetic", "--roi-readout"])
    overrides = study.dataset_specs(args)["synthetic"].overrides
    assert overrides["model.detector.readout"] == {"pixel_crop": 0, "crop_classes": False}
    assert overrides["model.postprocess.max_containment"] == 0.5
    with pytest.raises(SystemExit):  # the detector has no direct distances any more
        study.parse_args(["--datasets", "synthetic", "--box-bins", "0"])


def test_rerender_from_json_explains_rows_without_gain(tmp_path: Path) -> None:
    args = study.parse_args(["--datasets", "synthetic", "--synthetic-steps", "9"])

    def row(name: str, map_50: float, fraction: float | None, pseudo: dict) -> dict:
        result = study.RunResult(
            "synthetic", fraction, name, map_50 / 2, map_50, 0.7, 9, 1.0, "best.ckpt", pseudo
        )
        return asdict(result)

    record = {
        "command": "python -m research.study --synthetic-steps 9",
        "machine": "test machine",
        "date": "2026-01-02T03:04",
        "total_s": 60.0,
        "args": vars(args),
        "results": [
            row("full", 0.8, None, {}),
            row("naive", 0.4, 0.2, {}),
            row("masked", 0.6, 0.2, {}),
            row(
                "masked+teacher",
                0.5,
                0.2,
                {"pseudo_per_image": 4.0, "pseudo_precision": 0.75, "pseudo_recall": 0.5},
            ),
            row("masked+self", 0.6, 0.2, {"pseudo_per_image": 0.0}),
        ],
    }
    source = tmp_path / "study.json"
    source.write_text(json.dumps(record))
    out = tmp_path / "sparse.md"
    study.main(["--render-from", str(source), "--out", str(out)])
    text = out.read_text()
    assert "test machine" in text and "2026-01-02T03:04" in text and "synthetic 9" in text
    assert "why (EMA teacher): 4.0 pseudo-labels per image at precision 0.75 recovered 50%" in text
    assert "and 25% of them matched no hidden cell of their class" in text
    assert "why (self-training): no detection passed the score threshold" in text


def test_why_no_gain_tells_errors_from_redundancy() -> None:
    def row(precision: float) -> study.RunResult:
        pseudo = {"pseudo_per_image": 7.6, "pseudo_precision": precision, "pseudo_recall": 0.46}
        return study.RunResult("txl", 0.2, "masked+teacher", 0.3, 0.58, None, 400, 1.0, "b", pseudo)

    assert "already finds" in study.why_no_gain(row(0.95))
    assert "errors cost more" in study.why_no_gain(row(0.4))
    # Precise but clearly worse than masked: a tie explanation would be wrong; say what fell.
    masked = study.RunResult("txl", 0.2, "masked", 0.516, 0.760, 0.633, 1000, 1.0, "b", {})
    worse = study.RunResult(
        "txl",
        0.2,
        "masked+teacher",
        0.428,
        0.691,
        0.548,
        1000,
        1.0,
        "b",
        {"pseudo_per_image": 13.2, "pseudo_precision": 0.93, "pseudo_recall": 0.79},
    )
    text = study.why_no_gain(worse, masked)
    assert "lost 0.069 mAP@.5" in text and "-0.088 mAP" in text and "0.633 -> 0.548" in text
    assert "already finds" not in text
    # Within CLEAR_LOSS of masked it is still read as a tie.
    tie = study.RunResult(
        "txl", 0.2, "masked+teacher", 0.33, 0.579, 0.35, 400, 1.0, "b", worse.pseudo
    )
    assert "already finds" in study.why_no_gain(
        tie, masked=study.RunResult("txl", 0.2, "masked", 0.331, 0.580, 0.439, 400, 1.0, "b", {})
    )


def test_rerender_merges_one_json_per_row(tmp_path: Path) -> None:
    args = study.parse_args(["--datasets", "synthetic", "--budget-minutes", "2"])
    sources = []
    for index, (name, map_50, fraction) in enumerate(
        [("full", 0.8, None), ("masked", 0.6, 0.2), ("masked+teacher", 0.7, 0.2)]
    ):
        result = study.RunResult(
            "synthetic",
            fraction,
            name,
            0.4,
            map_50,
            None,
            100 + index,
            120.0 + index,
            "best.ckpt",
            {},
        )
        record = {
            "command": f"python -m research.study --rows {name}",
            "machine": "gpu machine",
            "date": "2026-01-02T03:04",
            "total_s": 130.0 + index,
            "args": {**vars(args), "runs_dir": f"runs/{name}"},
            "results": [asdict(result)],
        }
        sources.append(tmp_path / f"{name}.json")
        sources[-1].write_text(json.dumps(record))
    out = tmp_path / "merged.md"
    results = study.main(["--render-from", *map(str, sources), "--out", str(out)])
    assert [r.row for r in results] == ["full", "masked", "masked+teacher"]
    text = out.read_text()
    assert "--rows full & python -m research.study --rows masked &" in text
    assert "separate processes" in text and "2.0 min of training per run (`TimeBudget`" in text
    assert "| synthetic | 0.2 | masked+teacher | 0.400 | 0.700 | - | 87.5 |" in text
    assert (
        "- Runs: `runs/full/<dataset>/<row>_f<fraction>/`, `runs/masked/<dataset>/<row>_f"
        "<fraction>/`, `runs/masked+teacher/<dataset>/"
    ) in text
    merged = json.loads(out.with_suffix(".json").read_text())
    assert len(merged["results"]) == 3 and merged["total_s"] == 132.0
    again = tmp_path / "again.md"
    study.main(["--render-from", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.read_text().splitlines()[-1] == text.splitlines()[-1]


def test_budget_runs_follow_the_time_budget() -> None:
    args = study.parse_args(
        ["--datasets", "synthetic", "--budget-minutes", "3", "--validations", "3"]
    )
    config = study.run_config(args, Path("run"), "teacher", 400)
    trainer = config["trainer"]
    assert trainer["max_steps"] == -1 and trainer["val_check_interval"] == {"seconds": 60.0}
    paths = [c["class_path"] for c in trainer["callbacks"]]
    assert "lld_lightning.callbacks.time_budget.TimeBudget" in paths
    # The pseudo-labels start after a fraction of the planned steps, set before the labeller's hook.
    warmup = paths.index("research.callbacks.PseudoWarmupFraction")
    assert warmup < paths.index("lld_lightning.callbacks.pseudo.PseudoLabeller")
    assert trainer["callbacks"][warmup]["init_args"] == {"fraction": args.pseudo_warmup}
    fixed = study.run_config(
        study.parse_args(["--datasets", "synthetic"]), Path("run"), "teacher", 400
    )
    assert not any(c["class_path"].startswith("research.") for c in fixed["trainer"]["callbacks"])


def test_pseudo_warmup_fraction_follows_the_time_budgets_plan() -> None:
    from types import SimpleNamespace

    from lld_lightning.callbacks.pseudo import PseudoLabeller
    from lld_lightning.callbacks.time_budget import TimeBudget
    from research.callbacks import NOT_YET, PseudoWarmupFraction

    budget, labeller = TimeBudget(minutes=1.0), PseudoLabeller(mode="self", warmup_steps=3)
    warmup = PseudoWarmupFraction(0.5)
    trainer = SimpleNamespace(callbacks=[budget, warmup, labeller])
    warmup.on_train_batch_start(trainer, None, None, 0)
    assert labeller.warmup_steps == NOT_YET and not labeller.active(1000)  # no plan yet
    budget.planned_steps = 401
    warmup.on_train_batch_start(trainer, None, None, 0)
    assert labeller.warmup_steps == 200 and labeller.active(200) and not labeller.active(199)
    with pytest.raises(ValueError):
        PseudoWarmupFraction(1.0)


def test_rerender_takes_pseudo_settings_from_the_pseudo_row_and_refuses_other_budgets(
    tmp_path: Path,
) -> None:
    def write(name: str, rows: list[str], argv: list[str]) -> Path:
        args = study.parse_args(["--datasets", "synthetic", *argv])
        results = [
            asdict(study.RunResult("synthetic", 0.2, row, 0.4, 0.6, None, 9, 1.0, "b", {}))
            for row in rows
        ]
        record = {
            "command": name,
            "machine": "m",
            "date": "2026-01-02T03:04",
            "total_s": 1.0,
            "args": vars(args),
            "results": results,
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(record))
        return path

    # The masked row was run with another --threshold (it has no pseudo-labeller); the teacher
    # row with the default: the Budget line must describe the teacher row.
    masked = write("masked", ["masked"], ["--synthetic-steps", "9", "--threshold", "0.9"])
    teacher = write("teacher", ["masked+teacher"], ["--synthetic-steps", "9"])
    out = tmp_path / "merged.md"
    study.main(["--render-from", str(masked), str(teacher), "--out", str(out)])
    assert "teacher threshold 0.6," in out.read_text()
    strict = write("strict", ["masked+teacher"], ["--synthetic-steps", "9", "--threshold", "0.9"])
    with pytest.raises(ValueError, match="--threshold"):
        study.main(["--render-from", str(teacher), str(strict), "--out", str(out)])
    longer = write("longer", ["full"], ["--synthetic-steps", "18"])
    with pytest.raises(ValueError, match="--synthetic-steps.*longer.json: 18"):
        study.main(["--render-from", str(masked), str(longer), "--out", str(out)])


def test_weight_ema_and_out_indices_reach_every_row_and_the_budget_line() -> None:
    args = study.parse_args(
        [
            "--datasets",
            "synthetic",
            "--weight-ema",
            "0.998",
            "--weight-ema-ramp",
            "300",
            "--out-indices",
            "1",
            "2",
            "3",
            "4",
            "--box-bins",
            "17",
        ]
    )
    overrides = study.dataset_specs(args)["synthetic"].overrides
    assert overrides["model.detector.out_indices"] == [1, 2, 3, 4]
    assert overrides["model.detector.box_bins"] == 17
    for pseudo_mode in (None, "teacher"):
        callbacks = study.run_config(args, Path("run"), pseudo_mode, 10)["trainer"]["callbacks"]
        ema = [c for c in callbacks if c["class_path"] == "lld_lightning.callbacks.ema.WeightEma"]
        assert ema == [
            {
                "class_path": "lld_lightning.callbacks.ema.WeightEma",
                "init_args": {"decay": 0.998, "ramp_steps": 300.0},
            }
        ]
    result = study.RunResult("synthetic", None, "full", 0.4, 0.8, None, 10, 1.0, "best.ckpt", {})
    text = study.render([result], args, "cmd", 60.0, "machine", "2026-01-01T00:00")
    assert "EMA of its weights (decay 0.998, ramp 300 steps)" in text
    assert (
        "(no pretraining), stages [1, 2, 3, 4] into the pyramid, box sides as distributions over "
        "17 distances (distribution focal loss); validation" in text
    )
    default_args = study.parse_args(["--datasets", "synthetic"])
    default = study.render([result], default_args, "cmd", 60.0, "machine", "d")
    assert "EMA of its weights" not in default
    assert "(no pretraining), box sides as distributions over 17 distances" in default
    callbacks = study.run_config(default_args, Path("run"), None, 10)["trainer"]["callbacks"]
    assert not any(c["class_path"].endswith("WeightEma") for c in callbacks)


def test_rerender_of_a_record_from_before_box_bins_says_direct_distances(tmp_path: Path) -> None:
    # Records written before --box-bins existed were measured with direct distances.
    args = vars(study.parse_args(["--datasets", "synthetic", "--synthetic-steps", "9"]))
    args.pop("box_bins")
    result = study.RunResult("synthetic", None, "full", 0.4, 0.8, None, 9, 1.0, "best.ckpt", {})
    record = {
        "command": "c",
        "machine": "m",
        "date": "2026-01-02T03:04",
        "total_s": 1.0,
        "args": args,
        "results": [asdict(result)],
    }
    source = tmp_path / "old.json"
    source.write_text(json.dumps(record))
    out = tmp_path / "old.md"
    study.main(["--render-from", str(source), "--out", str(out)])
    assert "(no pretraining); validation" in out.read_text()
    record["args"]["box_bins"] = 17
    source.write_text(json.dumps(record))
    study.main(["--render-from", str(source), "--out", str(out)])
    assert "box sides as distributions over 17 distances" in out.read_text()
