"""Random streams per run, epoch and rank: one definition, so that an interrupted and resumed
run draws exactly the numbers an uninterrupted one draws.

- `epoch_seed(run_seed, epoch, rank, stream="data")`: the seed of one stream of one worker in
  one epoch, the one such function of the project. Both input back-ends seed epoch e of rank
  r from `epoch_seed(seed, e, r)` (trainer.loaders: DALI's pipeline seed; trainer.wds_loader:
  the window shuffle and each batch's draws, with `rank=None` for the shard order all ranks
  share), so epoch e's order and augmentation do not depend on whether the run was stopped
  before it: resuming needs only e.
- Dropout and anything else drawn from Python's `random`, numpy or torch (CPU and every CUDA
  device a worker uses) are seeded per rank at the start (`seed_rank`) and their state is
  saved per rank in every checkpoint (`capture_rng`) and put back on resume (`restore_rng`).
  Rank r's stream differs from rank s's: with one stream, every worker would draw the same
  dropout masks for its part of the batch.

The captured state holds only ints, lists and tensors: it loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

import numpy as np
import torch

SEED_MODULUS = 2**31 - 1  # DALI and numpy both take it


def epoch_seed(run_seed: int, epoch: int, rank: int | None, stream: str = "data") -> int:
    """A seed in [0, 2^31 - 1) (valid for DALI and numpy) for `stream` of worker `rank` in
    `epoch` (0-based) of a run seeded with `run_seed`; `rank=None`: the stream every rank
    shares. A hash, so nearby arguments give unrelated seeds; fixed forever, since changing it
    would change every resumed run's data."""
    if epoch < 0 or (rank is not None and rank < 0):
        raise ValueError(f"epoch and rank must be >= 0 (got epoch={epoch}, rank={rank})")
    who = "all" if rank is None else int(rank)
    key = f"alexnet-2012/{stream}/{int(run_seed) % 2**64}/{int(epoch)}/{who}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % SEED_MODULUS


def _cuda_indices(devices: Iterable[torch.device]) -> list[int]:
    return sorted(
        {
            d.index if d.index is not None else torch.cuda.current_device()
            for d in map(torch.device, devices)
            if d.type == "cuda"
        }
    )


def seed_rank(run_seed: int, rank: int) -> None:
    """A fresh run: rank's own seed for Python, numpy and torch (CPU and all CUDA devices)."""
    seed = epoch_seed(run_seed, 0, rank, "rng")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng(devices: Iterable[torch.device]) -> dict:
    """This process's RNG states (Python, numpy, torch CPU, torch CUDA per device used)."""
    version, internal, gauss = random.getstate()
    state = np.random.get_state()
    assert isinstance(state, tuple)  # the legacy form: the global RandomState is MT19937
    kind, keys, pos, has_gauss, cached = state
    cuda = _cuda_indices(devices)
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": {str(i): torch.cuda.get_rng_state(i) for i in cuda},
    }


def restore_rng(state: dict, devices: Iterable[torch.device]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = _cuda_indices(devices)
    saved = state.get("cuda", {})
    if sorted(saved) != sorted(str(i) for i in cuda):
        raise ValueError(f"the checkpoint holds CUDA RNG states for devices {sorted(saved)}, this worker uses {cuda}")
    for i in cuda:
        torch.cuda.set_rng_state(saved[str(i)], i)
