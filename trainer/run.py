"""`python -m trainer.run --data SHARDS ...`: train the paper's AlexNet with Ray Train.

Launch it directly (starts a local Ray, or joins RAY_ADDRESS / --address), or as a Ray job
against a running cluster:

    ray job submit --address http://127.0.0.1:8265 -- \\
        python -m trainer.run --data /data/shards --workers 4 --gpus-per-worker 2

The run folder is STORAGE_PATH/NAME: config.json, metrics.jsonl, checkpoint folders
(contract 2), latest_checkpoint.json and learning_curves.png. Submitting again with the same
--name and --storage-path resumes exactly (per-rank RNG streams, per-epoch data seeds) from
the newest checkpoint and finishes the number of epochs asked for. A resubmission whose
settings differ from the run's in anything but --epochs (and the console/retention flags) is
refused before any worker starts, naming each field: --allow-changes applies them from the
next epoch (and records them in config_changes.jsonl), --fresh starts the run over,
--resume PATH continues from a checkpoint of another run. --print-config prints the resolved
configuration and exits.

Input: DALI wherever `import nvidia.dali` works, else the webdataset back-end (logged once);
`--loader dali|webdataset` picks one (trainer.loaders). The driver decides and every worker
of the run uses its choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from trainer.checkpoint import META, POINTER, TRAIN_STATE, CheckpointError, parse_pointer, read_meta, resolve
from trainer.config import (ARCHITECTURE, DEFAULT_PRESET, PAPER, PRESETS, TrainConfig, config_changes,
                            describe_changes, with_preset)
from pipeline.shardset import ShardSetError, open_shard_set
from trainer.loaders import CHOICES as LOADER_CHOICES
from trainer.loaders import LoaderUnavailable, resolve_loader
from trainer.runfolder import CONFIG, CONFIG_CHANGES, DIVERGED, RunFolder

log = logging.getLogger("trainer.run")
EXIT_SETUP, EXIT_DIVERGED = 2, 3


class TrainSetupError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    pass


def check_setup(cfg: TrainConfig) -> None:
    """Everything that can be known wrong before Ray starts a single worker."""
    try:
        shards = open_shard_set(cfg.data, cfg.input_size)
    except ShardSetError as exc:
        raise TrainSetupError(str(exc)) from None
    for split in ("train", "val"):
        if split not in shards.manifest["splits"]:
            raise TrainSetupError(f"shard set {cfg.data} has no {split} split")
    if cfg.workers < 1 or cfg.batch_size % cfg.workers:
        raise TrainSetupError(f"the global batch {cfg.batch_size} must split evenly over {cfg.workers} worker(s)")
    # DALI splits samples (not files) between workers: any count works while each gets some.
    samples = shards.num_samples("train")
    if samples < cfg.workers:
        raise TrainSetupError(f"--workers {cfg.workers} is more than the {samples} train samples of {cfg.data}")
    if cfg.gpus_per_worker not in (0, 1, 2):
        raise TrainSetupError("--gpus-per-worker is 0 (CPU), 1 (both columns on one GPU) or 2 (one column each)")
    if cfg.gpus_per_worker == 1 and cfg.columns == 2:
        log.info("one GPU per worker: both columns on it")
    if cfg.resume_from:
        try:
            folder = resolve(cfg.resume_from)
        except CheckpointError as exc:
            raise TrainSetupError(f"--resume: {exc}") from None
        if not (folder / TRAIN_STATE).is_file():
            raise TrainSetupError(f"--resume {folder}: no {TRAIN_STATE}, so it cannot resume training")


def stored_config(run: RunFolder, cfg: TrainConfig, *, fresh: bool = False) -> tuple[dict | None, str]:
    """What the run was trained with, and what to call it: its newest checkpoint's own record
    (config.json can be ahead of it when an --allow-changes submission never reached a
    checkpoint), else config.json, else --resume's checkpoint; (None, "") for a new run.
    With --fresh the run's own files do not count (they are about to go)."""
    if not fresh:
        pointer = parse_pointer(run.read_text(POINTER))
        if pointer is not None:
            meta = run.read_text(f"{pointer['checkpoint']}/{META}")
            stored = json.loads(meta).get("train_config") if meta else None
            if stored:
                return stored, f"run {run.uri} (checkpoint {pointer['checkpoint']})"
        text = run.read_text(CONFIG)
        if text is not None:
            return json.loads(text), f"run {run.uri}"
    if cfg.resume_from:
        return read_meta(resolve(cfg.resume_from)).get("train_config") or {}, f"checkpoint {cfg.resume_from}"
    return None, ""


