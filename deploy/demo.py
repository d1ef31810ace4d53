"""`python -m deploy.demo`: the whole system on the built-in sample data, on one machine.

    sample data -> pipeline.shard -> ray start --head (loopback) -> ray job submit --
    python -m trainer.run (sample preset) -> python -m serving on the checkpoint ->
    POST /predict on a held-out validation image -> the top-5 -> stop what it started

Everything lands under --out (default ./demo): raw/, shards/, runs/demo/ (config.json,
metrics.jsonl, checkpoints, learning_curves.png) and prediction.json. Rerunning reuses the
sample data and shard set (both are idempotent) and resumes or extends the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.steps import (PY, RAY, free_port, ray_head_ports, ray_job_api_up, run, stage, stop_group, submit_job,
                          wait_until)

log = logging.getLogger("deploy.demo")


@dataclass
class DemoConfig:
    out: Path = Path("demo")
    epochs: int = 6
    workers: int = 2
    name: str = "demo"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DemoConfig.out)
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    p.add_argument("--workers", type=int, default=DemoConfig.workers)
    a = p.parse_args(argv)
    cfg = DemoConfig(out=a.out.resolve(), epochs=a.epochs, workers=a.workers)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
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
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", *ray_head_ports(),
                             "--disable-usage-stats"],
                            env=env, stdout=ray_log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_until(lambda: ray_job_api_up(address, env), 180, "the Ray head", head)
        log.info("Ray head up: job API %s (loopback only)", address)
        submit_job(address, [PY, "-m", "trainer.run", "--data", str(shards), "--preset", "sample", "--workers",
                             str(cfg.workers), "--epochs", str(cfg.epochs), "--storage-path", str(runs),
                             "--name", cfg.name], env)
    finally:
        stage("stopping Ray")
        stop_group(head)
    stage("figures (python -m trainer.figures): learning curves, conv1 kernels, retrieval")
    run([PY, "-m", "trainer.figures", str(runs / cfg.name), "--shards", str(shards)], env=env)

    stage("4/5 serving the checkpoint (python -m serving)")
    port = free_port()
    server = subprocess.Popen([PY, "-m", "serving", "--checkpoint", str(runs / cfg.name), "--port", str(port)],
                              env=env, stdout=open(cfg.out / "serving.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "the prediction service", server)
        stage("5/5 POST /predict on a held-out validation image")
        image = sorted((raw / "val").glob("*/*.JPEG"))[-1]
        answer = httpx.post(f"{url}/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")},
                            timeout=60).json()
        (cfg.out / "prediction.json").write_text(json.dumps({"image": str(image), **answer}, indent=2) + "\n")
        log.info("curl -F file=@%s %s/predict  (true class: %s)", image, url, image.parent.name)
        for rank, pred in enumerate(answer["predictions"], 1):
            log.info("  %d. %-40s %5.1f%%  %s", rank, pred["name"][:40], 100 * pred["probability"], pred["wnid"])
    finally:
        stop_group(server)
    metrics = [json.loads(x) for x in (runs / cfg.name / "metrics.jsonl").read_text().splitlines()]
    log.info("done in %.0f s. Shards: %s; run folder: %s (metrics.jsonl, checkpoints, learning_curves.png, "
             "conv1_kernels.png, retrieval.png); "
             "final val top-1 error %.2f", time.perf_counter() - t0, shards, runs / cfg.name,
             metrics[-1]["val_top1_error"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
