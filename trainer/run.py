"""`python -m trainer.run`: train the paper's AlexNet with Ray Train, on the cluster it is given.

    ray job submit -- python -m trainer.run        # as written: no flags needed

With no flags: the `paper` recipe ($ALEXNET_RECIPE picks another), the shard set in
$ALEXNET_HOME/shards, run folders in $ALEXNET_HOME/runs (pipeline.home), and the layout
resolved from the Ray cluster (trainer.layout): two GPUs per worker where the nodes have them
(a column each), as many workers as the GPUs hold, bf16 autocast and channels_last on GPUs;
one CPU worker, in fp32, where the cluster has no GPU (a full-size shard set on the CPU needs
--yes: trainer.estimate). It starts a local Ray, or joins RAY_ADDRESS / --address, or runs as a
Ray job. --print-config prints the resolved configuration and exits.

The run folder is STORAGE_PATH/NAME: config.json, metrics.jsonl, checkpoint folders
(contract 2), latest_checkpoint.json and learning_curves.png. Submitting again with the same
--name and --storage-path resumes exactly from the newest checkpoint; a resubmission whose
settings differ from the run's (but for --epochs and the console/retention flags) is refused
before any worker starts, naming each field: --allow-changes applies them from the next epoch,
--fresh starts over, --resume PATH continues from another run's checkpoint (trainer.resume).

Settings: the defaults, then a recipe (`--preset NAME`, `--recipe PATH`: trainer/recipes/*.toml),
then the flags given, each a field of trainer.config.TrainConfig's sections; `--help` shows
every default. Input: DALI wherever `import nvidia.dali` works, else the webdataset back-end
(trainer.loaders); the driver decides for every worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.atomic import EXIT_OUT_OF_SPACE
from pipeline.cli import add_fields, given, setup_logging, shown
from pipeline.home import described, home
from trainer.config import (
    DEFAULT_RECIPE,
    FLAGS,
    OPTIONS,
    RECIPE_ENV,
    SECTIONS,
    RecipeError,
    TrainConfig,
    builtin_recipes,
    cli_notes,
    recipe_config,
)
from trainer.estimate import CpuRunRefused, cpu_gate
from trainer.failures import out_of_space_message, raise_if_stopped_for_room
from trainer.layout import LayoutError, check_nodes_see, check_placement, cluster_nodes, connect, describe
from trainer.preflight import (
    TrainSetupError,
    check_setup,
    config_to_print,
    open_shards,
    prepare,
    stored_runtime,
    with_layout,
)
from trainer.resume import ChangesRefused, judge_changes, record_config
from trainer.runfolder import DIVERGED, OUT_OF_SPACE, RunFolder

log = logging.getLogger("trainer.run")
EXIT_SETUP, EXIT_DIVERGED = 2, 3


class TrainingDiverged(RuntimeError):
    pass


def log_start(cfg: TrainConfig, how: str) -> None:
    recipe, runtime = cfg.recipe, cfg.runtime
    log.info(
        "recipe %s: %d epoch(s), global batch %d over %s worker(s) x %s GPU(s) (%s), %d each, lr %g, %s input, "
        "bf16 autocast %s, channels_last %s",
        recipe.name,
        recipe.epochs,
        recipe.batch_size,
        runtime.workers,
        runtime.gpus_per_worker,
        how,
        cfg.per_worker_batch,
        recipe.lr,
        cfg.input.loader,
        shown(runtime.amp and runtime.gpus_per_worker != 0),
        shown(runtime.channels_last),
    )
    log.info(
        "home %s; shard set %s; run folder %s/%s", described(home()), cfg.input.data, runtime.storage_path, runtime.name
    )


def fit(
    cfg: TrainConfig,
    address: str | None = None,
    *,
    allow_changes: bool = False,
    fresh: bool = False,
    yes: bool = False,
):
    """Check, resolve the layout, reconcile the config with the run's, train on Ray; raises
    TrainSetupError before any worker starts, TrainingDiverged if the divergence guard stopped
    the run. A resubmission is judged before Ray is asked anything."""
    cfg = cfg.resolved()
    shards = open_shards(cfg)
    check_setup(cfg, shards)  # what is known without the cluster
    run = RunFolder(cfg.runtime.storage_path, cfg.runtime.name)
    stored = stored_runtime(cfg, fresh)
    changes = {}
    if stored is not None:
        cfg = prepare(with_layout(cfg, None, stored), shards)
        try:
            changes = judge_changes(run, cfg, allow_changes, fresh=fresh)
        except ChangesRefused as exc:
            raise TrainSetupError(str(exc)) from None

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer.worker import train_loop_per_worker

    started_here = connect(address)
    try:
        nodes = cluster_nodes()
        if stored is None:
            cfg = prepare(with_layout(cfg, nodes, None), shards)
        runtime = cfg.runtime
        workers, gpus = runtime.layout
        try:
            check_placement(runtime, nodes)
            log_start(cfg, "as the run was trained" if stored else f"Ray cluster of {describe(nodes)}")
            check_nodes_see(cfg.input.data, runtime.storage_path, runtime, nodes)
            cpu_gate(cfg, shards.num_samples("train"), yes)
        except (LayoutError, CpuRunRefused) as exc:
            raise TrainSetupError(str(exc)) from None
        # Only now, when nothing can refuse the submission, does the run folder change.
        if fresh and run.exists():
            log.warning("--fresh: deleting run folder %s", run.uri)
            run.delete_all()
        record_config(run, cfg, changes)
        run.delete(DIVERGED)  # a guard stop of an earlier submission
        run.delete(OUT_OF_SPACE)  # a stop for lack of room, likewise
        gpu = gpus != 0
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg.to_json(),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=gpu,
                resources_per_worker={
                    "CPU": runtime.cpus_per_worker,
                    **({"GPU": gpus} if gpu else {}),
                },
            ),
            run_config=ray.train.RunConfig(
                name=runtime.name,
                storage_path=runtime.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
                # The best by val top-1 error; Ray always keeps the newest as well (to resume).
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=runtime.keep_checkpoints,
                    checkpoint_score_attribute="val_top1_error",
                    checkpoint_score_order="min",
                ),
            ),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        elapsed = time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()
    raise_if_stopped_for_room(run)
    diverged = run.read_text(DIVERGED)
    if diverged:
        d = json.loads(diverged)
        raise TrainingDiverged(
            f"the divergence guard stopped run {run.uri} in epoch {d['epoch']} at step "
            f"{d['step']}: {d['reason']}. Last good checkpoint: {d['last_good_checkpoint']}. "
            "Lower --lr, add --warmup-epochs, or see docs/divergence.md; "
            "--no-divergence-guard turns the guard off"
        )
    rows = run.metrics()
    if run.local_path is not None and rows:
        from trainer.figures import LEARNING_CURVES, plot_learning_curves

        plot_learning_curves(rows, run.local_path / LEARNING_CURVES)
    final = rows[-1] if rows else {}
    log.info(
        "done in %.0f s: %d epoch(s); val top-1 error %.3f, top-5 error %.3f; checkpoint %s",
        elapsed,
        final.get("epoch", 0),
        final.get("val_top1_error", float("nan")),
        final.get("val_top5_error", float("nan")),
        result.checkpoint.path if result.checkpoint else None,
    )
    log.info("run folder %s", run.uri)
    return result


def _defaults_note(section: str):
    """--help's default for a setting: the default recipe's value, and another built-in
    recipe's where it differs (`0.01; --preset sample: 0.005`)."""
    presets = {name: getattr(TrainConfig.preset(name), section) for name in builtin_recipes()}

    def note(name: str) -> str:
        said = cli_notes(name)
        if said is not None:
            return said
        base = getattr(presets[DEFAULT_RECIPE], name)
        others = [f"--preset {n}: {shown(getattr(c, name))}" for n, c in presets.items() if getattr(c, name) != base]
        return "; ".join([shown(base), *others])

    return note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.run",
        description=__doc__.split("\n\n")[0],
        epilog=f"home: {described(home())}: the shard set is read from its shards/, run folders go to its runs/",
    )
    recipe = p.add_mutually_exclusive_group()
    recipe.add_argument(
        "--preset",
        choices=builtin_recipes(),
        help="a built-in recipe (trainer/recipes/): paper, section 5 (90 epochs, batch 128); sample, "
        f"the built-in sample data on a CPU (default: ${RECIPE_ENV} if set, a built-in name or a recipe "
        f"file, else {DEFAULT_RECIPE})",
    )
    recipe.add_argument(
        "--recipe",
        type=Path,
        metavar="PATH",
        help="your own recipe: a TOML file of [recipe], [model], [input], [runtime] settings over "
        "the defaults (the flags below override it)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else start one here)")
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume a run with settings that differ from its stored ones (applied from the next epoch)",
    )
    p.add_argument("--fresh", action="store_true", help="delete the run folder and start the run over")
    p.add_argument(
        "--yes",
        action="store_true",
        help="train on the CPU even over a full-size shard set (without it such a run is refused, with "
        "its measured time per epoch)",
    )
    for section, names in OPTIONS.items():
        group = p.add_argument_group(f"{section} settings")
        add_fields(group, type(getattr(TrainConfig(), section)), only=names, flags=FLAGS, note=_defaults_note(section))
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        base = TrainConfig().with_recipe(a.recipe.resolve()) if a.recipe else recipe_config(a.preset)
    except RecipeError as exc:
        p.error(str(exc))
    cfg = base.updated({section: given(a, OPTIONS[section]) for section in SECTIONS})
    return cfg.resolved(), a


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg, a = parse_args(argv)
    try:
        if a.print_config:
            print(json.dumps(config_to_print(cfg, a.address).to_json(), indent=2, sort_keys=True))
            return 0
        fit(cfg, a.address, allow_changes=a.allow_changes, fresh=a.fresh, yes=a.yes)
    except TrainSetupError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return EXIT_DIVERGED
    except Exception as exc:
        message = out_of_space_message(exc, cfg)
        if message is None:
            raise
        log.error("%s", message)
        return EXIT_OUT_OF_SPACE
    return 0


if __name__ == "__main__":
    sys.exit(main())
