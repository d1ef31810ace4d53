"""The training configuration, typed and in sections; the recipes, as files.

    TrainConfig
      recipe   RecipeConfig    what the optimisation does: epochs, batch, lr and its schedule,
                               weight decay, warm-up, seed, the 10-crop test (trainer.optim,
                               trainer.epoch read it)
      model    AlexNetConfig   the architecture itself (trainer.model; the checkpoint stores it)
      input    InputConfig     the shard set, the input back-end, the normalisation
                               (trainer.loaders, trainer.worker)
      runtime  RuntimeConfig   where and how it runs: run name and storage, workers and
                               devices, precision, retention, console, the guard

A recipe is a TOML file of any of these sections (`trainer/recipes/`): `paper.toml` is
section 5 of the paper and the source of every [recipe] default below; `sample.toml` is the
built-in sample data on a CPU (the paper's, except what it sets). `--preset NAME` loads a
built-in one, `--recipe PATH` one's own; flags given on the command line override it.

config.json (the run folder) and model.json's `train_config` hold `to_json()`'s sectioned
form; `from_json` also reads the flat form runs written before the sections had (one
37-field object), so those runs still load and resume. Which settings a resubmitted run may
change: trainer.resume. Why the paper's recipe diverges on 10 classes: docs/divergence.md.

The global batch is split evenly over the data-parallel workers (`batch_size // workers`
each; it must divide). Inside a worker both columns see that worker's whole batch: the two
devices split the model, not the data.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from pipeline.cli import Flag
from pipeline.home import described, runs_dir, shards_dir
from trainer.loaders import CHOICES as LOADER_CHOICES
from trainer.model import AlexNetConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RECIPES_DIR = Path(__file__).with_name("recipes")
RECIPE_SUFFIX = ".toml"
DEFAULT_RECIPE = "paper"
RECIPE_ENV = "ALEXNET_RECIPE"  # the recipe when no --preset or --recipe is given: a built-in name or a file
SECTIONS = ("recipe", "model", "input", "runtime")


class RecipeError(ValueError):
    """A recipe that cannot be read, or names a section or setting that does not exist."""


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob(f"*{RECIPE_SUFFIX}"))


def _load(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"recipe {path}: {exc}") from None


def read_recipe(path: Path | str) -> dict[str, dict[str, Any]]:
    """A recipe file's sections, as written (checked against the sections' fields)."""
    path = Path(path)
    doc = _load(path)
    known = {name: {f.name for f in fields(cls)} for name, cls in _section_types().items()}
    for section, values in doc.items():
        if section not in known or not isinstance(values, dict):
            raise RecipeError(f"recipe {path}: unknown section [{section}]; the sections are {', '.join(SECTIONS)}")
        unknown = sorted(set(values) - known[section])
        if unknown:
            raise RecipeError(f"recipe {path}: [{section}] has no setting {', '.join(unknown)}")
    return doc


def recipe_path(name: str) -> Path:
    """A built-in recipe by name (`paper`, `sample`)."""
    if name not in builtin_recipes():
        raise RecipeError(f"unknown recipe {name!r}; the built-in ones are {', '.join(builtin_recipes())}")
    return RECIPES_DIR / f"{name}{RECIPE_SUFFIX}"


PAPER = _load(recipe_path(DEFAULT_RECIPE))["recipe"]  # section 5: the one definition of its values


@dataclass(frozen=True)
class RecipeConfig:
    name: str = DEFAULT_RECIPE  # where the values came from: a built-in recipe's name, or a file's path
    epochs: int = PAPER["epochs"]
    batch_size: int = PAPER["batch_size"]  # global, over all workers
    lr: float = PAPER["lr"]
    momentum: float = PAPER["momentum"]
    weight_decay: float = PAPER["weight_decay"]
    decay_biases: bool = PAPER["decay_biases"]
    lr_factor: float = PAPER["lr_factor"]
    lr_patience: int = PAPER["lr_patience"]
    max_lr_drops: int = PAPER["max_lr_drops"]
    warmup_epochs: float = PAPER["warmup_epochs"]
    seed: int = PAPER["seed"]
    ten_crop_at_end: bool = PAPER["ten_crop_at_end"]
    ten_crop_every_epoch: bool = PAPER["ten_crop_every_epoch"]


Auto = Literal["auto"]
AUTO: Auto = "auto"


@dataclass(frozen=True)
class InputConfig:
    data: str = ""  # the shard set; "": $ALEXNET_HOME/shards (absolute once the command runs)
    loader: str = "auto"  # auto (DALI where it imports, else webdataset) | dali | webdataset
    loader_threads: int = 2  # DALI threads, or webdataset DataLoader worker processes, per worker
    divide_by_std: bool = False  # the paper subtracts the mean only


@dataclass(frozen=True)
class RuntimeConfig:
    name: str = "alexnet"  # run name: storage_path/name is the run folder; the same name resumes
    storage_path: str = ""  # local folder, shared filesystem or URI; "": $ALEXNET_HOME/runs
    # The layout: "auto" is resolved from the Ray cluster before the run starts (trainer.layout),
    # and the run's config holds the numbers it resolved to.
    workers: int | Auto = AUTO  # data-parallel Ray Train workers
    gpus_per_worker: int | Auto = AUTO  # 2: the paper's layout (column A on the first, B on the second)
    cpus_per_worker: int = 1
    # Precision and memory format: "auto" is on where the workers have GPUs, off on the CPU.
    amp: bool | Auto = AUTO  # bf16 autocast (GPU only)
    channels_last: bool | Auto = AUTO
    compile: bool = False  # torch.compile the model (once, at worker setup)
    max_failures: int = 3  # worker failures to recover from
    keep_checkpoints: int = 2  # the best by val top-1 error (the newest is always kept too)
    print_freq: int = 100  # progress line every N steps (and at least every PROGRESS_MAX_S seconds)
    ray_reports: bool = False  # Ray Train's own per-report console lines
    divergence_guard: bool = True  # stop on a non-finite or sustained blown-up loss
    resume_from: str = ""  # a checkpoint to continue from when the run has none of its own

    @property
    def layout(self) -> tuple[int, int]:
        """(workers, GPUs per worker), once trainer.layout has resolved any "auto"."""
        if not (isinstance(self.workers, int) and isinstance(self.gpus_per_worker, int)):
            raise ValueError("the layout is not resolved yet: trainer.layout resolves workers and GPUs 'auto'")
        return self.workers, self.gpus_per_worker


def _section_types() -> dict[str, type]:
    return {"recipe": RecipeConfig, "model": AlexNetConfig, "input": InputConfig, "runtime": RuntimeConfig}


# Flat names (config_changes, legacy config.json): each field's own name, except these.
FLAT_NAMES = {("recipe", "name"): "recipe"}
LEGACY_NAMES = {"preset": ("recipe", "name"), "name": ("runtime", "name")}


@dataclass(frozen=True)
class TrainConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    model: AlexNetConfig = field(default_factory=AlexNetConfig)
    input: InputConfig = field(default_factory=InputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def per_worker_batch(self) -> int:
        return self.recipe.batch_size // self.runtime.layout[0]

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    def updated(self, doc: dict[str, dict[str, Any]]) -> TrainConfig:
        """These settings ({section: {field: value}}) over this config's."""
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise RecipeError(f"unknown section(s) {', '.join(unknown)}")
        return replace(self, **{s: replace(getattr(self, s), **v) for s, v in doc.items() if v})

    def with_recipe(self, path: Path | str, name: str | None = None) -> TrainConfig:
        """A recipe file's settings over this config's, its name (else the path) recorded."""
        doc = read_recipe(path)
        doc["recipe"] = {**doc.get("recipe", {}), "name": name or str(path)}
        return self.updated(doc)

    @classmethod
    def preset(cls, name: str = DEFAULT_RECIPE) -> TrainConfig:
        """The defaults with a built-in recipe applied."""
        return cls().with_recipe(recipe_path(name), name)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """config.json's content, sectioned or (written before the sections) flat; settings this
        version does not know are left out."""
        doc = sectioned(d)
        known = {s: {f.name for f in fields(t)} for s, t in _section_types().items()}
        return cls().updated({s: {k: v for k, v in doc.get(s, {}).items() if k in known[s]} for s in SECTIONS})

    def flat(self) -> dict[str, Any]:
        return flat(self.to_json())

    def resolved(self) -> TrainConfig:
        """Its paths made absolute, against the folder the command runs in (Ray workers run
        elsewhere): the shard set, the storage path (unless a URI), --resume's checkpoint; the
        shard set and storage path not given are the home's (pipeline.home)."""

        def absolute(path: str) -> str:
            return str(Path(path).resolve()) if path and "://" not in path else path

        return replace(
            self,
            input=replace(self.input, data=absolute(self.input.data or str(shards_dir()))),
            runtime=replace(
                self.runtime,
                storage_path=absolute(self.runtime.storage_path or str(runs_dir())),
                resume_from=absolute(self.runtime.resume_from),
            ),
        )


