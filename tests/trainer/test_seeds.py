"""The one per-epoch, per-rank seed function (trainer/seeds.py `epoch_seed`) that both input
back-ends and the per-rank RNG streams derive from, and the per-rank streams themselves
(seeded, captured into a checkpoint, restored)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.seeds import SEED_MODULUS, capture_rng, epoch_seed, restore_rng, seed_rank

CPU = [torch.device("cpu")]


def test_epoch_seed_depends_on_run_epoch_rank_and_stream_only():
    ranks = [None, *range(8)]
    seeds = {epoch_seed(s, e, r, k) for s in range(3) for e in range(20) for r in ranks for k in ("data", "rng")}
    assert len(seeds) == 3 * 20 * 9 * 2  # no two (seed, epoch, rank, stream) share a stream
    assert all(0 <= x < SEED_MODULUS < 2**31 for x in seeds)  # a valid DALI pipeline seed as well
    assert epoch_seed(-1, 0, 0) == epoch_seed(2**64 - 1, 0, 0)  # seeds are taken mod 2^64
    for epoch, rank in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            epoch_seed(0, epoch, rank)


def test_epoch_seed_is_fixed_forever():
    # Pinned: changing the function would change every resumed run's data, on both back-ends.
    assert epoch_seed(3, 2, 1) == epoch_seed(3, 2, 1, "data") == 1256734983
    assert [epoch_seed(0, 0, 0), epoch_seed(0, 0, None), epoch_seed(2012, 89, 7)] == PINNED


PINNED = [1112289629, 1945763902, 1707620697]


def test_rank_streams_differ_and_restore_exactly():
    seed_rank(0, rank=0)
    a = torch.rand(5), np.random.rand(), random.random()
    seed_rank(0, rank=1)
    b = torch.rand(5), np.random.rand(), random.random()
    assert not torch.equal(a[0], b[0]) and a[1] != b[1] and a[2] != b[2]
    state = capture_rng(CPU)
    want = torch.rand(5), np.random.rand(), random.random(), np.random.randn()
    torch.rand(100), np.random.rand(100), random.random()  # move on
    restore_rng(state, CPU)
    got = torch.rand(5), np.random.rand(), random.random(), np.random.randn()
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]
