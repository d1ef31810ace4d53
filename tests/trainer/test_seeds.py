"""The one per-epoch, per-rank seed function (trainer/seeds.py `epoch_seed`) that both input
back-ends and the per-rank RNG streams derive from."""

from __future__ import annotations

import pytest

from trainer.seeds import SEED_MODULUS, epoch_seed


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
