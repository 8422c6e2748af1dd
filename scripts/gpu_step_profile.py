"""Where a training step's time goes: host (Python + kernel launches) or device (kernels).

For each batch size, on one real augmented batch of a config's data (already on the device):
wall milliseconds per step (augmentation, forward, loss, backward, AdamW step; synchronised only
after the last of ``--steps`` steps, as in training), the device's kernel time per step from
torch.profiler, their ratio (how busy the device is), the most expensive kernels, the number of kernel launches (or of CPU
ops without a GPU) and the host syncs per step (stream synchronisations; on a CPU the ``item``/``nonzero`` calls).
A ratio well below 1 means the step is bound by the host: a larger batch then costs almost
nothing per step.

    python scripts/gpu_step_profile.py --config configs/txl.yaml --data.root .txl/txl_pbc \\
        --image-size 640 --batch-sizes 16 64 --model '{"detector": {"fpn_channels": 128, "head_convs": 2}}'

No Lightning trainer runs; the model (`LldModule`) and the data (`LldDataModule`) are built by
`lld`'s own parser from the config (plus the overrides given here), as ``lld fit`` builds them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from unittest.mock import patch

import torch
from torch.profiler import ProfilerActivity, profile

from lld_lightning.cli import LldCLI
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.sample import collate
from lld_lightning.module import LldModule
from lld_lightning.tools.benchmark import to_device

#: Profiler rows that are host syncs on a CPU-only machine.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def model_flags(overrides: dict[str, Any]) -> list[str]:
    """``--model.*`` flags from a mapping over the config's model section: a top-level key, or
    one field of a mapping-valued key (a component: ``{"detector": {"backbone": "resnet34"}}``
    gives ``--model.detector.backbone resnet34``); deeper mappings are JSON values."""
    flags = []

    def add(path: str, value: Any) -> None:
        flags.extend([f"--model.{path}", value if isinstance(value, str) else json.dumps(value)])

    for key, value in overrides.items():
        if isinstance(value, dict):
            for field, field_value in value.items():
                add(f"{key}.{field}", field_value)
        else:
            add(key, value)
    return flags


def build(
    batch_size: int, overrides: dict[str, Any], args: argparse.Namespace
) -> tuple[LldModule, LldDataModule]:
    """The model and data of ``args.config`` with ``overrides``, built by `lld`'s parser."""
    lld_args = [
        "--config",
        args.config,
        "--data.image_size",
        str(args.image_size),
        "--data.batch_size",
        str(batch_size),
        "--data.num_workers",
        "0",
        # The whole field letterboxed to --image-size, as the speed protocol has always measured.
        "--data.pixel_size.working",
        "null",
        "--trainer.logger",
        "false",
        *(["--data.root", args.root] if args.root else []),
        *model_flags(overrides),
    ]
    # This script's own argv is not LightningCLI's (it warns when it sees both).
    with patch.object(sys, "argv", sys.argv[:1]):
        cli = LldCLI(LldModule, LldDataModule, args=lld_args, run=False)
    return cli.model, cli.datamodule


def measure(
    batch_size: int, overrides: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """One batch size and model (``overrides``: JSON over the config's model section, see
    `model_flags`): timings, kernel share, launches, syncs, peak memory and top kernels."""
    model_overrides = json.loads(overrides)
    module, datamodule = build(batch_size, model_overrides, args)
    datamodule.prepare_data()  # the built-in synthetic data is generated on first use
    datamodule.setup("fit")
    samples = [datamodule.train_set[i % len(datamodule.train_set)] for i in range(batch_size)]
    cpu_batch = collate(samples)
    module = module.to(device)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        batch = datamodule.train_augmentation(to_device(cpu_batch, device))
        with autocast:
            loss = module.training_loss(batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall_ms = 1000 * (time.perf_counter() - start) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    events = prof.key_averages()
    if device.type == "cuda":
        timed = [(e.key, e.self_device_time_total) for e in events if e.device_type.name == "CUDA"]
        launches = sum(
            e.count
            for e in events
            if e.key
            in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
        )
        # A host sync on a GPU is a stream/device synchronise.
        syncs = sum(
            e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
        )
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
        # On a CPU count the ops that would sync (the optimizer's CPU step counters add their
        # `item` calls here).
        syncs = sum(e.count for e in events if e.key in SYNC_OPS)
    device_ms = sum(us for _, us in timed) / 1000 / 3
    top = [
        [name[:80], round(us / 1000 / 3, 2)]
        for name, us in sorted(timed, key=lambda t: -t[1])[: args.top]
    ]
    row = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "image_size": args.image_size,
        "model": model_overrides,
        "batch": batch_size,
        "wall_ms_per_step": round(wall_ms, 1),
        "device_ms_per_step": round(device_ms, 1),
        "device_busy": round(device_ms / wall_ms, 2),
        "images_per_s": round(batch_size / wall_ms * 1000, 1),
        "launches_per_step": launches // 3,
        "syncs_per_step": syncs // 3,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
        "top_ms_per_step": top,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    """One JSON line per model and batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/txl.yaml", help="the lld config to build from")
    parser.add_argument(
        "--data.root", dest="root", default=None, help="the dataset folder (default: the config's)"
    )
    parser.add_argument("--image-size", type=int, default=640, help="the training input side")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[16, 64], help="batch sizes to measure"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed training steps per measurement"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="JSON overrides of the config's model section, e.g. "
        '\'{"detector": {"backbone": "resnet34"}, "channels_last": true}\'; repeat to compare '
        "models (each is measured at every batch size)",
    )
    parser.add_argument(
        "--precision", choices=["bf16", "32"], default="bf16", help="autocast dtype of the step"
    )
    parser.add_argument(
        "--top", type=int, default=12, help="the most expensive kernels (ops) listed"
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick its fastest kernels, as `--trainer.benchmark true` does in training",
    )
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for overrides in args.model or ["{}"]:
        for batch_size in args.batch_sizes:
            print(json.dumps(measure(batch_size, overrides, args, device)), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
