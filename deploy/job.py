"""`python -m deploy.job`: the compose stack's `job` service, against a running Ray cluster.

    raw data (a mounted ImageNet, else the built-in sample) -> pipeline.shard -> wait for the
    Ray job API -> ray job submit -- python -m trainer.run -> trainer.figures

The same stages as `python -m deploy.demo`, but the cluster is someone else's (compose's
ray-head and ray-workers) and every path is a volume they share. Each stage is idempotent,
so `docker compose up` again reuses the shards and resumes the run under the same name.
Settings come from flags, else JOB_* environment variables (what compose passes on).

The training preset follows the data unless one is given (`--preset`, JOB_PRESET, compose's
PRESET): `paper` (section 5: 90 epochs, batch 128, lr 0.01) for a mounted ImageNet, `sample`
(a few CPU minutes) for the built-in sample data.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from deploy.steps import PY, ray_job_api_up, run, stage, submit_job, wait_until

log = logging.getLogger("deploy.job")
ENV_PREFIX = "JOB_"


@dataclass(frozen=True)
class JobConfig:
    data: Path = Path("/data")  # raw sample tree and shard set go here
    runs: Path = Path("/runs")  # training's storage path (run folders)
    imagenet: Path | None = None  # a raw ImageNet tree; None: the built-in sample data
    address: str = "http://ray-head:8265"  # the Ray job API
    name: str = "compose"  # run name: the same name resumes the run
    preset: str = ""  # "": paper with a mounted ImageNet, sample on the sample data
    epochs: int = 0  # 0: the preset's
    workers: int = 2  # data-parallel Ray Train workers
    gpus_per_worker: int = 0  # 2: the paper's two columns on two GPUs
    shard_size: int = 0  # images per shard; 0: 64 for the sample, pipeline.shard's default else
    input_size: int = 0  # the model's input; 0: trainer.run's (the paper's 227); 67 trains ~10x faster on CPUs
    wait_s: float = 600  # how long to wait for the Ray job API

    @property
    def training_preset(self) -> str:
        return self.preset or ("sample" if self.imagenet is None else "paper")

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    def train_command(self) -> list[str]:
        cmd = [PY, "-m", "trainer.run", "--data", str(self.shards), "--storage-path", str(self.runs),
               "--name", self.name, "--preset", self.training_preset, "--workers", str(self.workers),
               "--gpus-per-worker", str(self.gpus_per_worker)]
        if self.epochs:
            cmd += ["--epochs", str(self.epochs)]
        if self.input_size:
            cmd += ["--input-size", str(self.input_size)]
        return cmd


def parse_args(argv: list[str] | None = None, environ: dict | None = None) -> JobConfig:
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m deploy.job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(JobConfig):
        env = ENV_PREFIX + f.name.upper()
        raw = environ.get(env) or None  # compose passes unset variables on as ""
        typ = {"int": int, "float": float, "str": str}.get(str(f.type), Path)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=typ(raw) if raw else f.default,
                       help=f"(env {env})")
    a = p.parse_args(argv)
    return JobConfig(**vars(a))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    env = dict(os.environ)
    t0 = time.perf_counter()

    if cfg.imagenet is None:
        stage("1/4 sample data (pipeline.sample)")
        src = cfg.data / "raw"
        run([PY, "-m", "pipeline.sample", "--out", str(src)], env=env)
    else:
        stage(f"1/4 raw ImageNet mounted at {cfg.imagenet}")
        src = cfg.imagenet
    stage("2/4 shards (pipeline.shard)")
    shard_size = cfg.shard_size or (64 if cfg.imagenet is None else 0)
    run([PY, "-m", "pipeline.shard", "--src", str(src), "--out", str(cfg.shards), "--quiet",
         *(["--shard-size", str(shard_size)] if shard_size else [])], env=env)

    stage(f"3/4 training ({cfg.training_preset} preset): ray job submit --address {cfg.address} -- "
          "python -m trainer.run")
    wait_until(lambda: ray_job_api_up(cfg.address, env), cfg.wait_s, f"the Ray job API at {cfg.address}")
    submit_job(cfg.address, cfg.train_command(), env)

    stage("4/4 figures (python -m trainer.figures)")
    run_dir = cfg.runs / cfg.name
    run([PY, "-m", "trainer.figures", str(run_dir), "--shards", str(cfg.shards)], env=env)
    log.info("done in %.0f s: run folder %s; the api service now serves its newest checkpoint",
             time.perf_counter() - t0, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
