"""Typed training configuration and named presets: every training default is defined here once.

Presets (`PRESETS`; `paper` is the default):
- `paper`: section 5 exactly. SGD with the paper's update rule (v <- 0.9 v - 0.0005 lr w -
  lr dL/dw; w <- w + v: the learning rate inside the velocity, trainer/optim.py), weight
  decay 5e-4 on the weights and not on the biases (as cuda-convnet and Caffe's AlexNet),
  global batch 128, lr 0.01 divided by 10 when the validation error stops improving (at most
  three times; "stops improving" is 2 epochs without a new best here: the paper gives no
  number), 90 epochs, no warm-up; the paper's initialisation; mean subtraction only.
- `sample`: the built-in sample data on a CPU in a few minutes. The paper's optimiser and
  schedule rule, but a global batch of 32, lr 0.005, 8 epochs, He initialisation and std
  scaling of the input. Measured on the 300-image sample set: with the paper's
  initialisation the net needs ~8 epochs just to leave chance level; with He init at lr 0.01
  the first epoch is a coin toss (val error after 3 epochs anywhere from 0.42 to 0.71 across
  seeds); at lr 0.005 it is 0.30-0.50 after 3 epochs for every seed tried.

Why `paper` blows up on the sample data (10 classes) and not on ImageNet (1000): the data, not
the implementation. The paper's biases of 1 in fc6 and fc7 make the fc7 activations large and
nearly the same for every image at the start (|h7|^2 ~ 21,000 per image with dropout's
scaling), and the curvature of the softmax loss along the fc8 weights is about
p(1-p) |h7|^2, with p ~ 1/K for K classes. Measured at the paper's initialisation on a real
sample batch of 128: the top Hessian eigenvalue of the fc8 block is 1568 with K = 10 and 94
with K = 1000. SGD with momentum 0.9 is stable only for lr * eigenvalue < 2 (1 + 0.9) = 3.8:
at lr 0.01 that is 15.7 on the sample (diverges) and 0.94 on ImageNet (stable). Per step on
the sample (paper recipe, batch 128): loss 2.97 -> 9.9 -> 16.6 -> 30.2; with fc6/fc7 biases 0
it stays at 2.3-2.5; at lr 0.002 (lr * eigenvalue 3.1) it does not blow up. Scaling the input
(`--divide-by-std`) changes nothing because h7 is driven by the biases, not the pixels.
Checked against the paper and fixed where they differed: the update rule (lr inside the
velocity) and weight decay on biases; gradient averaging (DDP's mean over the global batch
is the paper's batch mean), LRN after ReLU in conv1/conv2, dropout on fc6/fc7's outputs and
the bias-1 layers match the paper. `tests/trainer/test_recipe.py` holds the eigenvalue claim.
For few-class data use the `sample` preset, a smaller `--lr`, or `--warmup-epochs`. The
divergence guard (`divergence_guard`) stops such a run instead of letting it burn days.

The global batch is split evenly over the data-parallel workers (`batch_size // workers`
each; it must divide). Inside a worker both columns see that worker's whole batch: the two
devices split the model, not the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from trainer.model import AlexNetConfig

# The paper's recipe (section 5): the one definition of these values.
PAPER: dict = dict(
    epochs=90, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False,
    lr_factor=0.1, lr_patience=2, max_lr_drops=3, warmup_epochs=0, init="paper", divide_by_std=False,
)
PRESETS: dict[str, dict] = {
    "paper": PAPER,
    "sample": {**PAPER, "epochs": 8, "batch_size": 32, "lr": 0.005, "lr_patience": 1, "init": "kaiming",
               "divide_by_std": True},
}
DEFAULT_PRESET = "paper"

# Fields a resubmitted run may change without --allow-changes: none of them can change the
# weights a run ends with (--epochs only says where it stops).
FREE_TO_CHANGE = frozenset({"epochs", "max_failures", "keep_checkpoints", "print_freq", "ray_reports",
                            "divergence_guard", "resume_from"})
# Fields that name the run rather than describe its training: never a change.
IDENTITY = frozenset({"name", "storage_path"})
# Fields a checkpoint's weights depend on: never changed on a resumed run (use --fresh or a new --name).
ARCHITECTURE = frozenset({"input_size", "lrn", "columns", "pool_kernel"})


@dataclass
class TrainConfig:
    data: str = ""  # shard set folder (absolute path: workers may run elsewhere)
    preset: str = DEFAULT_PRESET
    name: str = "alexnet"  # run name: storage_path/name is the run folder; same name = resume
    storage_path: str = str(Path("runs").resolve())
    workers: int = 1
    gpus_per_worker: int = 0  # 2: the paper's layout (column A on the first, B on the second)
    cpus_per_worker: int = 1
    # The recipe: defaults are the paper's (PAPER above).
    epochs: int = PAPER["epochs"]
    batch_size: int = PAPER["batch_size"]  # global
    lr: float = PAPER["lr"]
    momentum: float = PAPER["momentum"]
    weight_decay: float = PAPER["weight_decay"]
    decay_biases: bool = PAPER["decay_biases"]  # True: decay every parameter (torch's SGD default)
    lr_factor: float = PAPER["lr_factor"]  # lr *= lr_factor on a plateau of the val error
    lr_patience: int = PAPER["lr_patience"]  # epochs without val improvement before a drop
    max_lr_drops: int = PAPER["max_lr_drops"]
    warmup_epochs: float = PAPER["warmup_epochs"]  # linear lr warm-up from ~0 over this many epochs
    init: str = PAPER["init"]
    divide_by_std: bool = PAPER["divide_by_std"]
    # The architecture (AlexNetConfig's defaults are the paper's).
    input_size: int = AlexNetConfig.input_size
    lrn: bool = AlexNetConfig.lrn
    columns: int = AlexNetConfig.columns
    pool_kernel: int = AlexNetConfig.pool_kernel
    amp: bool = False  # bf16 autocast (GPU)
    channels_last: bool = False
    compile: bool = False
    ten_crop_at_end: bool = True  # paper's 10-crop evaluation after the last epoch
    ten_crop_every_epoch: bool = False
    seed: int = 0
    loader: str = "auto"  # input back-end: auto (DALI where it imports, else webdataset) | dali | webdataset
    loader_threads: int = 2  # DALI threads, or webdataset DataLoader worker processes, per worker
    max_failures: int = 3
    keep_checkpoints: int = 2  # the best by val top-1 error (the newest is always kept too)
    print_freq: int = 100  # progress line every N steps (and at least every PROGRESS_MAX_S seconds)
    ray_reports: bool = False  # Ray Train's own per-report console lines
    divergence_guard: bool = True  # stop on a non-finite or sustained blown-up loss
    resume_from: str = ""  # a checkpoint folder to continue from when the run has none of its own

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def with_preset(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    """Preset values, then explicit command-line overrides on top."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    return replace(cfg, **{**PRESETS[cfg.preset], **overrides})


def config_changes(stored: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """{field: (stored value, new value)} for every field that differs, except FREE_TO_CHANGE and
    IDENTITY (a field the stored config does not have yet is not a change)."""
    new = cfg.to_json()
    changed = {}
    for name in sorted(new):
        if name in FREE_TO_CHANGE or name in IDENTITY or name not in stored:
            continue
        if stored[name] != new[name]:
            changed[name] = (stored[name], new[name])
    return changed


def describe_changes(changes: dict[str, tuple]) -> str:
    """`field: old -> new; ...`, the one wording of config_changes in errors and logs."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
