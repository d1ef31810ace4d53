"""The mission's commands exactly as written, one after the other, with no flags:

    python -m pipeline.shard --src /imagenet
    ray job submit -- python -m trainer.run
    python -m serving

on the built-in sample data, chained by the home (ALEXNET_HOME, pipeline.home) alone: the
shard set lands in the home, the job trains from it into the home's runs folder, the service
finds the newest checkpoint there and answers POST /predict. What a user sets, the test sets
the same way, in the environment: ALEXNET_HOME (a temp folder) where the commands run and
where Ray starts (a job inherits Ray's environment, not the submitting shell's), a small
recipe through ALEXNET_RECIPE (never a flag), RAY_ADDRESS for `ray job submit`, ALEXNET_PORT
for a free port. `docker compose up`, the fourth, runs in CI's compose phase (.ci/compose)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.steps import free_port, private_ray_head, short_temp_dir, stop_group, wait_until
from tests.raycluster import head_env, ray_env, stop_process_group
from trainer.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow

# The sample recipe at the least input size, one epoch: a few seconds of training.
TINY_RECIPE = """
[recipe]
epochs = 1
batch_size = 32
lr = 0.005
ten_crop_at_end = false
[model]
init = "kaiming"
input_size = 67
[input]
divide_by_std = true
"""


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_commands_as_written_chain_through_the_home(sample_root, tmp_path):
    home = tmp_path / "home"
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    base = {k: v for k, v in ray_env().items() if not k.startswith("ALEXNET_") and k != "RAY_ADDRESS"}
    user = {**base, "ALEXNET_HOME": str(home), "ALEXNET_RECIPE": str(recipe)}

    def command(*argv: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{argv}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r

    # 1. python -m pipeline.shard --src /imagenet
    r = command(sys.executable, "-m", "pipeline.shard", "--src", str(sample_root), env=user)
    assert f"shard set -> {home / 'shards'}" in r.stderr and "ALEXNET_HOME=" in r.stderr
    assert json.loads((home / "shards" / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 297

    # 2. ray job submit -- python -m trainer.run, on a Ray started with the user's environment
    gcs, dash = free_port(), free_port()
    temp_dir = short_temp_dir("alexnet-chain-ray-")
    with open(tmp_path / "ray.log", "w") as log:
        head = subprocess.Popen(
            [*private_ray_head(gcs, dash, temp_dir), "--num-cpus=4", "--num-gpus=0"],
            env={**head_env(), **user},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--", "python", "-m", "trainer.run"]
        env = {**user, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}
        for _ in range(60):  # until the job API and its agent answer (a refused submission starts nothing)
            r = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            if r.returncode == 0 or not any(s in r.stdout + r.stderr for s in ("No available agent", "Connection")):
                break
            time.sleep(2)
        logs = r.stdout + r.stderr
        assert r.returncode == 0, logs[-4000:]
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert f"home {home} (ALEXNET_HOME={home})" in logs and f"recipe {recipe}" in logs
    assert "over 1 worker(s) x 0 GPU(s)" in logs and "bf16 autocast off, channels_last off" in logs
    run = home / "runs" / "alexnet"
    assert latest_checkpoint(run) is not None
    config = json.loads((run / "config.json").read_text())
    assert config["input"]["data"] == str(home / "shards") and config["runtime"]["storage_path"] == str(home / "runs")
    assert (config["runtime"]["workers"], config["runtime"]["gpus_per_worker"]) == (1, 0)  # resolved, recorded

    # 3. python -m serving: the newest checkpoint under the home's runs folder
    port = free_port()
    image = next((sample_root / "val").glob("*/*.JPEG"))
    with open(tmp_path / "serving.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "serving"],
            cwd=tmp_path,
            env={
                **user,
                "ALEXNET_PORT": str(port),
                "ALEXNET_GRPC_PORT": str(free_port()),
            },  # free ones: tests run side by side
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), 120, "the prediction service", server)
        answer = httpx.post(f"{url}/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    finally:
        stop_group(server)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5
    assert answer.json()["checkpoint"]["checkpoint"] == latest_checkpoint(run).name
    served = (tmp_path / "serving.log").read_text()
    assert f"home {home} (ALEXNET_HOME): serving the newest checkpoint under {home / 'runs'}" in served
