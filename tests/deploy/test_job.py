"""deploy.job, the compose stack's job service: its settings, and a real run of it against a
real Ray cluster (the session's), as compose runs it but without Docker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from deploy.job import JobConfig, parse_args
from tests.helpers import REPO
from trainer.run import parse_args as train_parse_args


def test_settings_come_from_flags_then_environment_then_defaults():
    cfg = parse_args(["--epochs", "3"], environ={"JOB_EPOCHS": "7", "JOB_WORKERS": "4", "JOB_IMAGENET": ""})
    assert cfg.epochs == 3  # a flag beats the environment
    assert cfg.workers == 4  # the environment beats the default
    assert cfg.imagenet is None  # compose passes an unset variable on as ""
    assert cfg.address == JobConfig.address
    cfg = parse_args([], environ={"JOB_IMAGENET": "/imagenet", "JOB_GPUS_PER_WORKER": "2"})
    assert str(cfg.imagenet) == "/imagenet" and cfg.gpus_per_worker == 2
    cfg = parse_args([], environ={"JOB_WORKERS": "auto", "JOB_GPUS_PER_WORKER": "auto"})  # the GPU override's
    train, _ = train_parse_args(cfg.train_command()[3:])
    assert (train.runtime.workers, train.runtime.gpus_per_worker) == ("auto", "auto")


def test_the_training_command_is_one_trainer_run_accepts():
    cfg = JobConfig(epochs=5, workers=4, gpus_per_worker=2, preset="paper", name="imagenet", input_size=67)
    command = cfg.train_command()
    assert command[1:3] == ["-m", "trainer.run"]
    train, args = train_parse_args(command[3:])
    assert (
        train.recipe.epochs,
        train.runtime.workers,
        train.runtime.gpus_per_worker,
        train.recipe.name,
        train.runtime.name,
        train.model.input_size,
    ) == (5, 4, 2, "paper", "imagenet", 67)
    assert train.input.data == "/data/shards" and train.runtime.storage_path == "/runs" and args.address is None
    # epochs 0: the preset's own
    train, _ = train_parse_args(JobConfig().train_command()[3:])
    assert train.recipe.name == "sample" and train.recipe.epochs == 8 and train.model.input_size == 227


def test_the_preset_follows_the_data_unless_given():
    """A mounted ImageNet trains the paper's recipe; the sample data the sample preset; an
    explicit preset wins. Compose passes PRESET on with no default of its own."""

    def preset(environ: dict) -> str:
        train, _ = train_parse_args(parse_args([], environ=environ).train_command()[3:])
        return train.recipe.name

    assert preset({"JOB_IMAGENET": "/imagenet", "JOB_PRESET": ""}) == "paper"
    assert preset({"JOB_IMAGENET": "", "JOB_PRESET": ""}) == "sample"
    assert preset({"JOB_IMAGENET": "/imagenet", "JOB_PRESET": "sample"}) == "sample"
    assert preset({"JOB_PRESET": "paper"}) == "paper"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = compose["services"]["job"]["environment"]
    assert env["JOB_PRESET"] == "${PRESET:-}" and env["JOB_IMAGENET"] == "${IMAGENET_DIR:+/imagenet}"


@pytest.mark.slow
def test_job_shards_trains_on_the_cluster_and_draws_figures(ray_cluster, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "deploy.job",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--address",
        ray_cluster.dashboard_url,
        "--epochs",
        "1",
        "--workers",
        "2",
        "--name",
        "job",
        "--input-size",
        "67",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("1/4", "2/4", "3/4", "4/4"):
        assert f"==== {stage}" in r.stderr
    assert json.loads((data / "shards" / "manifest.json").read_text())["splits"]["val"]["num_samples"] == 99
    run = runs / "job"
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    for name in ("learning_curves.png", "conv1_kernels.png", "retrieval.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG", name
