"""`lld fit` then `lld test` under 2-process CPU DDP (gloo): synced metrics, one checkpoint
writer, no warning flood.

Lightning's DDP launcher re-runs the command line for rank 1, so the run is a subprocess: a small
wrapper around `lld_lightning.cli.main` runs ``fit`` and then ``test`` (from the fit's
``last.ckpt``) in the same two ranks, which saves a second launch, and writes what each rank saw
to JSON files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")

#: Runs each command of ``commands.json`` (``{last_ckpt}`` = the fit's last checkpoint) and writes
#: ``<subcommand>_rank<r>.json``: the callback metrics, the test results, the images this rank
#: evaluated, ModelCheckpoint's view and the global steps of the checkpoints this rank serialised
#: (a checkpoint write goes through ``torch.save`` whatever the CheckpointIO). The command line is
#: set in ``sys.argv`` because the launcher starts rank 1 from it.
WRAPPER = '''
import json, sys

import torch

from lld_lightning.cli import main
from lld_lightning.metrics import DomainMetrics

saved_steps, images_seen = [], [0]
torch_save, domain_update = torch.save, DomainMetrics.update


def recording_save(obj, *args, **kwargs):
    if isinstance(obj, dict) and "state_dict" in obj:
        saved_steps.append(int(obj.get("global_step", -1)))
    return torch_save(obj, *args, **kwargs)


def counting_update(self, preds, targets, domains):
    images_seen[0] += len(preds)
    return domain_update(self, preds, targets, domains)


torch.save, DomainMetrics.update = recording_save, counting_update
last_ckpt = ""
for command in json.load(open("commands.json")):
    saved_steps.clear()
    images_seen[0] = 0
    sys.argv = [sys.argv[0], *(arg.replace("{last_ckpt}", last_ckpt) for arg in command)]
    cli = main()
    trainer, checkpoint = cli.trainer, cli.trainer.checkpoint_callback
    score = None if checkpoint is None else checkpoint.best_model_score
    if command[0] == "fit":
        last_ckpt = checkpoint.last_model_path
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "images_seen": images_seen[0],
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "test_results": cli.model.test_results,
        "saved_steps": list(saved_steps),
        "monitor": None if checkpoint is None else checkpoint.monitor,
        "best_model_score": None if score is None else float(score),
        "last_model_path": "" if checkpoint is None else checkpoint.last_model_path,
    }
    with open(f"{command[0]}_rank{trainer.global_rank}.json", "w") as handle:
        json.dump(report, handle)
'''

#: The first line of a printed warning: ``file.py:line: [SomeWarning: ]message`` (Lightning
#: leaves the category out of the warnings its own files raise).
WARNING_LINE = re.compile(r"^\S+\.py:\d+: ", re.MULTILINE)

#: Warnings a 2-process fit and test may print (Lightning's note that DistributedSampler repeats
#: samples in `trainer.test`, deprecations printed once per process). A flood is one warning per
#: logged key: 175 per stage with the tiny config's 4 domains.
MAX_WARNINGS = 12


def run_ddp(workdir: Path, commands: list[list[str]]) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Run the ``lld`` commands on 2 CPU processes: each command's two rank reports, and stderr."""
    common = [
        "--config", TINY,
        "--data.synthetic.dir", str(workdir / "data"),
        "--trainer.default_root_dir", str(workdir / "run"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]
    (workdir / "commands.json").write_text(json.dumps([[c[0], *common, *c[1:]] for c in commands]))
    script = workdir / "ddp_wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("PYTHONWARNINGS", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK",
                 "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED"):
        env.pop(name, None)  # a warnings filter would hide the flood; a DDP variable would hang
    # Rank 1 is rank 0's child and shares its pipes: reading them to the end waits for both.
    process = subprocess.Popen([sys.executable, str(script)], cwd=workdir, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, f"DDP run failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    reports = {
        c[0]: [json.loads((workdir / f"{c[0]}_rank{rank}.json").read_text()) for rank in (0, 1)]
        for c in commands
    }
    return reports, stderr


def stage_metrics(report: dict[str, Any], stage: str) -> dict[str, float]:
    return {k: v for k, v in report["callback_metrics"].items() if k.startswith(f"{stage}/")}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """A tiny 2-process fit (one step, one validation batch per rank), then test from its
    last.ckpt. The checkpoint monitors the image count: unlike an mAP of a one-step model it
    differs between a rank's own value and the synced one."""
    workdir = tmp_path_factory.mktemp("ddp")
    return run_ddp(workdir, [
        ["fit", "--checkpoint.monitor", "val/num_images", "--checkpoint.mode", "max"],
        ["test", "--ckpt_path", "{last_ckpt}"],
    ])


def test_ddp_fit_syncs_validation_and_the_checkpoint_monitor(ddp_run) -> None:
    reports, _ = ddp_run
    rank0, rank1 = reports["fit"]
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert rank0["global_step"] == rank1["global_step"] > 0
    val0, val1 = stage_metrics(rank0, "val"), stage_metrics(rank1, "val")
    assert {"val/map_50", "val/loss", "val/attr/mean_f1"} <= set(val0)
    # Each rank evaluated its own share; every logged value is over both shares, on both ranks.
    assert rank0["images_seen"] > 0 and rank1["images_seen"] > 0
    assert val0["val/num_images"] == rank0["images_seen"] + rank1["images_seen"]
    assert val0 == val1
    # ModelCheckpoint decides on each rank from the value that rank reads: the synced one.
    assert rank0["monitor"] == rank1["monitor"] == "val/num_images"
    assert rank0["best_model_score"] == rank1["best_model_score"] == val0["val/num_images"]
    # Rank 0 alone serialises checkpoints; the last one holds the run's last step.
    assert rank1["saved_steps"] == []
    assert rank0["saved_steps"] and max(rank0["saved_steps"]) == rank0["global_step"]
    assert rank0["last_model_path"] == rank1["last_model_path"]
    assert Path(rank0["last_model_path"]).is_file()


def test_ddp_test_after_fit_gives_the_same_synced_metrics_on_both_ranks(ddp_run) -> None:
    reports, _ = ddp_run
    rank0, rank1 = reports["test"]
    results = rank0["test_results"]
    assert results == rank1["test_results"]
    assert len({key.split("/")[0] for key in results} - {"all"}) >= 2  # per-domain keys too
    assert rank0["images_seen"] > 0 and rank1["images_seen"] > 0
    assert results["all/num_images"] == rank0["images_seen"] + rank1["images_seen"]
    # What Lightning logged (what callbacks and loggers read) is the synced value, on each rank.
    for report in (rank0, rank1):
        logged = stage_metrics(report, "test")
        assert len(logged) == len(results)
        assert logged["test/num_images"] == results["all/num_images"]
        assert logged["test/map_50"] == pytest.approx(results["all/map_50"])
    assert rank0["saved_steps"] == rank1["saved_steps"] == []


def test_ddp_fit_and_test_print_no_warning_flood(ddp_run) -> None:
    _, stderr = ddp_run
    assert "sync_dist" not in stderr, "an epoch-level value was logged without sync_dist under DDP"
    warnings = [line for line in stderr.splitlines() if WARNING_LINE.match(line)]
    assert len(warnings) <= MAX_WARNINGS, "\n".join(warnings)
