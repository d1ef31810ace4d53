"""The project's home: one folder that every command agrees on, so that the mission's commands
chain with no flags.

    python -m pipeline.shard --src /imagenet           writes   $ALEXNET_HOME/shards
    ray job submit -- python -m trainer.run            trains from there into $ALEXNET_HOME/runs
    python -m serving                                  serves the newest checkpoint under runs

ALEXNET_HOME (an environment variable; default ~/alexnet) is the one setting. Every flag that
names one of these paths (--out, --data, --storage-path, --checkpoint) still wins over it.

On a multi-node Ray cluster the home must be storage that every node sees at the same path (a
shared filesystem), and the variable must be set where Ray starts on every node (the job's
driver and workers inherit Ray's environment, not the submitting shell's), or passed with the
job: `ray job submit --runtime-env-json '{"env_vars": {"ALEXNET_HOME": "/shared/alexnet"}}'`.
trainer.run checks from every node that could run a worker that the shard set is there before
training starts (trainer.layout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HOME_ENV = "ALEXNET_HOME"
DEFAULT_HOME = "~/alexnet"
SHARDS = "shards"
RUNS = "runs"


def home(environ: Mapping[str, str] = os.environ) -> Path:
    """$ALEXNET_HOME (an empty variable counts as unset), else ~/alexnet; absolute, `~` expanded."""
    return Path(environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


def shards_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where pipeline.shard writes the shard set, and trainer.run reads it, by default."""
    return home(environ) / SHARDS


def runs_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """trainer.run's storage path (run folders), and where serving looks for checkpoints, by default."""
    return home(environ) / RUNS


def described(path: Path, environ: Mapping[str, str] = os.environ) -> str:
    """A default path as --help and the start-up lines show it: where it is and why."""
    source = f"{HOME_ENV}={environ[HOME_ENV]}" if environ.get(HOME_ENV) else f"{HOME_ENV} unset: {DEFAULT_HOME}"
    return f"{path} ({source})"
