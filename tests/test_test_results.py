"""`lld test` saves its results in the run folder: results.json, PNG plots, extra printed tables."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from lld_lightning.cli import main
from lld_lightning.metrics.results import RESULTS_JSON
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
LAST = "run/latest/checkpoints/last.ckpt"


def _args(workdir: Path) -> list[str]:
    return [
        "--config",
        TINY,
        "--data.synthetic.dir",
        str(workdir / "data"),
        "--trainer.default_root_dir",
        str(workdir / "run"),
    ]


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory):
    """One tiny fit, then `lld test` of its last checkpoint: (workdir, cli, printed output)."""
    workdir = tmp_path_factory.mktemp("tested")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["fit", *_args(workdir)])
        console = Console(record=True, width=200)
        mp.setattr("lld_lightning.module.Console", lambda: console)
        cli = main(["test", *_args(workdir), "--ckpt_path", str(workdir / LAST)])
    return workdir, cli, console.export_text()


def test_results_json_holds_the_logged_metrics(tested) -> None:
    workdir, cli, _ = tested
    run = (workdir / "run" / "version_0").resolve()
    flat = cli.model.test_results
    assert json.loads((run / "test_results.json").read_text()) == pytest.approx(flat)
    doc = json.loads((run / RESULTS_JSON).read_text())
    assert doc["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert doc["date"].startswith("20") and doc["date"].endswith("+00:00")
    assert doc["classes"] == cli.model.class_names
    assert list(doc["attributes"]) == list(cli.model.attribute_spec)
    assert set(doc["domains"]) == set(cli.datamodule.test_domains)
    # Every number of results.json is a logged one, and every logged one is in results.json.
    seen = set()
    for scope, entry in [("all", doc["overall"]), *doc["domains"].items()]:
        scalars = {
            "num_images": "num_images",
            "map": "map",
            "map_50": "map_50",
            "map_75": "map_75",
            "attribute_mean_accuracy": "attr/mean_accuracy",
            "attribute_mean_f1": "attr/mean_f1",
            "matched_fraction": "attr/matched_fraction",
        }
        for name, key in scalars.items():
            if name in entry:
                assert entry[name] == flat[f"{scope}/{key}"], (scope, name)
                seen.add(f"{scope}/{key}")
        for cls, ap in entry["ap_per_class"].items():
            assert ap == flat[f"{scope}/ap/{cls}"]
            seen.add(f"{scope}/ap/{cls}")
        for cls, ap in entry["ap50_per_class"].items():
            assert ap == flat[f"{scope}/ap50/{cls}"]
            seen.add(f"{scope}/ap50/{cls}")
        for attr, values in entry["attributes"].items():
            for metric in ("accuracy", "f1"):
                if metric in values:
                    assert values[metric] == flat[f"{scope}/attr/{attr}/{metric}"]
                    seen.add(f"{scope}/attr/{attr}/{metric}")
            k = cli.model.attribute_spec[attr]
            matrix = values["confusion"]
            assert len(matrix) == k and all(len(row) == k for row in matrix)
        assert entry["num_images"] >= 1
    assert seen == set(flat)
    total = doc["overall"]["num_images"]
    assert total == sum(entry["num_images"] for entry in doc["domains"].values())


def test_plots_are_valid_pngs(tested) -> None:
    workdir, cli, _ = tested
    plots = workdir / "run" / "version_0" / "plots"
    names = {"pr_curves.png", "domain_map.png"}
    names |= {f"confusion_{a}.png" for a in cli.model.attribute_spec}
    assert {p.name for p in plots.iterdir()} == names
    for name in names:
        with Image.open(plots / name) as image:
            image.verify()
        with Image.open(plots / name) as image:
            assert image.format == "PNG"
            assert 250 <= image.width <= 2000 and 250 <= image.height <= 2000


def test_no_minus_one_is_logged_for_a_class_absent_from_a_domain(tested) -> None:
    workdir, cli, _ = tested
    flat = cli.model.test_results
    domains = cli.datamodule.test_domains
    absent = [(d, c) for d in domains for c in cli.model.class_names if f"{d}/ap/{c}" not in flat]
    assert absent, "the tiny test set should leave some class out of some domain"
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    assert logged and all(v != -1.0 for v in logged.values())
    for domain, cls in absent:
        assert f"test/{domain}/ap/{cls}" not in logged
    with open(workdir / "run" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # The fit's validation went through the same logging: its CSV columns hold no -1 either.
    val_cells = [v for row in rows for k, v in row.items() if k.startswith("val/") and v]
    assert val_cells and all(float(v) != -1.0 for v in val_cells)


def test_printed_tables_show_ap_per_class_and_attribute_f1(tested) -> None:
    _, cli, printed = tested
    assert "lld test: per-domain results" in printed
    assert "AP per class" in printed and "Attributes (accuracy / macro-F1)" in printed
    flat = cli.model.test_results
    present = [c for c in cli.model.class_names if f"all/ap/{c}" in flat]
    assert present
    lines = printed.splitlines()
    for cls in present:
        row = next(line for line in lines if line.strip("│┃ ").startswith(f"{cls} "))
        assert f"{flat[f'all/ap/{cls}']:.3f}" in row
    for attr in cli.model.attribute_spec:
        assert any(line.strip("│┃ ").startswith(attr) for line in lines), attr


def test_python_api_test_writes_nothing(tested, tmp_path: Path) -> None:
    import lightning as L

    from lld_lightning.module import LldModule

    workdir, cli, _ = tested
    model = LldModule.load_from_checkpoint(workdir / LAST, weights_only=True)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        limit_test_batches=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
    )
    trainer.test(model, datamodule=cli.datamodule, verbose=False)
    assert model.test_results and model.test_details is not None
    assert list(tmp_path.iterdir()) == []


def test_results_say_what_was_tested_and_a_test_on_other_data_keeps_the_earlier_one(
    tested, tmp_path: Path
) -> None:
    workdir, cli, _ = tested
    said: list[str] = []
    run = tmp_path / "run" / "version_0"
    shutil.copytree((workdir / "run" / "version_0").resolve(), run)
    first = json.loads((run / RESULTS_JSON).read_text())
    assert first["data"] == {
        "root": os.path.realpath(cli.datamodule.data_root),
        "split": cli.datamodule.splits.test,
        "domains": None,
    }
    domain = sorted(first["domains"])[0]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    one = ["test", *_args(workdir), "--ckpt_path", ckpt, "--data.domains.test", f"[{domain}]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setattr("lld_lightning.cli.rank_zero_info", said.append)
        main(one)
    # The earlier test (all domains) is kept under tests/<its date>/, whole.
    (kept,) = (run / "tests").iterdir()
    assert json.loads((kept / RESULTS_JSON).read_text()) == first
    assert (kept / "test_results.json").is_file() and (kept / "plots" / "pr_curves.png").is_file()
    assert any(f"moved to {kept}" in line for line in said)
    second = json.loads((run / RESULTS_JSON).read_text())
    assert second["data"]["domains"] == [domain] and set(second["domains"]) == {domain}
    # The same test again replaces its own results: nothing more is kept.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(one)
    assert len(list((run / "tests").iterdir())) == 1
