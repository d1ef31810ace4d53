"""`python -m benchmarks.gpu_check`: every GPU measurement the project needs, in one command,
under 8 minutes on one H100/H200; JSON on stdout (and OUT/gpu_check.json), a markdown summary
in OUT/gpu_check.md. `--dry-run` runs the same code on the CPU at tiny sizes in under a minute
(CI runs it: tests/benchmarks/test_gpu_check.py), so the script never rots.

    python -m benchmarks.gpu_check [--out gpu_check] [--budget-s 420] [--dry-run] [--no-dali]

What it measures (each section fails or runs out of time on its own; the others still report):

1. The train step (forward + cross-entropy + backward + the paper's SGD update), through
   `trainer.engine.train_one_epoch` on GPU-resident synthetic batches, at per-worker batch 128
   and 256: img/s, ms per step, peak memory, and the achieved TFLOP/s (the step's FLOPs counted
   by torch's FlopCounterMode) against the chip's bf16 dense peak. Variants: fp32; bf16
   autocast + channels_last (the trainer's GPU default); + torch.compile; the grouped-
   convolution twin (trainer/grouped_model.py) in bf16 + channels_last; cuDNN's autotuner on
   (torch.backends.cudnn.benchmark: the trainer leaves it off); all two-column ones
   built as a worker with one GPU builds them, `devices=("cuda:0", "cuda:0")`: both columns on
   one GPU (the gathers between columns run as concatenations; real GPU-to-GPU copies need
   two GPUs, measured as `two_gpus` where there are two).
2. The training loop as trainer.run's workers run it (`trainer.epoch.run_epoch`: train_one_epoch
   + the centre-crop evaluation) on a shard set written here by `pipeline.shard` from
   ../shared/photos: with DALI's `mixed` decoder and the paper's augmentation where DALI is
   installed: img/s and the data-wait share; against the same loop fed GPU-resident synthetic
   tensors (the model-only ceiling). Without DALI (or with --no-dali): the synthetic loop, and
   torchvision's nvJPEG decode (`torchvision.io.decode_jpeg(device="cuda")`) timed on the same
   JPEGs, labelled as a stand-in for DALI.
3. Serving's predictor (serving.predictor.Predictor) on the GPU: batch-1 latency p50/p99 (the
   request's preprocessing + forward), img/s at batch 32 and 128 (forward of preprocessed
   crops), and the 10-crop path's latency.
4. From those: the estimated time of the paper's 90 epochs of ILSVRC-2012 per GPU and per GPU
   pair.

Imports, kept few, so that it runs on a bare GPU machine: no Ray, no webdataset, no pyarrow,
DALI only where installed. Beyond torch (CUDA), torchvision, numpy, pillow,
opencv-python-headless, scipy and safetensors, it needs these wheels (carry them):
    simplejpeg (binary; pipeline's JPEG codec), tqdm (pipeline.shard's progress bar),
    pydantic, pydantic-core (binary), pydantic-settings, annotated-types, typing-inspection,
    python-dotenv, typing-extensions (serving.settings, which the predictor reads);
    nvidia-dali-cuda120 (binary) only for section 2's DALI half.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from benchmarks.photos import resized
from pipeline.cli import setup_logging
from trainer.config import TrainConfig
from trainer.estimate import SyntheticBatches, synchronize, time_train_steps
from trainer.grouped_model import GroupedAlexNet
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import build_optimizer

log = logging.getLogger("benchmarks.gpu_check")
REPO = Path(__file__).resolve().parents[1]
# ../shared/photos beside the checkout (this machine), or shared/photos inside it (a copy)
PHOTOS = next(
    (p for p in (REPO.parent / "shared" / "photos", REPO / "shared" / "photos") if p.is_dir()),
    REPO.parent / "shared" / "photos",
)
IMAGENET_TRAIN, IMAGENET_VAL, PAPER_EPOCHS = 1_281_167, 50_000, 90
# Dense bf16 tensor-core peak, TFLOP/s, by the name torch reports (first match wins).
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
CLASSES = 10  # the loop's shard set: 10 classes of photographs


@dataclass(frozen=True)
class Sizes:
    """What one run measures at: the GPU's sizes, or --dry-run's tiny ones on the CPU."""

    device: str = "cuda"
    batches: tuple[int, ...] = (128, 256)
    input_size: int = 227
    steps: int = 30
    warmup: int = 8
    train_images: int = 12_800
    val_images: int = 1_024
    epochs: int = 3  # the first is a warm-up (cuDNN's search, DALI's buffers)
    latency_requests: int = 200
    serve_batches: tuple[int, ...] = (32, 128)
    serve_rounds: int = 10
    compile_backend: str = "inductor"


DRY = Sizes(
    device="cpu",
    batches=(2, 4),
    input_size=67,
    steps=1,
    warmup=1,
    train_images=48,
    val_images=16,
    epochs=2,
    latency_requests=4,
    serve_batches=(2, 4),
    serve_rounds=2,
    compile_backend="eager",  # the same torch.compile call, without inductor's minutes of C++ on a CPU
)


class Budget:
    """The run's time limit: a section that starts after it is skipped, saying so."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def step_flops(model: torch.nn.Module, size: int, classes: int) -> float:
    """FLOPs of one training step per image: forward + backward (convolutions and matrix
    products; the LRN, pooling and the update are not counted), by torch's FlopCounterMode at
    batch 2 on the CPU in fp32: the same count whatever the precision. 4.14 GFLOP at 227."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(2, 3, size, size), torch.arange(2) % classes
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # columns | grouped
    amp: bool
    channels_last: bool
    compile: bool = False
    devices: tuple[str, str] = ("cuda:0", "cuda:0")
    cudnn_benchmark: bool = False  # the trainer leaves cuDNN's autotuner off (torch's default)


def variants(device: torch.device, compiled: bool) -> list[Variant]:
    """The eager variants, or (compiled) the torch.compile one: measured last, since its
    compilation takes minutes and the loop and serving matter more within the budget."""
    here = (str(device), str(device)) if device.type == "cpu" else ("cuda:0", "cuda:0")
    if compiled:
        return [Variant("bf16_channels_last_compile", "columns", True, True, compile=True, devices=here)]
    out = [
        Variant("fp32", "columns", False, False, devices=here),
        Variant("bf16_channels_last", "columns", True, True, devices=here),
        Variant("grouped_bf16_channels_last", "grouped", True, True, devices=here),
        Variant("bf16_channels_last_cudnn_benchmark", "columns", True, True, devices=here, cudnn_benchmark=True),
    ]
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        out.append(Variant("two_gpus_bf16_channels_last", "columns", True, True, devices=("cuda:0", "cuda:1")))
    return out


def build(v: Variant, cfg: AlexNetConfig, device: torch.device, backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model: torch.nn.Module = (
        GroupedAlexNet(cfg).to(device) if v.kind == "grouped" else AlexNet(cfg, devices=v.devices)
    ).train()
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch documents and accepts memory_format; its overloads omit it
    return cast(torch.nn.Module, torch.compile(model, backend=backend)) if v.compile else model


def measure_steps(sz: Sizes, device: torch.device, peak: float | None, budget: Budget, compiled: bool = False) -> dict:
    """Section 1: the train step, every eager variant (or the compiled one) at every batch."""
    cfg = AlexNetConfig(num_classes=1000, input_size=sz.input_size)
    recipe = TrainConfig().recipe
    # One count for both: the same network, the same FLOPs (torch's counter, run on the grouped
    # twin, charges a grouped convolution's weight gradient as if it were ungrouped: +20%).
    flops = step_flops(AlexNet(cfg), sz.input_size, 1000)
    out: dict[str, Any] = {"step_flops_per_image": flops, "by_batch": {}}
    for batch in sz.batches:
        rows: dict[str, Any] = {}
        for v in variants(device, compiled):
            if budget.left() <= 0:
                rows[v.name] = {"skipped": "time budget spent"}
                continue
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = v.cudnn_benchmark
            try:
                model = build(v, cfg, device, sz.compile_backend)
                optimizer = build_optimizer(model, recipe)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)

                def batches(n: int, v: Variant = v, batch: int = batch) -> SyntheticBatches:
                    return SyntheticBatches(batch, sz.input_size, 1000, n, device, v.channels_last)

                step_s, warm_s = time_train_steps(
                    model,
                    optimizer,
                    batches,
                    device=device,
                    amp_dtype=torch.bfloat16 if v.amp and device.type == "cuda" else None,  # as the trainer: GPU only
                    steps=sz.steps,
                    warmup=sz.warmup,
                )
            except Exception as exc:  # one variant's failure (say, compile) is reported; the rest go on
                rows[v.name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                continue
            finally:
                torch.backends.cudnn.benchmark = benchmark
            tflops = flops * batch / step_s / 1e12
            rows[v.name] = {
                "img_per_s": round(batch / step_s, 1),
                "step_ms": round(step_s * 1e3, 3),
                "warmup_s": round(warm_s, 2),
                "tflops": float(f"{tflops:.3g}"),
                "share_of_bf16_peak": round(tflops / peak, 4) if peak else None,
                "devices": list(v.devices),
                **(
                    {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
                    if device.type == "cuda"
                    else {}
                ),
            }
            del model, optimizer
        a, b = rows.get("bf16_channels_last", {}), rows.get("grouped_bf16_channels_last", {})
        if "img_per_s" in a and "img_per_s" in b:
            rows["columns_over_grouped"] = round(a["img_per_s"] / b["img_per_s"], 3)
        out["by_batch"][str(batch)] = rows
    return out


def images_at(photos: Path, side: int = 500) -> list[tuple[str, bytes]]:
    """(name, JPEG) of each photograph in `photos`, re-encoded with its longer side `side`;
    where there are none (a checkout without ../shared/photos), 12 of the built-in sample
    data's drawn pictures instead, said in the log: the check's code path is the same."""
    sources = sorted(photos.glob("*.jpg"))
    if sources:
        return [(p.name, resized(p.read_bytes(), side)) for p in sources]
    log.warning("no photographs in %s: using the sample data's drawn pictures (pipeline.sample)", photos)
    from pipeline.sample import CLASSES as SAMPLE_CLASSES  # here: its tqdm is not on a bare GPU machine
    from pipeline.sample import draw_image

    rng = np.random.RandomState(0)
    drawn = []
    for i in range(12):
        buf = io.BytesIO()
        draw_image(i % len(SAMPLE_CLASSES), rng).save(buf, format="JPEG", quality=90)
        drawn.append((f"drawn_{i:02d}.jpg", resized(buf.getvalue(), side)))
    return drawn


def raw_tree(root: Path, photos: Path, train: int, val: int, side: int = 500) -> Path:
    """ImageNet's layout from the photographs (each re-encoded once at ImageNet's size, then
    hard-linked under many names): train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, 10 classes."""
    cache = root / "resized"
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for name, data in images_at(photos, side):
        target = cache / name
        if not target.exists():
            target.write_bytes(data)
        files.append(target)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            folder = root / "raw" / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / f"{split}_{i:06d}.JPEG"
            if not link.exists():
                os.link(files[i % len(files)], link)
    return root / "raw"


class SyntheticEpochs:
    """What trainer.loaders.EpochLoaders is to run_epoch, with the same synthetic batch every step."""

    def __init__(self, batch: int, size: int, steps: int, device: torch.device, channels_last: bool):
        self.args = (batch, size, CLASSES, steps, device, channels_last)

    def for_epoch(self, epoch: int) -> SyntheticBatches:
        return SyntheticBatches(*self.args)


def loop_config(sz: Sizes, shards: Path, gpu: bool, loader: str) -> TrainConfig:
    """The paper's recipe as one worker with one GPU runs it (bf16 + channels_last on it), on 10
    classes; the guard off (the paper's lr on 10 classes diverges: docs/divergence.md; a
    timing run does not care)."""
    return TrainConfig.preset("paper").updated(
        {
            "recipe": {"epochs": sz.epochs, "ten_crop_at_end": False},
            "model": {"input_size": sz.input_size, "num_classes": CLASSES},
            "input": {
                "data": str(shards),
                "loader": loader,
                "loader_threads": min(8, os.cpu_count() or 1) if gpu else 2,
            },
            "runtime": {
                "workers": 1,
                "gpus_per_worker": 1 if gpu else 0,
                "amp": gpu,
                "channels_last": gpu,
                "divergence_guard": False,
                "print_freq": 0,
            },
        }
    )


def run_loop(cfg: TrainConfig, device: torch.device, train_data: Any, val: Any) -> list[dict]:
    """`sz.epochs` epochs of trainer.epoch.run_epoch, as a worker runs them (no Ray, no DDP, no
    checkpoint); each epoch's metrics row."""
    from pipeline.shardset import open_shard_set
    from trainer.context import WorkerContext
    from trainer.epoch import Models, run_epoch
    from trainer.resume import new_state
    from trainer.worker import build_model

    shards = open_shard_set(cfg.input.data, cfg.model.input_size)
    # No run folder: nothing is saved (run_epoch never touches it).
    ctx = WorkerContext(cfg=cfg, shards=shards, devices=[device], rank=0, world=1, run=None)  # type: ignore[arg-type]
    state = new_state(cfg.recipe, build_model(ctx))
    models = Models(train=state.model, eval=state.model)
    rows = []
    for _ in range(cfg.recipe.epochs):
        result = run_epoch(state, ctx, models, train_data(ctx), val(ctx), 0.0)
        rows.append(result.metrics)
    rows[-1]["_model"] = state.model  # for the serving section's checkpoint
    return rows