def judge_changes(run: RunFolder, cfg: TrainConfig, allow_changes: bool, *, fresh: bool = False) -> dict[str, tuple]:
    """A resumed run keeps its settings unless told otherwise: the differences from what it was
    trained with, refused (TrainSetupError naming each) unless --allow-changes. Reads only."""
    stored, what = stored_config(run, cfg, fresh=fresh)
    if stored is None:
        return {}
    changes = config_changes(stored, cfg)
    listed = describe_changes(changes)
    fixed = sorted(ARCHITECTURE & set(changes))
    if fixed:
        raise TrainSetupError(f"{what} has a different architecture ({listed}); {', '.join(fixed)} cannot change "
                              "on a resumed run: use --fresh or a new --name")
    if changes and not allow_changes:
        raise TrainSetupError(f"{what} was trained with other settings: {listed}. Resubmit with the stored values, "
                              "add --allow-changes to apply the new ones from the next epoch, or --fresh to start "
                              "over")
    return changes


def record_config(run: RunFolder, cfg: TrainConfig, changes: dict[str, tuple]) -> None:
    """Once nothing can refuse the submission any more: config.json, and what changed when."""
    if changes:
        log.warning("applying changed settings (--allow-changes): %s", describe_changes(changes))
        pointer = parse_pointer(run.read_text(POINTER)) or {}
        run.append_text(CONFIG_CHANGES, json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "after_epoch": pointer.get("epoch", 0),
                                                    "changes": {k: list(v) for k, v in changes.items()}},
                                                   sort_keys=True) + "\n")
    run.write_text(CONFIG, json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n")


def check_cluster(cfg: TrainConfig) -> None:
    """A GPU request on a cluster without enough GPUs would wait forever: refuse it now."""
    import ray

    resources = ray.cluster_resources()
    need_gpus = cfg.workers * cfg.gpus_per_worker
    if need_gpus and resources.get("GPU", 0) < need_gpus:
        raise TrainSetupError(f"{cfg.workers} worker(s) x {cfg.gpus_per_worker} GPU(s) = {need_gpus} GPU(s) "
                              f"requested, but the Ray cluster has {int(resources.get('GPU', 0))}")
    need_cpus = cfg.workers * cfg.cpus_per_worker
    if resources.get("CPU", 0) < need_cpus:
        raise TrainSetupError(f"{need_cpus} CPU(s) requested for workers, the Ray cluster has "
                              f"{resources.get('CPU', 0):g}")


def pinned_cluster(address: str) -> dict | None:
    """RAY_ADDRESS for this job's actors. Ray Train's controller starts a helper actor that
    asks Ray's state API, with no address, whether the controller is alive; on a host with
    several Ray clusters that client picks "the latest" one, maybe another's, and each call
    can hang for its 10 s timeout (measured: every run's end took ~15 s longer, with a
    traceback). Naming our cluster avoids it. Only for a plain GCS address (host:port), and
    not where the job's own runtime env sets RAY_ADDRESS."""
    if not re.fullmatch(r"[\w.\-]+:\d+", address):
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def fit(cfg: TrainConfig, address: str | None = None, *, allow_changes: bool = False, fresh: bool = False):
    """Check, reconcile the config with the run's, train on Ray; raises TrainSetupError before
    any worker starts, TrainingDiverged if the divergence guard stopped the run."""
    check_setup(cfg)
    try:
        cfg = replace(cfg, loader=resolve_loader(cfg.loader))  # stored with the run: every worker reads alike
    except LoaderUnavailable as exc:
        raise TrainSetupError(str(exc)) from None
    run = RunFolder(cfg.storage_path, cfg.name)
    changes = judge_changes(run, cfg, allow_changes, fresh=fresh)

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.loop import train_loop_per_worker

    started_here = not ray.is_initialized()
    if started_here:
        # Explicit address, else the job's cluster (ray job submit sets RAY_ADDRESS), else a
        # fresh local Ray: never a guess from a stale /tmp/ray/ray_current_cluster.
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=target, log_to_driver=True, runtime_env=pinned_cluster(target))
    try:
        check_cluster(cfg)
        # Only now, when nothing can refuse the submission, does the run folder change.
        if fresh and run.exists():
            log.warning("--fresh: deleting run folder %s", run.uri)
            run.delete_all()
        record_config(run, cfg, changes)
        run.delete(DIVERGED)  # a guard stop of an earlier submission
        gpu = cfg.gpus_per_worker > 0
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg.to_json(),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if gpu else {})}),
            run_config=ray.train.RunConfig(
                name=cfg.name, storage_path=cfg.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                # The best by val top-1 error; Ray always keeps the newest as well (to resume).
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                             checkpoint_score_attribute="val_top1_error",
                                                             checkpoint_score_order="min")),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        elapsed = time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()
    diverged = run.read_text(DIVERGED)
    if diverged:
        d = json.loads(diverged)
        raise TrainingDiverged(f"the divergence guard stopped run {run.uri} in epoch {d['epoch']} at step "
                               f"{d['step']}: {d['reason']}. Last good checkpoint: {d['last_good_checkpoint']}. "
                               "Lower --lr, add --warmup-epochs, or see trainer/config.py; "
                               "--no-divergence-guard turns the guard off")
    rows = run.metrics()
    if run.local_path is not None and rows:
        from trainer.figures import LEARNING_CURVES, plot_learning_curves

        plot_learning_curves(rows, run.local_path / LEARNING_CURVES)
    final = rows[-1] if rows else {}
    log.info("done in %.0f s: %d epoch(s); val top-1 error %.3f, top-5 error %.3f; checkpoint %s",
             elapsed, final.get("epoch", 0), final.get("val_top1_error", float("nan")),
             final.get("val_top5_error", float("nan")), result.checkpoint.path if result.checkpoint else None)
    log.info("run folder %s", run.uri)
    return result


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="shard set written by python -m pipeline.shard (required to train)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help="paper: section 5 (90 epochs, batch 128); sample: the built-in sample data on a CPU")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.add_argument("--name", default=d.name, help="run name; the same name and storage path resume a run")
    p.add_argument("--storage-path", default="runs",
                   help="local folder, shared filesystem, or URI (s3://...) holding run folders")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else start one here)")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume a run with settings that differ from its stored ones (applied from the next epoch)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder and start the run over")
    p.add_argument("--resume", dest="resume_from", default=None, metavar="PATH",
                   help="continue from this checkpoint (or run folder's newest) when the run has none of its own")
    p.add_argument("--workers", type=int, default=d.workers, help="data-parallel Ray Train workers")
    p.add_argument("--gpus-per-worker", type=int, default=d.gpus_per_worker,
                   help="2: column A on the first GPU, B on the second; 1: both on one; 0: CPU")
    p.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker)
    # Preset-controlled values: None means "the preset's".
    for name, typ in (("epochs", int), ("batch_size", int), ("lr", float), ("momentum", float),
                      ("weight_decay", float), ("lr_factor", float), ("lr_patience", int), ("max_lr_drops", int),
                      ("warmup_epochs", float)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       help=f"(default: the preset's{', global batch over all workers' if name == 'batch_size' else ''})")
    p.add_argument("--decay-biases", action=argparse.BooleanOptionalAction, default=None,
                   help="weight decay on the biases too (the paper, cuda-convnet and Caffe: no) (default: the preset's)")
    p.add_argument("--init", choices=["paper", "kaiming"], default=None, help="(default: the preset's)")
    p.add_argument("--divide-by-std", action=argparse.BooleanOptionalAction, default=None,
                   help="scale inputs by the training std as well as centring them (default: the preset's)")
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--columns", type=int, choices=[1, 2], default=d.columns, help="1: the paper's one-GPU ablation")
    p.add_argument("--no-lrn", dest="lrn", action="store_false", help="ablation: no local response normalisation")
    p.add_argument("--pool-kernel", type=int, choices=[2, 3], default=d.pool_kernel, help="2: non-overlapping pooling")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ten-crop-every-epoch", action="store_true", help="also run the 10-crop evaluation every epoch")
    p.add_argument("--no-ten-crop-at-end", dest="ten_crop_at_end", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--loader", choices=LOADER_CHOICES, default=d.loader,
                   help="input back-end: auto is DALI where nvidia.dali imports, else webdataset (trainer.loaders)")
    p.add_argument("--loader-threads", type=int, default=d.loader_threads,
                   help="DALI threads, or webdataset DataLoader processes, per worker")
    p.add_argument("--max-failures", type=int, default=d.max_failures, help="worker failures to recover from")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="checkpoints kept: the best by val top-1 error (and always the newest)")
    p.add_argument("--print-freq", type=int, default=d.print_freq,
                   help="progress line every N steps inside an epoch (and at least every 60 s)")
    p.add_argument("--ray-reports", action="store_true", help="show Ray Train's own line for every report")
    p.add_argument("--no-divergence-guard", dest="divergence_guard", action="store_false",
                   help="keep going on a non-finite or blown-up training loss")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.data and not a.print_config:
        p.error("--data is required")
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(a).items() if k in names and v is not None}
    overrides = {k: given.pop(k) for k in list(given) if k in PAPER}
    storage = a.storage_path if "://" in a.storage_path else str(Path(a.storage_path).resolve())
    given.update(data=str(Path(a.data).resolve()) if a.data else "", storage_path=storage)
    if a.resume_from:
        given["resume_from"] = str(Path(a.resume_from).resolve())
    cfg = with_preset(replace(TrainConfig(), **given), overrides)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg, a = parse_args(argv)
    try:
        cfg = replace(cfg, loader=resolve_loader(cfg.loader))
    except LoaderUnavailable as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    if a.print_config:
        print(json.dumps(cfg.to_json(), indent=2, sort_keys=True))
        return 0
    log.info("preset %s: %d epoch(s), global batch %d over %d worker(s) (%d each), lr %g, %s GPU(s) per worker, "
             "%s input", cfg.preset, cfg.epochs, cfg.batch_size, cfg.workers, cfg.per_worker_batch, cfg.lr,
             cfg.gpus_per_worker, cfg.loader)
    try:
        fit(cfg, a.address, allow_changes=a.allow_changes, fresh=a.fresh)
    except TrainSetupError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
