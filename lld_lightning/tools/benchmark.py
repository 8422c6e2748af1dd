"""`make benchmark`: lld's speed and memory against torchvision FCOS on the same timm backbone.

One process, after warm-up, median of repeated timings, for lld and for the baseline
(`benchmark_fcos.py`) at the same backbone, input size, batch, precision and memory format:

- ``train_ips``: model-only training step (a real augmented batch already on the device;
  forward, loss, backward, AdamW step), images/s;
- ``e2e_ips``: end-to-end training through a Lightning ``Trainer`` and the real `LldDataModule`
  (decode in workers, collate, transfer, kornia augmentation in ``on_after_batch_transfer``, the
  step), images/s, and ``e2e_fraction`` = e2e / model-only;
- ``infer_ips``: inference with post-processing and NMS, images/s; ``latency_ms``: one image;
- ``peak_memory_mb``: CUDA max allocated (GPU) or peak process RSS (CPU) during the training step;
- ``eval_s`` / ``metrics_s``: the whole test pass over the synthetic test set / the part spent
  in `DomainMetrics` (update + compute); FCOS has no attribute head, so its metrics are mAP only;
- ``onnx_cpu_ips`` / ``eager_cpu_ips``: inference (post-processing and read-out included) of
  lld's model exported to ONNX (`lld_lightning.tools.export`) in onnxruntime, and of the same
  model in eager PyTorch fp32, on the CPU, on the same images, one after the other (skipped with
  a line when onnxruntime is not installed).

Prints a Rich table with lld/FCOS ratios and appends one JSON line (machine, versions,
settings, figures, targets) to ``--out``. ``--preset gpu`` is the GPU protocol (resnet50, 640 px,
batch 32, bf16, channels-last, a resnet18 light row); ``--profile`` adds torch.profiler top-op
tables of lld's training step and inference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torchvision
from rich.console import Console
from rich.table import Table

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.sample import unbatch_targets
from lld_lightning.metrics import DomainMetrics, keep_inside_regions
from lld_lightning.models import Detector
from lld_lightning.module import LldModule
from lld_lightning.tools.benchmark_fcos import (
    FcosModule,
    build_fcos,
    compile_fcos,
    fcos_loss,
    num_parameters,
)
from lld_lightning.tools.machine import cpu_model

#: Flag sets; a flag given on the command line overrides its preset value.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": dict(
        device="cuda",
        backbone="resnet50",
        image_size=640,
        batch_size=32,
        precision="bf16",
        channels_last=True,
        light="resnet18",
        repeats=20,
        warmup=5,
        num_workers=12,
        onnx=False,  # a CPU-only row: the GPU protocol times the GPU
    ),
}

#: The project's speed and memory targets (issue 5), checked on a run's figures (never in a test).
CPU_TARGETS: dict[str, float] = {"train_vs_fcos": 1.5, "infer_vs_fcos": 2.0}
GPU_TARGETS: dict[str, float] = {
    "train_vs_fcos": 1.8,
    "train_ips": 350.0,
    "infer_ips": 1200.0,
    "e2e_fraction": 0.9,
    "peak_memory_gib_max": 12.0,
}

#: Figures that get an lld/FCOS ratio.
RATIO_KEYS: tuple[str, ...] = (
    "train_ips",
    "e2e_ips",
    "infer_ips",
    "latency_ms",
    "peak_memory_mb",
    "metrics_s",
    "eval_s",
    "params_m",
)

#: Seconds between two RSS samples on CPU.
_RSS_SAMPLE_S: float = 0.005


@dataclasses.dataclass
class Settings:
    """Benchmark settings (the command-line flags).

    Attributes:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        backbone: timm model name, shared by lld and FCOS.
        image_size: square input side (a multiple of 32).
        batch_size: images per training and inference batch.
        precision: ``32`` or ``bf16`` (autocast; ``bf16-mixed`` in the Trainer).
        compile: ``torch.compile`` lld's detector and FCOS's backbone and head.
        channels_last: channels-last memory format for both models.
        repeats: timed repetitions per figure (model-only steps, inference batches, e2e batches;
            twice as many single-image latencies).
        warmup: untimed repetitions before each timing.
        light: timm backbone of an extra lld-only row (model-only figures), or None.
        data_root: dataset folder; None = the built-in synthetic data (generated on first use).
        num_workers: data-loader workers of the end-to-end run and the test pass.
        fcos: also measure the FCOS baseline.
        metrics: also time the test pass and its metrics.
        profile: also print torch.profiler top ops of lld's training step and inference.
        onnx: also time lld's model exported to ONNX in onnxruntime against eager PyTorch, on the
            CPU (needs onnxruntime).
        threads: CPU threads of torch during the run (None = torch's default).
        out: JSON-lines file the record is appended to.
    """

    device: str = "auto"
    backbone: str = "resnet18"
    image_size: int = 320
    batch_size: int = 8
    precision: str = "32"
    compile: bool = False
    channels_last: bool = False
    repeats: int = 10
    warmup: int = 2
    light: str | None = None
    data_root: str | None = None
    num_workers: int = 2
    fcos: bool = True
    metrics: bool = True
    profile: bool = False
    onnx: bool = True
    threads: int | None = None
    out: str = "runs/benchmark/benchmark.jsonl"


# ----------------------------------------------------------------------------------- timing
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; any other name as it is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on the CPU), so a timing ends with them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        # ru_maxrss is the lifetime peak (KiB on Linux): an upper bound where /proc is missing.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory in MiB inside the block: CUDA max allocated, or sampled process RSS on CPU.

    Yields a dict whose ``mb`` key is filled when the block exits.
    """
    result: dict[str, float] = {}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        synchronize(device)
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    # ru_maxrss never goes down, so one process measuring two models samples RSS instead.
    peak = [_rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(_RSS_SAMPLE_S):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["mb"] = max(peak[0], _rss_bytes()) / 2**20


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (non-blocking), other values as they are."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class BatchTimer(L.Callback):
    """Wall time between consecutive training-batch ends: data wait + transfer + augment + step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())


# --------------------------------------------------------------------------------- subjects
@dataclasses.dataclass
class Subject:
    """One detector under test, with the same three entry points for lld and FCOS.

    Attributes:
        name: row name.
        lightning_module: what the Trainer fits in the end-to-end run.
        model: the plain module (parameters, train/eval mode).
        loss: ``(images [B, 3, S, S], batch) -> scalar loss``.
        infer: ``images -> list of per-image detection dicts``.
        attribute_spec: what its detections carry, for `DomainMetrics`.
    """

    name: str
    lightning_module: L.LightningModule
    model: torch.nn.Module
    loss: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    infer: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]
    attribute_spec: dict[str, int]


def lld_subject(name: str, backbone: str, datamodule: LldDataModule, settings: Settings) -> Subject:
    """The recipe's `LldModule` (`Detector` defaults: region read-out with pixel crops) on
    ``backbone``."""
    module = LldModule(
        num_classes=datamodule.num_classes,
        attribute_spec=datamodule.attribute_spec,
        class_names=datamodule.class_names,
        detector=functools.partial(Detector, backbone=backbone),
        channels_last=settings.channels_last,
        compile=settings.compile,
    )

    def loss(images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return module.training_loss({**batch, "image": images})[0]

    return Subject(name, module, module, loss, module.detect, module.attribute_spec)


def fcos_subject(backbone: str, datamodule: LldDataModule, settings: Settings) -> Subject:
    """torchvision's FCOS on the same ``backbone`` (`benchmark_fcos.build_fcos`)."""
    model = build_fcos(backbone, datamodule.num_classes, settings.image_size)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if settings.compile:
        compile_fcos(model)

    def infer(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return model(list(images))

    def loss(images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return fcos_loss(model, images, batch)

    return Subject("fcos", FcosModule(model), model, loss, infer, {})


# ----------------------------------------------------------------------------- measurements
def measure_model_only(
    subject: Subject, batch: dict[str, Any], device: torch.device, settings: Settings
) -> dict[str, float]:
    """Training step, inference, latency and peak memory on one batch already on the device."""
    model = subject.model.to(device)
    autocast = _autocast(device, settings)
    images = batch["image"]
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def train_step() -> None:
        with autocast():
            loss = subject.loss(images, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    with peak_memory(device) as memory:
        step_s = median_seconds(train_step, device, settings.warmup, settings.repeats)
    model.eval()

    def infer(x: torch.Tensor) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast():
                return subject.infer(x)

        return run

    infer_s = median_seconds(infer(images), device, settings.warmup, settings.repeats)
    latency_s = median_seconds(infer(images[:1]), device, settings.warmup, 2 * settings.repeats)
    batch_size = images.shape[0]
    return {
        "params_m": num_parameters(model),
        "train_ips": batch_size / step_s,
        "infer_ips": batch_size / infer_s,
        "latency_ms": 1000 * latency_s,
        "peak_memory_mb": memory["mb"],
    }


def measure_end_to_end(
    subject: Subject, datamodule: LldDataModule, device: torch.device, settings: Settings
) -> dict[str, float]:
    """Images/s of `Trainer.fit` on the real data module (median time between batch ends)."""
    timer = BatchTimer(device)
    timed = max(2, settings.repeats)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator=device.type,
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision="bf16-mixed" if settings.precision == "bf16" else "32-true",
            max_steps=settings.warmup + 1 + timed,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[timer],
        )
        # Lightning keeps the mode a module is handed in; the inference timing left it in eval.
        subject.lightning_module.train()
        trainer.fit(subject.lightning_module, datamodule=datamodule)
    # The first interval after warm-up starts at a batch end, so the warm-up batches include
    # worker start-up and the first batch's transfer.
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)][settings.warmup :]
    return {"e2e_ips": settings.batch_size / statistics.median(intervals)}


def measure_test_pass(
    subject: Subject, datamodule: LldDataModule, device: torch.device, settings: Settings
) -> dict[str, float]:
    """The whole synthetic test pass (letterbox, inference, NMS, metrics) and its metrics part."""
    metrics = DomainMetrics(
        domains=datamodule.test_domains,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        attribute_spec=subject.attribute_spec,
    )
    subject.model.to(device).eval()
    autocast = _autocast(device, settings)
    metrics_s, num_images = 0.0, 0
    start = time.perf_counter()
    for loader in datamodule.test_dataloader().values():
        for cpu_batch in loader:
            batch = datamodule.eval_transform(to_device(cpu_batch, device))
            images = batch["image"]
            if settings.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                preds = subject.infer(images)
            targets = unbatch_targets(batch)
            preds = [
                {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in p.items()}
                for p in keep_inside_regions(preds, targets)
            ]
            targets = [{k: v.cpu() for k, v in t.items()} for t in targets]
            metrics_start = time.perf_counter()
            metrics.update(preds, targets, batch["domain"])
            metrics_s += time.perf_counter() - metrics_start
            num_images += len(preds)
    metrics_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics.compute()
    metrics_s += time.perf_counter() - metrics_start
    return {
        "eval_s": time.perf_counter() - start,
        "metrics_s": metrics_s,
        "test_images": float(num_images),
    }


def onnxruntime_available() -> bool:
    """Whether onnxruntime is installed (the ``export`` extra)."""
    return importlib.util.find_spec("onnxruntime") is not None


def measure_onnx(module: LldModule, images: torch.Tensor, settings: Settings) -> dict[str, float]:
    """Inference images/s on the CPU of the same images: lld's model exported to ONNX in
    onnxruntime (``onnx_cpu_ips``) and eager PyTorch fp32 (``eager_cpu_ips``).

    Both give `LldModule.detect`'s detections (the export's parity test); onnxruntime gets as
    many threads as torch has.
    """
    from lld_lightning.tools.export import ExportedModel, export_module

    cpu = torch.device("cpu")
    device = next(module.parameters()).device
    module.to(cpu).eval()
    detector = module.detector
    images = images.detach().float().to(cpu).contiguous()
    batch_size = images.shape[0]

    def eager() -> Any:
        with torch.inference_mode():
            outputs = detector(images)
            return detector.detections(
                outputs,
                images,
                module.settings,
                image_size=tuple(images.shape[-2:]),
                one_per_cell=True,
            )

    try:
        eager_s = median_seconds(eager, cpu, settings.warmup, settings.repeats)
        with tempfile.TemporaryDirectory() as folder:
            path = export_module(module, Path(folder) / "lld.onnx", "onnx", images.shape[-1])
            model = ExportedModel(path, threads=torch.get_num_threads())
            onnx_s = median_seconds(
                lambda: model.detect(images), cpu, settings.warmup, settings.repeats
            )
    finally:
        module.to(device)
    return {"onnx_cpu_ips": batch_size / onnx_s, "eager_cpu_ips": batch_size / eager_s}


def onnx_row(
    module: LldModule, images: torch.Tensor, settings: Settings, console: Console
) -> dict[str, float]:
    """`measure_onnx`, or no figures and a line saying why when onnxruntime is not installed."""
    if not onnxruntime_available():
        console.log(
            "onnxruntime is not installed: no ONNX row "
            "(pip install 'lld-lightning[export]', or --no-onnx)"
        )
        return {}
    console.log("[bold]lld[/]: ONNX in onnxruntime vs eager PyTorch, CPU inference")
    return measure_onnx(module, images, settings)


def profile_lld(
    subject: Subject,
    batch: dict[str, Any],
    device: torch.device,
    settings: Settings,
    rows: int = 12,
) -> dict[str, str]:
    """torch.profiler tables (top ops by self time) of one lld training step and one inference."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    autocast = _autocast(device, settings)
    model = subject.model.to(device)
    images = batch["image"]
    tables = {}
    model.train()
    with profile(activities=activities) as prof:
        with autocast():
            loss = subject.loss(images, batch)
        loss.backward()
        synchronize(device)
    model.zero_grad(set_to_none=True)
    tables["train_step"] = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    model.eval()
    with profile(activities=activities) as prof, torch.inference_mode(), autocast():
        subject.infer(images)
        synchronize(device)
    tables["inference"] = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    return tables


def _autocast(device: torch.device, settings: Settings) -> Callable[[], Any]:
    if settings.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# ----------------------------------------------------------------------------------- record
def machine_info(device: torch.device) -> dict[str, Any]:
    """Host, CPU, GPU and library versions of the record."""
    cpu = cpu_model()
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "lightning": L.__version__,
    }


def ratios(lld: dict[str, float], fcos: dict[str, float]) -> dict[str, float]:
    """``lld / fcos`` for every figure both have (speeds: > 1 is lld faster; times and memory:
    < 1 is lld better)."""
    return {
        key: lld[key] / fcos[key]
        for key in RATIO_KEYS
        if key in lld and key in fcos and fcos[key] > 0
    }


def check_targets(record: dict[str, Any]) -> dict[str, bool]:
    """Which targets this run meets (only those its device and figures allow)."""
    lld, ratio = record["results"].get("lld", {}), record.get("ratios", {})
    checks: dict[str, bool] = {}
    if record["machine"]["device"].startswith("cuda"):
        t = GPU_TARGETS
        if "train_ips" in ratio:
            checks[f"train >= {t['train_vs_fcos']}x FCOS"] = (
                ratio["train_ips"] >= t["train_vs_fcos"]
            )
        checks[f"train >= {t['train_ips']:.0f} img/s"] = lld["train_ips"] >= t["train_ips"]
        checks[f"inference >= {t['infer_ips']:.0f} img/s"] = lld["infer_ips"] >= t["infer_ips"]
        if "e2e_fraction" in lld:
            checks[f"end-to-end >= {t['e2e_fraction']:.0%} of model-only"] = (
                lld["e2e_fraction"] >= t["e2e_fraction"]
            )
        checks[f"peak memory <= {t['peak_memory_gib_max']:.0f} GiB"] = (
            lld["peak_memory_mb"] / 1024 <= t["peak_memory_gib_max"]
        )
    elif ratio:
        t = CPU_TARGETS
        checks[f"train >= {t['train_vs_fcos']}x FCOS"] = ratio["train_ips"] >= t["train_vs_fcos"]
        checks[f"inference >= {t['infer_vs_fcos']}x FCOS"] = (
            ratio["infer_ips"] >= t["infer_vs_fcos"]
        )
    return checks


def run_benchmark(settings: Settings, console: Console | None = None) -> dict[str, Any]:
    """`measure_all` with ``settings.threads`` torch CPU threads (restored afterwards)."""
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return measure_all(settings, console)
    finally:
        torch.set_num_threads(threads)


def measure_all(settings: Settings, console: Console | None = None) -> dict[str, Any]:
    """Measure everything the settings ask for and return the record (not yet written).

    Returns:
        ``{"date", "command", "machine", "settings", "results": {row: figures}, "ratios",
        "targets", "wall_s"}`` (``profile`` too with ``settings.profile``).
    """
    console = console or Console()
    started = time.perf_counter()
    device = resolve_device(settings.device)
    if settings.precision not in ("32", "bf16"):
        raise ValueError(f"precision must be 32 or bf16, got {settings.precision!r}")
    torch.manual_seed(0)
    datamodule = LldDataModule(
        root=settings.data_root,
        image_size=settings.image_size,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    # One real augmented batch, kept on the device, is the model-only input of every row.
    cpu_batch = next(iter(datamodule.train_dataloader()))
    batch = datamodule.train_augmentation(to_device(cpu_batch, device))

    subjects = [lld_subject("lld", settings.backbone, datamodule, settings)]
    if settings.fcos:
        subjects.append(fcos_subject(settings.backbone, datamodule, settings))
    results: dict[str, dict[str, float]] = {}
    record: dict[str, Any] = {}
    for subject in subjects:
        console.log(f"[bold]{subject.name}[/]: model-only step, inference, latency")
        figures = measure_model_only(subject, batch, device, settings)
        if subject.name == "lld" and settings.onnx:
            figures.update(onnx_row(subject.lightning_module, batch["image"], settings, console))
        console.log(f"[bold]{subject.name}[/]: end-to-end training through LldDataModule")
        figures.update(measure_end_to_end(subject, datamodule, device, settings))
        figures["e2e_fraction"] = figures["e2e_ips"] / figures["train_ips"]
        if settings.metrics:
            console.log(f"[bold]{subject.name}[/]: test pass and metrics")
            figures.update(measure_test_pass(subject, datamodule, device, settings))
        results[subject.name] = figures
        if subject.name == "lld" and settings.profile:
            record["profile"] = profile_lld(subject, batch, device, settings)
        subject.model.to("cpu")
        del subject
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if settings.light:
        console.log(f"[bold]lld light ({settings.light})[/]: model-only step, inference, latency")
        light = lld_subject("lld_light", settings.light, datamodule, settings)
        results["lld_light"] = measure_model_only(light, batch, device, settings)

    record.update(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(device),
        settings=dataclasses.asdict(settings),
        results=results,
        ratios=ratios(results["lld"], results["fcos"]) if "fcos" in results else {},
    )
    record["targets"] = check_targets(record)
    record["wall_s"] = time.perf_counter() - started
    return record


# ------------------------------------------------------------------------------------ output
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("params_m", "parameters (M)", "{:.1f}"),
    ("train_ips", "train, model-only (img/s)", "{:.2f}"),
    ("e2e_ips", "train, end-to-end (img/s)", "{:.2f}"),
    ("e2e_fraction", "end-to-end / model-only", "{:.2f}"),
    ("infer_ips", "inference + NMS (img/s)", "{:.2f}"),
    ("latency_ms", "latency, 1 image (ms)", "{:.1f}"),
    ("peak_memory_mb", "peak memory, train (MiB)", "{:.0f}"),
    ("eval_s", "test pass (s)", "{:.2f}"),
    ("metrics_s", "of which metrics (s)", "{:.2f}"),
    ("test_images", "test images", "{:.0f}"),
    ("eager_cpu_ips", "inference, PyTorch eager CPU (img/s)", "{:.2f}"),
    ("onnx_cpu_ips", "inference, onnxruntime CPU (img/s)", "{:.2f}"),
)


def render_table(record: dict[str, Any]) -> Table:
    """The record as a Rich table: one column per row of ``results``, then lld/FCOS."""
    s, m = record["settings"], record["machine"]
    title = (
        f"lld vs torchvision FCOS: {s['backbone']} {s['image_size']}px batch {s['batch_size']} "
        f"precision {s['precision']}{' compile' if s['compile'] else ''}"
        f"{' channels-last' if s['channels_last'] else ''} on {m['gpu'] or m['cpu']}"
    )
    table = Table(title=title)
    table.add_column("figure")
    names = list(record["results"])
    headers = {"lld": "lld", "fcos": "FCOS", "lld_light": f"lld light ({s['light']})"}
    for name in names:
        table.add_column(headers.get(name, name), justify="right")
    if record["ratios"]:
        table.add_column("lld/FCOS", justify="right")
    for key, label, fmt in _ROWS:
        if not any(key in record["results"][n] for n in names):
            continue
        cells = [
            fmt.format(record["results"][n][key]) if key in record["results"][n] else "-"
            for n in names
        ]
        if record["ratios"]:
            ratio = record["ratios"].get(key)
            cells.append(f"{ratio:.2f}x" if ratio is not None else "")
        table.add_row(label, *cells)
    return table


def append_jsonl(record: dict[str, Any], path: str | Path) -> Path:
    """Append ``record`` as one JSON line to ``path`` (folders made as needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from command-line flags; ``--preset`` fills the flags not given explicitly."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m lld_lightning.tools.benchmark",
        description="lld-lightning speed and memory vs torchvision FCOS on the same timm backbone. "
        "Defaults are for a small CPU machine (about 10 min on 2 cores); the GPU protocol "
        "(resnet50, 640 px, batch 32, bf16, channels-last, resnet18 light row) is --preset gpu.",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="a flag set (gpu: the GPU protocol)"
    )
    parser.add_argument("--device", help=f"auto, cpu, cuda[:N] (default {defaults.device})")
    parser.add_argument("--backbone", help=f"timm name (default {defaults.backbone})")
    parser.add_argument(
        "--image-size", type=int, help=f"square input side (default {defaults.image_size})"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"images per batch (default {defaults.batch_size})"
    )
    parser.add_argument(
        "--precision", choices=["32", "bf16"], help="fp32 or bf16 autocast (default 32)"
    )
    parser.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile both detectors"
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="channels-last memory format for both",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"timed repetitions (default {defaults.repeats})"
    )
    parser.add_argument(
        "--warmup", type=int, help=f"untimed repetitions (default {defaults.warmup})"
    )
    parser.add_argument(
        "--light", nargs="?", const="resnet18", help="add an lld row with this backbone"
    )
    parser.add_argument("--data-root", help="dataset folder (default: built-in synthetic data)")
    parser.add_argument(
        "--num-workers", type=int, help=f"data-loader workers (default {defaults.num_workers})"
    )
    parser.add_argument(
        "--no-fcos", dest="fcos", action="store_false", default=None, help="skip the FCOS baseline"
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        default=None,
        help="skip the test pass and its metrics",
    )
    parser.add_argument(
        "--profile", action="store_true", default=None, help="print profiler tables"
    )
    parser.add_argument(
        "--no-onnx",
        dest="onnx",
        action="store_false",
        default=None,
        help="skip the onnxruntime vs eager PyTorch CPU inference row",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help=f"JSON-lines file to append to (default {defaults.out})")
    args = vars(parser.parse_args(argv))
    preset = PRESETS[args.pop("preset")] if args.get("preset") else {}
    args.pop("preset", None)
    values = (
        dataclasses.asdict(defaults) | preset | {k: v for k, v in args.items() if v is not None}
    )
    return Settings(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table (and profiles), append the JSON line; return the record."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = parse_settings(argv)
    console = Console()
    record = run_benchmark(settings, console)
    for name, table in record.get("profile", {}).items():
        console.rule(f"lld {name}: torch.profiler top ops")
        print(table)  # wide fixed-width text: Rich would wrap it
    console.print(render_table(record))
    for target, met in record["targets"].items():
        console.print(f"target {target}: {'[green]met[/]' if met else '[red]not met[/]'}")
    path = append_jsonl(record, settings.out)
    console.print(f"appended to {path} ({record['wall_s']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
