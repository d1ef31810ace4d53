"""`python -m deploy.demo`: the whole system on the built-in sample data, on one machine.

    sample data -> pipeline.shard -> ray start --head (loopback) -> ray job submit --
    python -m trainer.run (sample preset) -> python -m serving on the checkpoint ->
    POST /predict on every held-out validation image -> the served model's accuracy and
    three of its right answers (one per class) -> stop what it started

The three images are picked deterministically: in class order, the first image (by path) of
each class that the model gets right, for the first three such classes.

Everything lands under --out (default ./demo): raw/, shards/, runs/demo/ (config.json,
metrics.jsonl, checkpoints, learning_curves.png) and prediction.json. Rerunning reuses the
sample data and shard set (both are idempotent) and resumes or extends the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.steps import (
    PY,
    free_port,
    private_ray_head,
    ray_job_api_up,
    run,
    short_temp_dir,
    stage,
    stop_group,
    submit_job,
    wait_until,
)
from pipeline.cli import setup_logging
from trainer.runfolder import read_metrics

log = logging.getLogger("deploy.demo")


EXAMPLES = 3
OVERLOAD_RETRIES = 5  # a busy machine can answer 503 (the service's deadline): as a client should, retry


def predict_val(url: str, val: Path) -> dict:
    """POST every validation image; the top-1 accuracy over those the service accepts (the
    sample's deliberately broken files get a 400, as the sharder skipped them) and EXAMPLES
    right answers, one per class, chosen deterministically (class order, then path order)."""
    answers: list[tuple[Path, dict]] = []
    examples: list[dict] = []
    with httpx.Client(timeout=60) as client:
        for image in sorted(val.glob("*/*.JPEG")):
            for attempt in range(OVERLOAD_RETRIES + 1):  # a 503 is the service shedding load: retry later
                r = client.post(f"{url}/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
                if r.status_code != 503 or attempt == OVERLOAD_RETRIES:
                    break
                time.sleep(float(r.headers.get("retry-after", 1)))
            if r.status_code == 200:
                answers.append((image, r.json()))
    for image, answer in answers:  # sorted by class folder, then name
        right = answer["predictions"][0]["wnid"] == image.parent.name
        if right and len(examples) < EXAMPLES and all(e["true_wnid"] != image.parent.name for e in examples):
            examples.append({"image": str(image), "true_wnid": image.parent.name, **answer})
    correct = sum(a["predictions"][0]["wnid"] == i.parent.name for i, a in answers)
    return {
        "answered": len(answers),
        "correct": correct,
        "accuracy": correct / max(len(answers), 1),
        "examples": examples,
    }


def shown(path: Path) -> Path:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    epochs: int = 6
    input_size: int | None = None  # None: trainer.run's (the paper's 227); 67, the least, trains ~10x faster on a CPU
    workers: int = 2
    name: str = "demo"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request: 99 of them
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DemoConfig.out)
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    p.add_argument(
        "--input-size",
        type=int,
        default=DemoConfig.input_size,
        help="model input (default: trainer.run's, the paper's 227; 67, the least, trains ~10x faster on a CPU)",
    )
    p.add_argument("--workers", type=int, default=DemoConfig.workers)
    a = p.parse_args(argv)
    cfg = DemoConfig(out=a.out.resolve(), epochs=a.epochs, workers=a.workers, input_size=a.input_size)
    env = dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    t0 = time.perf_counter()
    raw, shards, runs = cfg.out / "raw", cfg.out / "shards", cfg.out / "runs"

    stage("1/5 sample data (pipeline.sample)")
    run([PY, "-m", "pipeline.sample", "--out", str(raw)], env=env)
    stage("2/5 shards (pipeline.shard)")
    run([PY, "-m", "pipeline.shard", "--src", str(raw), "--out", str(shards), "--shard-size", "64"], env=env)

    stage("3/5 training on Ray (ray start --head, ray job submit -- python -m trainer.run)")
    gcs, dash = free_port(), free_port()
    cfg.out.mkdir(parents=True, exist_ok=True)
    ray_log = open(cfg.out / "ray-start.log", "w")
    ray_tmp = short_temp_dir("alexnet-demo-ray-")
    # A one-host Ray of the demo's own: no idle workers prestarted for the first driver (one per
    # CPU, never used: the run's actors carry a runtime env, so they get workers of their own) and
    # no preemption watcher (an actor per run polling for node drains a laptop never has).
    head_env = dict(env, RAY_prestart_worker_first_driver="0", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    head = subprocess.Popen(
        private_ray_head(gcs, dash, ray_tmp),
        env=head_env,
        stdout=ray_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_until(lambda: ray_job_api_up(address, env), 180, "the Ray head", head)
        log.info("Ray head up: job API %s (loopback only)", address)
        submit_job(
            address,
            [
                PY,
                "-m",
                "trainer.run",
                "--data",
                str(shards),
                "--preset",
                "sample",
                "--workers",
                str(cfg.workers),
                "--epochs",
                str(cfg.epochs),
                *(["--input-size", str(cfg.input_size)] if cfg.input_size else []),
                "--storage-path",
                str(runs),
                "--name",
                cfg.name,
            ],
            env,
        )
    finally:
        stage("stopping Ray")
        stop_group(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stage("figures (python -m trainer.figures): learning curves, conv1 kernels, retrieval")
    run([PY, "-m", "trainer.figures", str(runs / cfg.name), "--shards", str(shards)], env=env)

    stage("4/5 serving the checkpoint (python -m serving)")
    port, grpc_port = free_port(), free_port()  # free ones: another server may hold 8000/8001
    server = subprocess.Popen(
        [PY, "-m", "serving", "--checkpoint", str(runs / cfg.name), "--port", str(port), "--grpc-port", str(grpc_port)],
        env=env,
        stdout=open(cfg.out / "serving.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "the prediction service", server)
        stage("5/5 POST /predict on every held-out validation image")
        metrics = read_metrics(runs / cfg.name)
        summary = predict_val(url, raw / "val")
        summary["run_val_top1_error"] = metrics[-1]["val_top1_error"]
        (cfg.out / "prediction.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            "the served model gets %d of %d validation images right (top-1 accuracy %.1f%%; the run's own "
            "val top-1 error: %.3f)",
            summary["correct"],
            summary["answered"],
            100 * summary["accuracy"],
            summary["run_val_top1_error"],
        )
        for example in summary["examples"]:
            log.info(
                "curl -F file=@%s %s/predict  (true class: %s)",
                shown(Path(example["image"])),
                url,
                example["true_wnid"],
            )
            for rank, pred in enumerate(example["predictions"][:3], 1):
                log.info("  %d. %-40s %5.1f%%  %s", rank, pred["name"][:40], 100 * pred["probability"], pred["wnid"])
    finally:
        stop_group(server)
    log.info(
        "done in %.0f s. Shards: %s; run folder: %s (metrics.jsonl, checkpoints, learning_curves.png, "
        "conv1_kernels.png, retrieval.png); "
        "final val top-1 error %.2f",
        time.perf_counter() - t0,
        shards,
        runs / cfg.name,
        metrics[-1]["val_top1_error"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
