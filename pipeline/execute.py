"""Running the planned shards: in this process, in worker processes, or as Ray tasks.

Each executor calls the same `pipeline.writer.write_shard` once per ShardSpec and yields the
completion records as shards finish (in any order; the manifest orders them by plan).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pipeline.plan import ShardError
from pipeline.writer import ShardSpec, write_shard


def run_local(specs: list[ShardSpec], workers: int) -> Iterator[dict]:
    if workers <= 1:
        yield from map(write_shard, specs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: no inherited locks or threads from the parent, the same on every platform.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(write_shard, s) for s in specs]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:  # a full disk, say: the shards not started yet would fail the same way
            for fut in futures:
                fut.cancel()
            raise


def run_ray(specs: list[ShardSpec], address: str) -> Iterator[dict]:
    """The same write_shard, as one Ray task per shard. SRC and OUT must be visible at the
    same paths on every node (a shared filesystem)."""
    try:
        import ray
    except ImportError as exc:
        raise ShardError("Ray tasks need Ray: pip install 'alexnet-2012[cluster]'") from exc
    import pipeline

    started_here = not ray.is_initialized()
    if started_here:
        # py_modules ships this package to the cluster, so its nodes need only the dependencies.
        ray.init(address=address, runtime_env={"py_modules": [os.path.dirname(pipeline.__file__)]}, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        pending = [remote.remote(s) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()
