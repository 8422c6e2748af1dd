"""A fit killed with SIGKILL in the middle of writing a checkpoint resumes from the previous one,
in the same run folder, and ends with the weights (so the metrics) of the uninterrupted fit."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lld_lightning.callbacks.checkpoint import LATEST, read_checkpoint
from lld_lightning.cli import LldCLI, main
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.module import LldModule
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
#: Two epochs of two steps, a validation and a last.ckpt at each epoch end (steps 2 and 4).
EPOCHS = 2


class StallWhileSaving(Callback):
    """For the killed fit: the write of ``last.ckpt`` at global step ``step`` stops half-way
    through its temp file, as a process killed during a save does, names that file in ``marker``
    and waits to be killed.

    Args:
        step: the global step whose last.ckpt write stalls.
        marker: the file to write the temp file's path into once stalled.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        original = torch.save

        def stall(obj, handle, *args, **kwargs):
            name = str(getattr(handle, "name", ""))
            if (
                isinstance(obj, dict)
                and obj.get("global_step") == self.step
                and ".last.ckpt." in name
            ):
                buffer = io.BytesIO()
                original(obj, buffer)
                handle.write(buffer.getvalue()[: buffer.tell() // 2])
                handle.flush()
                Path(self.marker).write_text(name)
                time.sleep(600)
            return original(obj, handle, *args, **kwargs)

        torch.save = stall


def _args(root: Path, data: Path) -> list[str]:
    return [
        "--config", TINY, "--data.synthetic.dir", str(data), "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_a_fit_killed_during_a_save_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, whole_root, killed_root, marker = (
        tmp_path / "data",
        tmp_path / "whole",
        tmp_path / "killed",
        tmp_path / "marker",
    )
    monkeypatch.chdir(tmp_path)
    # The data first, so that the two fits below do not both generate it.
    LldCLI(
        LldModule,
        LldDataModule,
        run=False,
        args=[*_args(whole_root, data), "--trainer.logger", "false"],
    ).datamodule.prepare_data()
    # The killed fit runs `lld fit` in a process of its own, with this process's thread count (so
    # that its arithmetic is this process's), and stalls in the middle of its last save.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    stall = json.dumps(
        [
            {
                "class_path": "tests.test_resume.StallWhileSaving",
                "init_args": {"step": 2 * EPOCHS, "marker": str(marker)},
            }
        ]
    )
    killed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lld_lightning.cli",
            "fit",
            *_args(killed_root, data),
            "--trainer.callbacks",
            stall,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        whole = main(["fit", *_args(whole_root, data)])  # meanwhile, the uninterrupted fit
        deadline = time.monotonic() + 600
        while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (
            f"the fit never stalled in its save: {killed.communicate()[1][-3000:]}"
        )
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
        killed.communicate()

    folder = killed_root / "version_0"
    checkpoints = folder / "checkpoints"
    orphan = Path(marker.read_text())
    # The kill left the cut temp file next to the previous, whole last.ckpt (the first epoch's).
    assert orphan.parent == checkpoints.resolve() and orphan.exists()
    assert read_checkpoint(checkpoints / "last.ckpt", resume=True)["global_step"] == 2

    resumed = main(
        [
            "fit",
            *_args(killed_root, data),
            "--ckpt_path",
            str(killed_root / LATEST / "checkpoints" / "last.ckpt"),
        ]
    )
    # The same run folder, continued from the checkpoint's step; the orphan is gone.
    assert sorted(p.name for p in killed_root.iterdir()) == [LATEST, "version_0"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    with open(folder / "metrics.csv", newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps and max(steps) >= 2 * EPOCHS - 1  # one file, continued

    # Same final step, bit-identical weights, and so the same metrics, as the uninterrupted fit.
    assert whole.trainer.global_step == resumed.trainer.global_step == 2 * EPOCHS
    final = {
        name: torch.load(
            root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True
        )
        for name, root in (("whole", whole_root), ("resumed", killed_root))
    }
    assert final["whole"]["global_step"] == final["resumed"]["global_step"] == 2 * EPOCHS
    assert final["whole"]["state_dict"].keys() == final["resumed"]["state_dict"].keys()
    for key, value in final["whole"]["state_dict"].items():
        torch.testing.assert_close(
            final["resumed"]["state_dict"][key], value, rtol=0, atol=0, msg=key
        )
    metrics = [
        {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        for cli in (whole, resumed)
    ]
    assert "val/map_50" in metrics[0] and metrics[1] == pytest.approx(
        metrics[0], rel=0, abs=0, nan_ok=True
    )