def recipe_config(preset: str | None = None, environ: Mapping[str, str] = os.environ) -> TrainConfig:
    """The defaults with the recipe asked for: the built-in `preset` if given, else
    $ALEXNET_RECIPE (a built-in name, or a recipe file's path), else the paper's."""
    if preset:
        return TrainConfig.preset(preset)
    chosen = environ.get(RECIPE_ENV) or DEFAULT_RECIPE
    if chosen in builtin_recipes():
        return TrainConfig.preset(chosen)
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise RecipeError(
            f"{RECIPE_ENV}={chosen} is neither a built-in recipe ({', '.join(builtin_recipes())}) nor a recipe file"
        )
    return TrainConfig().with_recipe(path.resolve())


def sectioned(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A config document in sections, whichever form it was written in."""
    if any(isinstance(d.get(s), dict) for s in SECTIONS):
        return {s: dict(d.get(s) or {}) for s in SECTIONS}
    where = {f.name: s for s, t in reversed(list(_section_types().items())) for f in fields(t)}
    where.update({k: s for k, (s, _) in LEGACY_NAMES.items()})
    doc: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in d.items():
        if key in where:
            doc[where[key]][LEGACY_NAMES[key][1] if key in LEGACY_NAMES else key] = value
    return doc


def flat(d: dict[str, Any]) -> dict[str, Any]:
    """{setting: value} with one name per setting, from either form of a config document."""
    return {FLAT_NAMES.get((s, k), k): v for s, values in sectioned(d).items() for k, v in values.items()}


# trainer.run's command line: what each flag says (pipeline.cli builds the options from the
# sections' fields, the defaults from the values here or in the recipes).
FLAGS = {
    "data": Flag("shard set written by python -m pipeline.shard", metavar="SHARDS"),
    "name": Flag("run name; the same name and storage path resume a run"),
    "storage_path": Flag("local folder, shared filesystem, or URI (s3://...) holding run folders"),
    "resume_from": Flag(
        "continue from this checkpoint (or run folder's newest) when the run has none of its own",
        flag="--resume",
        metavar="PATH",
    ),
    "workers": Flag(
        "data-parallel Ray Train workers; auto: as many as the cluster's GPUs hold at --gpus-per-worker "
        "(a worker's GPUs on one node; the most that divide the global batch), 1 without GPUs"
    ),
    "gpus_per_worker": Flag(
        "2: column A on the first GPU, B on the second; 1: both on one; 0: CPU; auto: 2 where the "
        "nodes have two or more GPUs, 1 where they have one, 0 where the cluster has none"
    ),
    "cpus_per_worker": Flag("CPUs each worker asks Ray for (and torch threads on the CPU)"),
    "epochs": Flag("epochs to train (a resubmission may change it)"),
    "batch_size": Flag("global batch, over all workers"),
    "lr": Flag("learning rate"),
    "momentum": Flag("SGD momentum"),
    "weight_decay": Flag("weight decay (on the weights; the biases too with --decay-biases)"),
    "decay_biases": Flag("weight decay on the biases too (the paper, cuda-convnet and Caffe: no)"),
    "lr_factor": Flag("lr *= this when the val top-1 error stops improving"),
    "lr_patience": Flag("epochs without a new best val top-1 error before a drop"),
    "max_lr_drops": Flag("lr drops at most"),
    "warmup_epochs": Flag("linear lr warm-up from ~0 over this many epochs"),
    "seed": Flag("the run's seed (initial weights, data order and augmentation, dropout)"),
    "ten_crop_at_end": Flag("the paper's 10-crop evaluation after the last epoch"),
    "ten_crop_every_epoch": Flag("the 10-crop evaluation every epoch"),
    "input_size": Flag("model input (the paper's arithmetic needs 227; 67 is the least)"),
    "columns": Flag("1: the paper's one-GPU ablation", choices=(1, 2)),
    "lrn": Flag("local response normalisation (--no-lrn: the paper's ablation)"),
    "pool_kernel": Flag("2: non-overlapping pooling (the paper's ablation)", choices=(2, 3)),
    "init": Flag("initialisation: the paper's, or He et al.'s", choices=("paper", "kaiming")),
    "divide_by_std": Flag("scale inputs by the training std as well as centring them"),
    "loader": Flag(
        "input back-end: auto is DALI where nvidia.dali imports, else webdataset (trainer.loaders)",
        choices=LOADER_CHOICES,
    ),
    "loader_threads": Flag("DALI threads, or webdataset DataLoader processes, per worker"),
    "amp": Flag("bf16 autocast on the GPU (auto: on with GPUs; --no-amp: fp32)"),
    "channels_last": Flag("channels-last memory format (auto: on with GPUs; --no-channels-last: off)"),
    "compile": Flag("torch.compile the model (off by default: not yet measured faster on a GPU)"),
    "max_failures": Flag("worker failures to recover from"),
    "keep_checkpoints": Flag("checkpoints kept: the best by val top-1 error (and always the newest)"),
    "print_freq": Flag("progress line every N steps inside an epoch (and at least every 60 s)"),
    "ray_reports": Flag("show Ray Train's own line for every report"),
    "divergence_guard": Flag("stop on a non-finite or blown-up training loss (--no-divergence-guard: keep going)"),
}
# The settings on the command line, by section (the others come from the defaults or a recipe file).
OPTIONS = {
    "input": ["data", "loader", "loader_threads", "divide_by_std"],
    "runtime": [
        "name",
        "storage_path",
        "resume_from",
        "workers",
        "gpus_per_worker",
        "cpus_per_worker",
        "amp",
        "channels_last",
        "compile",
        "max_failures",
        "keep_checkpoints",
        "print_freq",
        "ray_reports",
        "divergence_guard",
    ],
    "recipe": [
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "weight_decay",
        "decay_biases",
        "lr_factor",
        "lr_patience",
        "max_lr_drops",
        "warmup_epochs",
        "seed",
        "ten_crop_at_end",
        "ten_crop_every_epoch",
    ],
    "model": ["input_size", "columns", "lrn", "pool_kernel", "init"],
}


def cli_notes(name: str) -> str | None:
    """--help's wording of the defaults that depend on the environment (the home's paths are
    read when --help is asked for)."""
    if name == "data":
        return described(shards_dir())
    if name == "storage_path":
        return described(runs_dir())
    return None
