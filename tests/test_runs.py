"""One folder per run: `lld fit` never overwrites an earlier run, `latest` names the newest,
`last.ckpt` holds the final state, `lld test` files its results with the run, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lld_lightning.callbacks.checkpoint import (
    LATEST,
    TEST_RESULTS,
    atomic_save,
    claim_run_folder,
    discard_unstarted_run,
    latest_run,
    point_latest,
    remove_stale_temp_files,
    run_folder_of,
)
from lld_lightning.cli import main
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def _args(root: Path, data: Path) -> list[str]:
    return [
        "--config",
        TINY,
        "--data.synthetic.dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
    ]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def two_fits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str], int]:
    """Two fits into one root: the first as tiny.yaml has it (one epoch of 2 steps); the second 5
    steps over three epochs, monitoring a value that never improves after the first validation
    and stopping inside the third epoch. Returns the root, the data folder, the first run's file
    digests as they were before the second fit, and the second fit's last step."""
    work = tmp_path_factory.mktemp("runs")
    root, data = work / "runs", work / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", *_args(root, data)])
        first = {p.name: _digest(p) for p in (root / "version_0" / "checkpoints").iterdir()}
        second = main(
            [
                "fit",
                *_args(root, data),
                "--trainer.max_epochs",
                "3",
                "--trainer.max_steps",
                "5",
                # The number of val images is the same at every validation: only the first is "best".
                "--checkpoint.monitor",
                "val/num_images",
            ]
        )
    return root, data, first, int(second.trainer.global_step)


def test_each_fit_writes_its_own_folder_and_latest_names_the_newest(two_fits) -> None:
    root, _, first, _ = two_fits
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "version_0", "version_1"]
    assert (root / LATEST).is_symlink() and latest_run(root) == (root / "version_1").resolve()
    for run in ("version_0", "version_1"):
        folder = root / run
        assert (folder / "config.yaml").is_file()
        assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
        assert (folder / "metrics.csv").is_file() and (folder / "hparams.yaml").is_file()
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    # The second fit left the first run's checkpoints as they were.
    assert {p.name: _digest(p) for p in (root / "version_0" / "checkpoints").iterdir()} == first


def test_last_checkpoint_is_the_final_state_and_best_follows_the_monitor(two_fits) -> None:
    root, _, _, final_step = two_fits
    checkpoints = root / "version_1" / "checkpoints"
    assert final_step == 5
    assert _step(checkpoints / "last.ckpt") == final_step  # saved at the end of fit, mid-epoch
    assert _step(checkpoints / "best.ckpt") == 2  # the first validation; later ones only tie


def test_test_writes_its_results_into_the_run_of_the_checkpoint(two_fits, capsys) -> None:
    root, data, _, _ = two_fits
    cli = main(
        ["test", *_args(root, data), "--ckpt_path", str(root / "version_0/checkpoints/best.ckpt")]
    )
    written = json.loads((root / "version_0" / TEST_RESULTS).read_text())
    assert written == pytest.approx(cli.model.test_results, nan_ok=True) and "all/map_50" in written
    assert not (
        root / "version_1" / TEST_RESULTS
    ).exists()  # the run of the checkpoint, not the latest
    # The command made no run folder, log or config of its own, and did not warn about the fit's callbacks.
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "version_0", "version_1"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Be aware" not in err and "dirpath has changed" not in err


def test_ckpt_path_best_and_last_name_the_latest_run(two_fits, monkeypatch) -> None:
    from lld_lightning.cli import LldCLI

    root, data, _, _ = two_fits
    monkeypatch.setattr(LldCLI, "_run_subcommand", lambda self, subcommand: None)
    for name in ("best", "last"):
        cli = main(["test", *_args(root, data), "--ckpt_path", name])
        assert (
            Path(cli.config["test"]["ckpt_path"])
            == (root / "version_1" / "checkpoints" / f"{name}.ckpt").resolve()
        )
        assert cli.run_dir == (root / "version_1").resolve()