def loop_summary(rows: list[dict]) -> dict:
    measured = rows[1:] or rows  # the first epoch warms up
    return {
        "img_per_s": round(statistics.median(r["images_per_s"] for r in measured), 1),
        "data_wait_share": round(statistics.median(r["data_wait_share"] for r in measured), 4),
        "eval_img_per_s": round(statistics.median(r["val_images"] / max(r["eval_seconds"], 1e-9) for r in measured), 1),
        "epochs": [
            {k: round(r[k], 4) for k in ("images_per_s", "data_wait_share", "epoch_seconds", "eval_seconds")}
            for r in rows
        ],
    }


def jpegs_of(shards: Path, split: str = "train") -> list[bytes]:
    out = []
    for tar in sorted((shards / split).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    f = t.extractfile(m)
                    assert f is not None
                    out.append(f.read())
    return out


def nvjpeg_stand_in(shards: Path, device: torch.device, batch: int, rounds: int = 3) -> dict:
    """torchvision's batched JPEG decode on the device, on the shard set's own JPEGs: img/s. A
    stand-in for DALI's mixed decoder (which also crops, mirrors, lights and normalises)."""
    try:
        import torchvision
        from torchvision.io import decode_jpeg
    except ImportError as exc:
        return {"skipped": f"torchvision not installed ({exc})"}
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs_of(shards)]
    where = "cuda" if device.type == "cuda" else "cpu"
    times = []
    for r in range(rounds + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(0, len(data), batch):
            decode_jpeg(data[i : i + batch], device=where)
        synchronize(device)
        if r:  # the first round warms up
            times.append(time.perf_counter() - t0)
    return {
        "label": "stand-in: torchvision nvJPEG decode only (DALI not used)",
        "torchvision": torchvision.__version__,
        "images": len(data),
        "batch": batch,
        "img_per_s": round(len(data) / statistics.median(times), 1),
    }


def measure_loop(sz: Sizes, device: torch.device, work: Path, photos: Path, use_dali: bool) -> dict:
    """Section 2: the shard set, the real loop (DALI), the synthetic ceiling, the stand-in."""
    from pipeline.plan import ShardConfig
    from pipeline.shard import run as shard
    from trainer.loaders import dali_import_error

    gpu = device.type == "cuda"
    raw = raw_tree(work, photos, sz.train_images, sz.val_images)
    t0 = time.perf_counter()
    workers = (os.cpu_count() or 1) if gpu else 1  # the dry run's few images: one process is quicker than a pool
    shard(ShardConfig(src=raw, out=work / "shards", workers=workers, samples_per_shard=1024, progress=False))
    out: dict[str, Any] = {
        "shard_set": {"train": sz.train_images, "val": sz.val_images, "seconds": round(time.perf_counter() - t0, 2)}
    }
    shards = work / "shards"
    why_no_dali = "--no-dali" if not use_dali else dali_import_error()
    model = None
    if why_no_dali is None:
        cfg = loop_config(sz, shards, gpu, "dali")
        rows = run_loop(cfg, device, lambda ctx: ctx.train_loaders(), lambda ctx: ctx.eval_loader("center"))
        model = rows[-1].pop("_model")
        out["dali"] = {"decoder": "mixed" if gpu else "cpu", **loop_summary(rows)}
    else:
        out["dali"] = {"skipped": f"DALI not used: {why_no_dali}"}
    cfg = loop_config(sz, shards, gpu, "webdataset")  # the loader is never opened: synthetic batches
    batch = cfg.per_worker_batch

    def synthetic_train(ctx):
        return SyntheticEpochs(batch, sz.input_size, ctx.steps_per_epoch(), device, gpu)

    def synthetic_val(ctx):
        steps = -(-ctx.shards.num_samples("val") // 64)
        return SyntheticBatches(64, sz.input_size, CLASSES, steps, device, gpu)

    rows = run_loop(cfg, device, synthetic_train, synthetic_val)
    synthetic_model = rows[-1].pop("_model")
    out["synthetic"] = {
        "label": "the same loop on GPU-resident synthetic batches: the model-only ceiling",
        **loop_summary(rows),
    }
    if "img_per_s" in out["dali"]:
        out["dali_over_synthetic"] = round(out["dali"]["img_per_s"] / out["synthetic"]["img_per_s"], 3)
    if why_no_dali is not None or gpu:
        try:
            out["nvjpeg_stand_in"] = nvjpeg_stand_in(shards, device, batch)
        except Exception as exc:  # reported; the loop's figures above stand
            out["nvjpeg_stand_in"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    out["_model"] = model or synthetic_model
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_serving(sz: Sizes, device: torch.device, work: Path, photos: Path, model: torch.nn.Module) -> dict:
    """Section 3: serving's predictor on the device, on a checkpoint of the loop's model."""
    from pipeline.shardset import open_shard_set
    from serving.predictor import Predictor
    from trainer.checkpoint import ShardsMeta, save

    shards = open_shard_set(work / "shards")
    folder = save(
        work / "checkpoint",
        model,
        classes=shards.manifest["classes"],
        normalization=shards.normalization(False),
        epoch=1,
        metrics={},
        shards=ShardsMeta.of(shards.root, shards.manifest),
        run="gpu_check",
    )
    predictor = Predictor(folder, device=str(device))
    images = [data for _, data in images_at(photos)]

    def timed(fn: Callable[..., Any], *args: Any) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        fn(*args)
        synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    def request(data: bytes, ten: bool = False) -> None:
        logits, _ = predictor.forward(predictor.preprocess(data, ten_crop=ten))
        predictor.top_k(logits.softmax(1).mean(0), 5)

    for data in images[:3]:
        request(data)  # warm-up
    one = [timed(request, images[i % len(images)]) for i in range(sz.latency_requests)]
    ten = [timed(request, images[i % len(images)], True) for i in range(max(2, sz.latency_requests // 4))]
    crops = predictor.preprocess(images[0])
    by_batch = {}
    for b in sz.serve_batches:
        x = np.repeat(crops, b, axis=0)
        predictor.forward(x)  # warm-up (cuDNN's search for this shape)
        ms = statistics.median(timed(predictor.forward, x) for _ in range(sz.serve_rounds))
        by_batch[str(b)] = {"img_per_s": round(b / ms * 1e3, 1), "forward_ms": round(ms, 3)}
    return {
        "device": str(predictor.device),
        "batch1_latency_ms": {
            "p50": round(percentile(one, 50), 3),
            "p99": round(percentile(one, 99), 3),
            "requests": len(one),
        },
        "ten_crop_latency_ms": {
            "p50": round(percentile(ten, 50), 3),
            "p99": round(percentile(ten, 99), 3),
            "requests": len(ten),
        },
        "forward_by_batch": by_batch,
        "note": "latency: preprocess (decode, resize, JPEG round trip, crops) + forward + top-5, in process",
    }


def estimate(loop: dict) -> dict:
    """Section 4: 90 epochs of ILSVRC-2012 (1,281,167 train, 50,000 val images) at the measured
    fed rate of one GPU; a pair, if it scales 2x (two one-GPU workers, data parallel)."""
    if "img_per_s" in loop.get("dali", {}):
        rate, eval_rate, basis = loop["dali"]["img_per_s"], loop["dali"]["eval_img_per_s"], "the DALI loop"
    elif "synthetic" in loop:
        rate, eval_rate = loop["synthetic"]["img_per_s"], loop["synthetic"]["eval_img_per_s"]
        basis = "the synthetic loop (no DALI measured: a ceiling)"
        decode = loop.get("nvjpeg_stand_in", {}).get("img_per_s")
        if decode:
            rate, basis = min(rate, decode), basis + ", capped by the nvJPEG stand-in's decode rate"
    else:
        return {"skipped": "no loop was measured"}
    epoch_s = IMAGENET_TRAIN / rate + IMAGENET_VAL / eval_rate
    hours = PAPER_EPOCHS * epoch_s / 3600
    return {
        "basis": basis,
        "train_img_per_s": rate,
        "epoch_minutes_one_gpu": round(epoch_s / 60, 2),
        "paper_90_epochs_hours_one_gpu": round(hours, 2),
        "paper_90_epochs_hours_per_gpu_pair_if_2x": round(hours / 2, 2),
        "note": "a pair as the paper's layout (one column per GPU) is not measurable on one GPU",
    }


def environment(device: torch.device, peak: float | None) -> dict:
    from trainer.loaders import dali_import_error

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "bf16_peak_tflops": peak,
        "dali": dali_import_error() or "installed",
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    return env


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# gpu_check: {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), {env['gpus']} GPU(s); DALI: {env['dali']}; "
        f"torchvision: {env['torchvision']}; bf16 peak {env['bf16_peak_tflops']} TFLOP/s; "
        f"{'DRY RUN (CPU, tiny sizes: not a measurement)' if result['dry_run'] else 'sizes: ' + json.dumps(result['sizes'])}; "
        f"{result['seconds']:.0f} s.",
        "",
        "## Train step (train_one_epoch on GPU-resident batches)",
        "",
        "| batch | variant | img/s | ms/step | TFLOP/s | of bf16 peak | warm-up s | memory GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    eager = result["sections"].get("train_step", {}).get("by_batch", {})
    compiled = result["sections"].get("train_step_compile", {}).get("by_batch", {})
    for batch in dict.fromkeys([*eager, *compiled]):
        rows = {**eager.get(batch, {}), **compiled.get(batch, {})}
        for name, r in rows.items():
            if not isinstance(r, dict):
                continue
            if "img_per_s" not in r:
                lines.append(f"| {batch} | {name} | {r.get('error') or r.get('skipped')} | | | | | |")
                continue
            share = f"{100 * r['share_of_bf16_peak']:.1f}%" if r.get("share_of_bf16_peak") else "-"
            lines.append(
                f"| {batch} | {name} | {r['img_per_s']} | {r['step_ms']} | {r['tflops']} | {share} | "
                f"{r['warmup_s']} | {r.get('peak_memory_gib', '-')} |"
            )
        for ratio in ("columns_over_grouped", "compile_over_eager"):
            if ratio in rows:
                lines.append(f"| {batch} | {ratio.replace('_over_', ' / ')} | {rows[ratio]} | | | | | |")
    loop = result["sections"].get("loop", {})
    lines += [
        "",
        "## The training loop (trainer.epoch.run_epoch)",
        "",
        "| input | img/s | data wait | eval img/s |",
        "|---|---|---|---|",
    ]
    for key in ("dali", "synthetic"):
        r = loop.get(key, {})
        if "img_per_s" in r:
            lines.append(f"| {key} | {r['img_per_s']} | {100 * r['data_wait_share']:.1f}% | {r['eval_img_per_s']} |")
        elif r:
            lines.append(f"| {key} | {r.get('skipped') or r.get('error')} | | |")
    stand_in = loop.get("nvjpeg_stand_in")
    if stand_in:
        lines.append(f"| nvJPEG stand-in (decode only) | {stand_in.get('img_per_s', stand_in.get('skipped'))} | | |")
    serve = result["sections"].get("serving", {})
    if "batch1_latency_ms" in serve:
        b1, ten = serve["batch1_latency_ms"], serve["ten_crop_latency_ms"]
        lines += [
            "",
            f"## Serving's predictor on {serve['device']}",
            "",
            f"batch-1 request p50 {b1['p50']} ms, p99 {b1['p99']} ms; 10-crop p50 {ten['p50']} ms, p99 {ten['p99']} ms; "
            + ", ".join(f"batch {b}: {r['img_per_s']} img/s" for b, r in serve["forward_by_batch"].items()),
        ]
    est = result["sections"].get("estimate", {})
    if "paper_90_epochs_hours_one_gpu" in est:
        lines += [
            "",
            "## The paper's 90 epochs of ILSVRC-2012",
            "",
            f"{est['paper_90_epochs_hours_one_gpu']} h on one GPU ({est['epoch_minutes_one_gpu']} min per epoch, from "
            f"{est['basis']}); {est['paper_90_epochs_hours_per_gpu_pair_if_2x']} h per GPU pair if a pair scales 2x.",
        ]
    failed = {k: v for k, v in result["sections"].items() if isinstance(v, dict) and "error" in v}
    if failed:
        lines += ["", "## Failed sections", ""] + [f"- {k}: {v['error']}" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


SECTIONS = ("train_step", "loop", "serving", "estimate", "train_step_compile")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (CI)")
    p.add_argument(
        "--out", type=Path, default=Path("gpu_check"), help="gpu_check.json, gpu_check.md and the work files"
    )
    p.add_argument("--photos", type=Path, default=PHOTOS, help="the photographs the shard set is made of")
    p.add_argument("--budget-s", type=float, default=420.0, help="sections starting after this are skipped")
    p.add_argument("--no-dali", action="store_true", help="the stand-in path even where DALI is installed")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's bf16 dense peak, if not in the table")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SECTIONS),
        help=f"run these sections alone, comma-separated, of {','.join(SECTIONS)} (serving and estimate need loop)",
    )
    a = p.parse_args(argv)
    if unknown := set(a.only) - set(SECTIONS):
        p.error(f"--only: no section {', '.join(sorted(unknown))}; the sections are {', '.join(SECTIONS)}")
    setup_logging()
    sz = DRY if a.dry_run else Sizes()
    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: run it on a GPU machine, or --dry-run for the CPU rehearsal")
    device = torch.device("cuda", 0) if sz.device == "cuda" else torch.device("cpu")
    peak = peak_tflops(device, a.peak_tflops)
    work = a.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    budget = Budget(a.budget_s)
    t0 = time.perf_counter()
    sections: dict[str, Any] = {}

    def section(name: str, fn: Callable[[], dict]) -> dict:
        if name not in a.only:
            sections[name] = {"skipped": "not chosen (--only)"}
            return sections[name]
        if budget.left() <= 0:
            sections[name] = {"skipped": "time budget spent"}
            return sections[name]
        log.info("%s ...", name)
        t = time.perf_counter()
        try:
            sections[name] = fn()
        except Exception as exc:
            log.exception("%s failed", name)
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        sections[name]["seconds"] = round(time.perf_counter() - t, 1)
        return sections[name]

    section("train_step", lambda: measure_steps(sz, device, peak, budget))
    loop = section("loop", lambda: measure_loop(sz, device, work, a.photos, not a.no_dali))
    model = loop.pop("_model", None)
    if model is not None:
        section("serving", lambda: measure_serving(sz, device, work, a.photos, model))
    else:
        sections["serving"] = {"skipped": "no model from the loop section"}
    section("estimate", lambda: estimate(loop))
    section("train_step_compile", lambda: measure_steps(sz, device, peak, budget, compiled=True))
    for batch, rows in sections["train_step_compile"].get("by_batch", {}).items():  # is compile worth it?
        eager = sections["train_step"].get("by_batch", {}).get(batch, {}).get("bf16_channels_last", {})
        if "img_per_s" in eager and "img_per_s" in rows.get("bf16_channels_last_compile", {}):
            rows["compile_over_eager"] = round(rows["bf16_channels_last_compile"]["img_per_s"] / eager["img_per_s"], 3)
    result = {
        "benchmark": "gpu_check",
        "dry_run": a.dry_run,
        "sizes": asdict(sz),
        "environment": environment(device, peak),
        "sections": sections,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    (a.out / "gpu_check.json").write_text(text + "\n")
    (a.out / "gpu_check.md").write_text(markdown(result))
    print(text)
    failed = [k for k, v in sections.items() if "error" in v]
    if failed:
        log.error("failed sections: %s (gpu_check.json has why)", ", ".join(failed))
    log.info("wrote %s and %s", a.out / "gpu_check.json", a.out / "gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
