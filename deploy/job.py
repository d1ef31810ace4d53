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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from deploy.steps import PY, ray_job_api_up, run, stage, submit_job, wait_until
from pipeline.cli import Flag, add_fields, env_values, given, setup_logging

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
    workers: int | Literal["auto"] = 2  # data-parallel Ray Train workers; auto: trainer.run resolves it
    gpus_per_worker: int | Literal["auto"] = 0  # 2: the paper's two columns on two GPUs; auto: from the cluster
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
        cmd = [
            PY,
            "-m",
            "trainer.run",
            "--data",
            str(self.shards),
            "--storage-path",
            str(self.runs),
            "--name",
            self.name,
            "--preset",
            self.training_preset,
            "--workers",
            str(self.workers),
            "--gpus-per-worker",
            str(self.gpus_per_worker),
        ]
        if self.epochs:
            cmd += ["--epochs", str(self.epochs)]
        if self.input_size:
            cmd += ["--input-size", str(self.input_size)]
        return cmd


FLAGS = {
    "data": Flag("where the raw sample tree and the shard set go"),
    "runs": Flag("training's storage path (run folders)"),
    "imagenet": Flag("a raw ImageNet tree (none: the built-in sample data)"),
    "address": Flag("the Ray job API"),
    "name": Flag("run name: the same name resumes the run"),
    "preset": Flag("training recipe (empty: paper with a mounted ImageNet, sample on the sample data)"),
    "epochs": Flag("epochs to train (0: the recipe's)"),
    "workers": Flag("data-parallel Ray Train workers (auto: as many as the cluster's GPUs hold)"),
    "gpus_per_worker": Flag("2: the paper's two columns on two GPUs; auto: 2, 1 or 0 from the cluster's nodes"),
    "shard_size": Flag("images per shard (0: 64 for the sample, pipeline.shard's default else)"),
    "input_size": Flag("the model's input (0: trainer.run's, the paper's 227; 67 trains ~10x faster on CPUs)"),
    "wait_s": Flag("how long to wait for the Ray job API, in seconds"),
}


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> JobConfig:
    """Flags, else JOB_* environment variables, else JobConfig's defaults."""
    environ = os.environ if environ is None else environ
    p = argparse.ArgumentParser(prog="python -m deploy.job", description=__doc__.split("\n\n")[0])
    base = JobConfig(**env_values(JobConfig, ENV_PREFIX, environ))
    names = add_fields(p, JobConfig, defaults=base, flags=FLAGS, env_prefix=ENV_PREFIX)
    return replace(base, **given(p.parse_args(argv), names))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
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
    run(
        [
            PY,
            "-m",
            "pipeline.shard",
            "--src",
            str(src),
            "--out",
            str(cfg.shards),
            "--quiet",
            *(["--shard-size", str(shard_size)] if shard_size else []),
        ],
        env=env,
    )

    stage(
        f"3/4 training ({cfg.training_preset} preset): ray job submit --address {cfg.address} -- python -m trainer.run"
    )
    wait_until(lambda: ray_job_api_up(cfg.address, env), cfg.wait_s, f"the Ray job API at {cfg.address}")
    submit_job(cfg.address, cfg.train_command(), env)

    stage("4/4 figures (python -m trainer.figures)")
    run_dir = cfg.runs / cfg.name
    run([PY, "-m", "trainer.figures", str(run_dir), "--shards", str(cfg.shards)], env=env)
    log.info(
        "done in %.0f s: run folder %s; the api service now serves its newest checkpoint",
        time.perf_counter() - t0,
        run_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