def test_fast_dev_run_writes_no_checkpoint_and_no_run_folder(two_fits) -> None:
    root, data, _, _ = two_fits
    before = {p: _digest(p) for p in root.rglob("*.ckpt")}
    main(["fit", *_args(root, data), "--trainer.fast_dev_run", "1"])
    assert {p: _digest(p) for p in root.rglob("*.ckpt")} == before
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "version_0", "version_1"]
    assert latest_run(root) == (root / "version_1").resolve()


def test_a_fit_that_fails_before_writing_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad" / "H_100x_C1"
    for kind in ("images", "labels"):
        (bad / kind / "train").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(bad / "images" / "train" / "a.png")
    (bad / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2\n")
    root = tmp_path / "runs"
    claim_run_folder(root)  # an earlier run
    point_latest(root, root / "version_0")
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                TINY,
                "--data.root",
                str(tmp_path / "bad"),
                "--trainer.default_root_dir",
                str(root),
            ]
        )
    assert "data error" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "version_0"]
    assert latest_run(root) == (root / "version_0").resolve()


def test_run_folder_helpers(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "version_3").mkdir(parents=True)
    (root / "version_x").mkdir()
    assert claim_run_folder(root).name == "version_4"
    assert claim_run_folder(root).name == "version_5"
    point_latest(root, root / "version_4")
    assert os.readlink(root / LATEST) == "version_4"
    # One rename: no temp link stays behind.
    assert sorted(p.name for p in root.iterdir()) == [
        LATEST,
        "version_3",
        "version_4",
        "version_5",
        "version_x",
    ]
    ckpt = root / "version_4" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    assert (
        run_folder_of(root / LATEST / "checkpoints" / "last.ckpt") is None
    )  # no config.yaml: not a run
    (root / "version_4" / "config.yaml").write_text("{}\n")
    assert (
        run_folder_of(root / LATEST / "checkpoints" / "last.ckpt") == (root / "version_4").resolve()
    )
    assert run_folder_of(tmp_path / "elsewhere.ckpt") is None
    point_latest(root, root / "version_5")
    assert discard_unstarted_run(root / "version_5", root) and not (root / "version_5").exists()
    assert latest_run(root) == (root / "version_4").resolve()
    assert not discard_unstarted_run(root / "version_4", root)  # it holds a config and a checkpoint


def test_atomic_save_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)
    atomic_save({"step": torch.tensor(2)}, path)
    assert int(torch.load(path, weights_only=True)["step"]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"bad": Unpicklable()}, path)
    assert int(torch.load(path, weights_only=True)["step"]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


#: Saves checkpoint 1 atomically, then checkpoint 2 with a torch.save that stops half-way through
#: the temp file (as a process killed during a save does) and waits to be killed.
KILLED_WRITER = """
import io, os, sys, time
from pathlib import Path
import torch
from lld_lightning.callbacks.checkpoint import atomic_save

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
atomic_save({"step": torch.tensor(1), "weights": torch.ones(1000)}, path)
original = torch.save

def half_then_stall(obj, handle):
    buffer = io.BytesIO()
    original(obj, buffer)
    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    handle.flush()
    marker.write_text(handle.name)
    time.sleep(600)

torch.save = half_then_stall
atomic_save({"step": torch.tensor(2), "weights": torch.zeros(1000)}, path)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path, marker, tmpdir = (
        tmp_path / "ckpts" / "last.ckpt",
        tmp_path / "marker",
        tmp_path / "tmpdir",
    )
    tmpdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer never reached the second save"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    # The temp file was in the destination folder, never in TMPDIR; the checkpoint is the first one.
    temp = Path(marker.read_text())
    assert temp.parent == path.parent and temp.exists() and not any(tmpdir.iterdir())
    assert int(torch.load(path, weights_only=True)["step"]) == 1
    assert remove_stale_temp_files(path.parent) == [temp]
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
