"""Where a training step's time goes: host (Python + kernel launches) or device (kernels).

For each batch size, on one real augmented batch of a config's data (already on the device):
wall milliseconds per step (augmentation, forward, loss, backward, AdamW step; synchronised only
after the last of ``--steps`` steps, as in training), the device's kernel time per step from
torch.profiler, their ratio (how busy the device is), the most expensive kernels, the number of kernel launches (or of CPU
ops without a GPU) and the host syncs per step (stream synchronisations; on a CPU the ``item``/``nonzero`` calls).
A ratio well below 1 means the step is bound by the host: a larger batch then costs almost
nothing per step.

    python scripts/gpu_step_profile.py --config configs/txl.yaml --data.root .txl/txl_pbc \\
        --image-size 640 --batch-sizes 16 64 --model '{"fpn_channels": 128, "head_convs": 2}'

No Lightning trainer is involved; the model is `LldModule` and the data `LldDataModule`, built
from the config's ``model`` and ``data`` sections (plus the overrides given here).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from lld_lightning.benchmark import to_device
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.sample import collate
from lld_lightning.module import LldModule

#: Profiler rows that are host syncs on a CPU-only machine.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def measure(
    batch_size: int, overrides: str, args: argparse.Namespace, config: dict, device: torch.device
) -> dict:
    """One batch size and model (``overrides``: JSON over the config's model section): timings,
    kernel share, launches, syncs, peak memory and top kernels."""
    data = dict(config["data"], image_size=args.image_size, batch_size=batch_size, num_workers=0)
    if args.root:
        data["root"] = args.root
    datamodule = LldDataModule(**data)
    datamodule.setup("fit")
    samples = [datamodule.train_set[i % len(datamodule.train_set)] for i in range(batch_size)]
    cpu_batch = collate(samples)
    model_args = dict(config["model"], **json.loads(overrides))
    module = LldModule(
        num_classes=datamodule.num_classes,
        attribute_spec=datamodule.attribute_spec,
        class_names=datamodule.class_names,
        **model_args,
    ).to(device)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> None:
        batch = datamodule.train_augmentation(to_device(cpu_batch, device))
        with autocast:
            outputs = module(batch["image"])
            loss = module.weighted_loss(module.criterion(outputs, batch))
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
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                            "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        # A host sync on a GPU is a stream/device synchronise.
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
        launches = sum(e.count for e in events if e.key.startswith("aten::"))
        # On a CPU count the ops that would sync (the optimizer's CPU step counters add their
        # `item` calls here).
        syncs = sum(e.count for e in events if e.key in SYNC_OPS)
    device_ms = sum(us for _, us in timed) / 1000 / 3
    top = [[name[:80], round(us / 1000 / 3, 2)] for name, us in sorted(timed, key=lambda t: -t[1])[: args.top]]
    row = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "image_size": args.image_size,
        "model": model_args,
        "batch": batch_size,
        "wall_ms_per_step": round(wall_ms, 1),
        "device_ms_per_step": round(device_ms, 1),
        "device_busy": round(device_ms / wall_ms, 2),
        "images_per_s": round(batch_size / wall_ms * 1000, 1),
        "launches_per_step": launches // 3,
        "syncs_per_step": syncs // 3,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "top_ms_per_step": top,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/txl.yaml")
    parser.add_argument("--data.root", dest="root", default=None)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--model", action="append", default=None,
        help="JSON overrides of the config's model section; repeat to compare models (each is "
        "measured at every batch size)",
    )
    parser.add_argument("--precision", choices=["bf16", "32"], default="bf16")
    parser.add_argument("--top", type=int, default=12, help="the most expensive kernels (ops) listed")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true",
        help="let cuDNN pick its fastest kernels, as `--trainer.benchmark true` does in training",
    )
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(args.config) as file:
        config = yaml.safe_load(file)
    for overrides in args.model or ["{}"]:
        for batch_size in args.batch_sizes:
            print(json.dumps(measure(batch_size, overrides, args, config, device)), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
