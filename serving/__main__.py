"""`python -m serving [--checkpoint PATH]`: the prediction service on uvicorn.

With no --checkpoint (and no ALEXNET_CHECKPOINT) it serves the newest checkpoint under the
home's runs folder ($ALEXNET_HOME/runs, default ~/alexnet/runs: pipeline.home), where
`python -m trainer.run` writes by default.

Settings come from flags, else ALEXNET_* environment variables or a .env file
(serving/settings.py, which holds every default), else defaults. Settings and the checkpoint
are checked before the server starts: a bad setting (an empty token, say) or a missing,
incomplete or mismatched checkpoint is a clear error and exit status 2, not a server that
answers 500s. Needs only `pip install '.[serving]'` and torch: no Ray, pyarrow, DALI or
matplotlib is imported on this path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.cli import setup_logging
from pipeline.home import RUNS, described, runs_dir

log = logging.getLogger("serving")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint folder, a run folder (its newest checkpoint) or a folder of run folders (default: "
        f"the home's runs folder, {described(runs_dir())})",
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--inference",
        choices=("auto", "eager", "optimized"),
        help="how the network runs: eager (as trained), optimized (same answers, faster on a CPU), auto (default)",
    )
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None)
    p.add_argument(
        "--take-turns",
        choices=("auto", "on", "off"),
        help="decodes and the forward pass take turns on the cores (auto, the default: where the model runs on "
        "the CPU)",
    )
    p.add_argument("--max-gather-ms", type=float, help="taking turns, how long a batch may wait for decodes under way")
    p.add_argument("--max-upload-bytes", type=int)
    p.add_argument("--max-in-flight", type=int, help="image requests served at once; more get 503")
    p.add_argument("--max-queue-images", type=int, help="images waiting for the batcher; more get 503")
    p.add_argument("--request-timeout-s", type=float, help="deadline of an admitted request (then 503)")
    p.add_argument("--header-timeout-s", type=float, help="a request's headers must arrive within this (then 408)")
    p.add_argument("--body-timeout-s", type=float, help="a request's body must arrive within this (then 408)")
    p.add_argument("--max-connections", type=int, help="open connections in all; more get 503 and are closed")
    p.add_argument(
        "--max-connections-per-client",
        type=int,
        help="open connections from one client address; more get 503 and are closed",
    )
    p.add_argument("--grpc-port", type=int, help="the Open Inference Protocol's gRPC port (default 8001)")
    p.add_argument("--no-grpc", dest="grpc", action="store_const", const=False, default=None, help="no gRPC server")
    p.add_argument(
        "--backend", choices=("torch", "onnxruntime"), help="run the model in PyTorch (default) or ONNX Runtime"
    )
    p.add_argument(
        "--watch-s",
        type=float,
        help="with a run folder: switch to a newer checkpoint when one appears, checking every N s",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    from pydantic import ValidationError

    from serving.settings import Settings

    try:
        settings = Settings(**{k: v for k, v in vars(a).items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            log.error("cannot serve: bad setting%s: %s", f" {where}" if where else "", e["msg"])
        return 2

    import uvicorn

    from serving.app import create_app
    from trainer.checkpoint import read_meta, resolve
    from trainer.checkpoint_meta import CheckpointError

    try:
        found = resolve(settings.checkpoint)  # a checkpoint, or a run folder's newest (then followed)
        read_meta(found.checkpoint)
    except CheckpointError as exc:
        log.error("cannot serve: %s", exc)
        if "checkpoint" not in settings.model_fields_set:
            log.error(
                "no --checkpoint given: looked in the home's runs folder %s (home %s, ALEXNET_HOME); train "
                "there first (ray job submit -- python -m trainer.run) or give --checkpoint",
                settings.checkpoint,
                settings.home,
            )
        return 2
    checkpoint, run_dir = found.checkpoint, found.run_dir
    given = "checkpoint" in settings.model_fields_set
    settings = settings.model_copy(update={"checkpoint": checkpoint, "run_dir": run_dir})
    if not given:
        log.info("home %s (ALEXNET_HOME): serving the newest checkpoint under %s", settings.home, settings.home / RUNS)
    log.info(
        "serving %s on http://%s:%d (batching %s, max batch %d, auth %s, %s)",
        checkpoint,
        settings.host,
        settings.port,
        "on" if settings.batching else "off",
        settings.max_batch,
        "on" if settings.auth else "OFF",
        f"newer checkpoints of {run_dir} every {settings.watch_s:g} s"
        if run_dir and settings.watch_s > 0
        else "this checkpoint only",
    )
    log.info(
        "limits: %d requests in flight, %d images queued, %g s deadline, %d decodes at once of at most "
        "%d MiB, uploads up to %d bytes (%d MiB of bodies at once)",
        settings.max_in_flight,
        settings.max_queue_images,
        settings.request_timeout_s,
        settings.max_decodes,
        settings.max_decode_bytes >> 20,
        settings.max_upload_bytes,
        settings.max_body_memory_bytes >> 20,
    )
    log.info(
        "edge: headers within %g s, bodies within %g s, %d connections (%d per client address)",
        settings.header_timeout_s,
        settings.body_timeout_s,
        settings.max_connections,
        settings.max_connections_per_client,
    )
    log.info(
        "Open Inference Protocol: model %r over HTTP (/v2) and %s; %s back-end",
        settings.model_name,
        f"gRPC on {settings.host}:{settings.grpc_port} ({settings.grpc_max_concurrent_rpcs} calls at once, "
        f"{settings.grpc_max_connections} connections)"
        if settings.grpc
        else "no gRPC",
        settings.backend,
    )
    _room_for_connections(settings.max_connections + (settings.grpc_max_connections if settings.grpc else 0))
    app = create_app(settings)
    # The edge's protocol (serving.edge) bounds connections and times out slow clients;
    # uvicorn's own limit_concurrency is left off: it counts idle sockets and would answer
    # every client 503 while a few slow ones hold them.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="info", http=app.state.connections.protocol(), ws="none"
    )
    return 0


def _room_for_connections(connections: int, spare: int = 256) -> None:
    """Raise the soft open-files limit to fit `connections` sockets and the process's own
    files, where the hard limit allows; else say where the server will stop accepting."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < want:
            log.warning(
                "open files limited to %d (hard limit): fewer than max_connections=%d + %d; lower "
                "ALEXNET_MAX_CONNECTIONS or raise the limit (ulimit -n)",
                target,
                connections,
                spare,
            )


if __name__ == "__main__":
    sys.exit(main())
