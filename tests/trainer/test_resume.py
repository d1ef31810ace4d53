"""trainer/resume.py: the resume protocol's decisions without Ray (what a resubmission is
judged against, what it may change, the state a checkpoint carries and how a worker puts it
back, runs written before the config had sections), then, with real Ray Train runs (the
session's cluster, marked slow): exact resume (DALI with 1 and 2 workers, the webdataset
back-end with 1, and a run whose files are in the pre-sections form), the config-change
refusal, the divergence guard, --resume and evaluation (a killed worker: test_run.py), on tiny settings:
67x67 inputs (the smallest the layer arithmetic allows), a global batch of 16, the tiny
shard set (one shard per split: two workers split its samples)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.transforms import Normalization
from tests.helpers import REPO
from trainer import checkpoint as ck
from trainer import checkpoint_meta as ckm
from trainer import resume as rs
from trainer.checkpoint import latest_checkpoint, read_meta
from trainer.config import TrainConfig
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import build_optimizer, build_scheduler
from trainer.run import TrainSetupError, fit, parse_args
from trainer.runfolder import CONFIG, CONFIG_CHANGES, RunFolder
from trainer.seeds import capture_rng, seed_rank

LEGACY = Path(__file__).parent / "legacy"
CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"c{i}"} for i in range(10)]
CPU = [torch.device("cpu")]
# The flags tests/trainer/legacy/config.json was recorded with (its README).
# fmt: off
LEGACY_FLAGS = ["--data", "/data/shards", "--preset", "sample", "--input-size", "67", "--batch-size", "16",
                "--no-ten-crop-at-end", "--print-freq", "0", "--storage-path", "/runs", "--name", "stopped",
                "--workers", "1", "--loader", "dali", "--epochs", "2",
                "--gpus-per-worker", "0", "--no-amp", "--no-channels-last"]  # the defaults of then
# fmt: on


def config(**sections) -> TrainConfig:
    """TrainConfig() with {section: {field: value}} over it."""
    return TrainConfig().updated(sections)


def small_model(seed: int = 0) -> AlexNet:
    torch.manual_seed(seed)
    return AlexNet(AlexNetConfig(num_classes=10, input_size=67, init="kaiming"))


def trained_state(cfg: TrainConfig) -> rs.State:
    """A state with real optimizer momentum and a schedule that has seen two epochs."""
    state = rs.new_state(cfg.recipe, small_model())
    x, y = torch.randn(4, 3, 67, 67) * 50, torch.arange(4)
    torch.nn.functional.cross_entropy(state.model(x), y).backward()
    state.optimizer.step()
    state.scheduler.step(0.5)
    state.scheduler.step(0.6)
    state.epoch, state.lr_drops = 2, 0
    state.guard.set_reference(2.3)
    return state


def save_resumable(folder: Path, state: rs.State, cfg: TrainConfig, ranks=(0,)) -> Path:
    """A checkpoint folder as the workers write it (model, model.json, train_state, rank states)."""
    ck.save(
        folder,
        state.model,
        classes=CLASSES,
        normalization=Normalization((0.0, 0.0, 0.0)),
        epoch=state.epoch,
        metrics={"val_top1_error": 0.5},
        train_config=cfg.to_json(),
        train_state=rs.train_state_payload(state, cfg, world=len(ranks)),
    )
    for rank in ranks:
        rs.save_rank_state(folder, rank, rs.rank_state_payload(state, rank, CPU))
    return folder


def test_resume_state_loads_weights_only_and_round_trips(tmp_path):
    cfg = TrainConfig()
    state = trained_state(cfg)
    seed_rank(7, rank=1)
    rng = capture_rng(CPU)
    save_resumable(tmp_path, state, cfg, ranks=(1,))
    # Both files are plain torch.load(weights_only=True) material: no code runs on loading.
    shared = torch.load(tmp_path / ck.TRAIN_STATE, weights_only=True)
    own = torch.load(tmp_path / "rank_state_1.pt", weights_only=True)
    again = rs.new_state(cfg.recipe, small_model())
    again.optimizer.load_state_dict(shared["optimizer"])
    again.scheduler.load_state_dict(shared["scheduler"])
    for p, q in zip(state.optimizer.state.values(), again.optimizer.state.values()):
        assert torch.equal(p["velocity"], q["velocity"])
    assert again.scheduler.state_dict() == state.scheduler.state_dict()
    assert shared["epoch"] == 2 and shared["guard"] == {"reference": 2.3, "bad_checks": 0}
    assert shared["config"] == cfg.to_json() and own["rank"] == 1
    assert rs.load_rank_state(tmp_path, 0) is None  # no state for a rank that was not there
    for key in ("torch", "python", "numpy"):
        assert str(own["rng"][key]) == str(rng[key])


class Boom:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_resume_state_that_needs_unpickling_is_refused(tmp_path):
    torch.save({"epoch": 1, "evil": Boom()}, tmp_path / ck.TRAIN_STATE)
    with pytest.raises(ckm.CheckpointError, match="without unpickling code: .*Unsupported global"):
        rs.load_train_state(tmp_path)
    (tmp_path / "rank_state_0.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ckm.CheckpointError):
        rs.load_rank_state(tmp_path, 0)


def test_resume_puts_the_checkpoint_back_into_the_model_the_worker_has(tmp_path, monkeypatch):
    """Weights into the worker's own model (no second AlexNet is built), optimizer momentum,
    schedule, epoch, lr drops, guard and this rank's random streams."""
    cfg = TrainConfig()
    state = trained_state(cfg)
    seed_rank(3, rank=0)
    save_resumable(tmp_path, state, cfg)
    expected_draw = torch.rand(3)
    fresh = rs.new_state(cfg.recipe, small_model(seed=1))
    model = fresh.model
    monkeypatch.setattr(AlexNet, "__init__", lambda *a, **k: pytest.fail("resume built a second AlexNet"))
    meta = rs.resume(fresh, tmp_path, cfg, rank=0, devices=CPU)
    assert fresh.model is model and meta.epoch == 2 and fresh.last_checkpoint == str(tmp_path)
    for a, b in zip(model.state_dict().values(), state.model.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(state.optimizer.state.values(), fresh.optimizer.state.values()):
        assert torch.equal(p["velocity"], q["velocity"])
    assert (fresh.epoch, fresh.lr_drops, fresh.guard) == (2, 0, state.guard)
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # the rank's own stream, where the checkpoint left it


def test_resume_applies_the_allowed_changes_to_the_optimizer_and_schedule(tmp_path):
    """A new lr rescales the current one (a drop already taken is kept), momentum, weight decay
    and the schedule take their new values."""
    old = config(recipe={"lr": 0.01})
    state = trained_state(old)
    for group in state.optimizer.param_groups:
        group["lr"] = 0.001  # one drop taken
    save_resumable(tmp_path, state, old)
    new = config(recipe={"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-3, "lr_factor": 0.5, "lr_patience": 4})
    fresh = rs.new_state(new.recipe, small_model())
    rs.resume(fresh, tmp_path, new, rank=0, devices=CPU)
    weights, biases = fresh.optimizer.param_groups
    assert weights["lr"] == biases["lr"] == pytest.approx(0.002)
    assert weights["momentum"] == 0.8 and weights["weight_decay"] == 1e-3 and biases["weight_decay"] == 0.0
    assert fresh.scheduler.factor == 0.5 and fresh.scheduler.patience == 4
    assert fresh.scheduler.min_lrs == [pytest.approx(0.02 * 0.5**3)] * 2


def test_allowed_changes_reach_the_optimizer_and_schedule_biases_included():
    net = small_model()
    old = TrainConfig().recipe
    opt = build_optimizer(net, old)
    sched = build_scheduler(opt, old)
    for group in opt.param_groups:
        group["lr"] = 0.001  # one drop taken
    new = replace(old, lr=0.02, momentum=0.8, weight_decay=1e-3, decay_biases=True, lr_patience=5)
    rs.apply_changes(opt, sched, old, new)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.002)] * 2  # the drop is kept
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.8]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 1e-3]  # --decay-biases: on both groups
    assert sched.patience == 5 and sched.min_lrs == [pytest.approx(0.02 * 1e-3)] * 2


def fake_checkpoint(folder: Path, train_config: dict) -> Path:
    """model.json (and a weights file to make it look complete): all the judge reads."""
    folder.mkdir(parents=True)
    (folder / ck.WEIGHTS).write_bytes(b"")
    meta = ckm.CheckpointMeta(
        architecture=AlexNetConfig(num_classes=10),
        classes=CLASSES,
        normalization=Normalization((0.0, 0.0, 0.0)),
        train_config=train_config,
    )
    (folder / ckm.META).write_text(json.dumps(meta.to_json()))
    return folder


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "runs" / "r"
    fake_checkpoint(folder / "checkpoint_epoch_0002", config(recipe={"lr": 0.01}).to_json())
    (folder / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0002", 2))
    (folder / CONFIG).write_text(json.dumps(config(recipe={"lr": 0.5}).to_json()))  # ahead of every checkpoint
    return RunFolder(str(tmp_path / "runs"), "r")


def test_a_resubmission_is_judged_against_what_the_newest_checkpoint_was_trained_with(run):
    cfg = config(recipe={"lr": 0.01})
    assert rs.judge_changes(run, cfg, allow_changes=False) == {}
    with pytest.raises(rs.ChangesRefused, match=r"lr: 0.01 -> 0.5"):
        rs.judge_changes(run, config(recipe={"lr": 0.5}), allow_changes=False)
    assert rs.judge_changes(run, config(recipe={"lr": 0.5}), allow_changes=True) == {"lr": (0.01, 0.5)}
    # free to change: no question asked; the architecture: never, --allow-changes or not
    assert rs.judge_changes(run, config(recipe={"lr": 0.01, "epochs": 7}, runtime={"print_freq": 3}), False) == {}
    with pytest.raises(rs.ChangesRefused, match="input_size cannot change on a resumed run"):
        rs.judge_changes(run, config(recipe={"lr": 0.01}, model={"input_size": 99}), allow_changes=True)


def test_fresh_ignores_the_run_but_not_the_checkpoint_it_resumes_from(run, tmp_path):
    assert rs.judge_changes(run, config(recipe={"lr": 0.3}), allow_changes=False, fresh=True) == {}
    other = fake_checkpoint(tmp_path / "other" / "checkpoint_epoch_0007", config(recipe={"lr": 0.02}).to_json())
    cfg = config(recipe={"lr": 0.3}, runtime={"resume_from": str(other)})
    with pytest.raises(rs.ChangesRefused, match=r"checkpoint .*lr: 0.02 -> 0.3"):
        rs.judge_changes(run, cfg, allow_changes=False, fresh=True)


def test_a_change_is_listed_field_by_field_in_one_wording():
    """The wording the refusal and the --allow-changes warning share; settings free to change
    (epochs) and the run's identity (name) are not changes."""
    stored = config(recipe={"lr": 0.01, "batch_size": 128, "epochs": 5}, runtime={"name": "a"}).to_json()
    changes = rs.config_changes(
        stored, config(recipe={"lr": 0.02, "batch_size": 256, "epochs": 9}, runtime={"name": "b"})
    )
    assert changes == {"batch_size": (128, 256), "lr": (0.01, 0.02)}
    assert rs.describe_changes(changes) == "batch_size: 128 -> 256; lr: 0.01 -> 0.02"


def test_the_change_is_recorded_with_the_epoch_it_applies_after(run):
    changes = rs.judge_changes(run, config(recipe={"lr": 0.5}), allow_changes=True)
    rs.record_config(run, config(recipe={"lr": 0.5}), changes)
    record = json.loads(run.read_text(CONFIG_CHANGES))
    assert record["after_epoch"] == 2 and record["changes"] == {"lr": [0.01, 0.5]}
    assert TrainConfig.from_json(json.loads(run.read_text(CONFIG))) == config(recipe={"lr": 0.5})


def legacy_config(**paths: str) -> dict:
    """tests/trainer/legacy/config.json (the flat form runs wrote before the sections), with
    these paths in place of its placeholders."""
    return {**json.loads((LEGACY / "config.json").read_text()), **paths}


def test_a_run_written_before_the_sections_is_judged_and_resumed_as_it_was(tmp_path):
    """Its config.json and its checkpoint's records are in the old flat form: the same
    command finds no change, another --lr is one (by the same name), and a worker resumes
    from its train_state."""
    cfg, _ = parse_args(LEGACY_FLAGS)
    assert TrainConfig.from_json(legacy_config()) == cfg
    assert rs.config_changes(legacy_config(), replace(cfg, model=replace(cfg.model, num_classes=10))) == {}
    folder = tmp_path / "runs" / "stopped"
    state = trained_state(cfg)
    save_resumable(folder / "checkpoint_epoch_0002", state, cfg)
    for path in (folder / "checkpoint_epoch_0002" / ckm.META,):  # model.json's train_config: the flat form
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "train_config": legacy_config()}))
    shared = torch.load(folder / "checkpoint_epoch_0002" / ck.TRAIN_STATE, weights_only=True)
    torch.save({**shared, "config": legacy_config()}, folder / "checkpoint_epoch_0002" / ck.TRAIN_STATE)
    (folder / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0002", 2))
    (folder / CONFIG).write_text(json.dumps(legacy_config()))
    run = RunFolder(str(tmp_path / "runs"), "stopped")
    again = replace(cfg, recipe=replace(cfg.recipe, epochs=3))
    assert rs.judge_changes(run, again, allow_changes=False) == {}
    with pytest.raises(rs.ChangesRefused, match=r"lr: 0.005 -> 0.01"):
        rs.judge_changes(run, replace(again, recipe=replace(again.recipe, lr=0.01)), allow_changes=False)
    fresh = rs.new_state(again.recipe, small_model(seed=1))
    assert rs.resume(fresh, folder / "checkpoint_epoch_0002", again, rank=0, devices=CPU).epoch == 2
    assert fresh.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]  # nothing "changed"


def tiny(
    data: Path, storage: Path, name: str, *, input_size: int = 67, loader: str | None = None, **recipe
) -> TrainConfig:
    """The runs' config as TrainConfig (for the checks fit() makes before Ray is involved)."""
    return TrainConfig.preset("sample").updated(
        {
            "recipe": {"epochs": 3, "batch_size": 16, "ten_crop_at_end": False, **recipe},
            "model": {"input_size": input_size},
            "input": {"data": str(data), **({"loader": loader} if loader else {})},
            "runtime": {"name": name, "storage_path": str(storage), "print_freq": 0},
        }
    )


def start(cluster, data: Path, storage: Path, name: str, *args: str) -> subprocess.Popen:
    """`python -m trainer.run` with the tiny settings, as its own Ray driver on the cluster."""
    # fmt: off
    cmd = [sys.executable, "-m", "trainer.run", "--data", str(data), "--preset", "sample", "--input-size", "67",
           "--batch-size", "16", "--no-ten-crop-at-end", "--print-freq", "0", "--storage-path", str(storage),
           "--name", name, "--address", cluster.gcs_address, *args]
    # fmt: on
    return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def together(*procs: subprocess.Popen) -> list[tuple[int, str]]:
    """Wait for runs started side by side (the cluster has CPUs for eight tiny workers)."""
    out = [p.communicate(timeout=900)[0] for p in procs]
    return [(p.returncode, o) for p, o in zip(procs, out)]


def final_state(run: Path) -> dict:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, f"no checkpoint in {run}"
    return {
        "epoch": read_meta(ckpt).epoch,
        "weights": load_file(str(ckpt / "model.safetensors")),
        "shared": torch.load(ckpt / "train_state.pt", weights_only=True),
        "ranks": {p.name: torch.load(p, weights_only=True) for p in sorted(ckpt.glob("rank_state_*.pt"))},
        "metrics": [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()],
    }


def identical(a, b) -> bool:
    """Bitwise equality of nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def to_legacy(run: Path, data: Path) -> None:
    """Put a run folder's config records in the flat form runs wrote before the sections:
    config.json, and its newest checkpoint's model.json train_config and train_state config."""
    flat = legacy_config(data=str(data), storage_path=str(run.parent))
    assert flat["name"] == run.name
    (run / CONFIG).write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    ckpt = latest_checkpoint(run)
    doc = json.loads((ckpt / ckm.META).read_text())
    (ckpt / ckm.META).write_text(json.dumps({**doc, "train_config": flat}, indent=2) + "\n")
    shared = torch.load(ckpt / ck.TRAIN_STATE, weights_only=True)
    torch.save({**shared, "config": flat}, ckpt / ck.TRAIN_STATE)


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_shard_set, tmp_path_factory):
    """For DALI with 1 and 2 workers and webdataset with 1: an uninterrupted 3-epoch run, and the
    same run stopped after epoch 2 and resubmitted to epoch 3 (the 1-worker DALI one with its
    config records rewritten in the form runs had before the config's sections). Then, from the first round's
    runs: a run the divergence guard stops, a new run continuing another's checkpoint with a
    changed lr (--resume, --allow-changes).
    Independent runs go side by side, in two rounds (8 workers at most: the cluster's CPUs)."""
    storage = tmp_path_factory.mktemp("runs")
    data = tiny_shard_set[0]
    s1, s2, wds = storage / "w1", storage / "w2", storage / "wds"
    where = {1: s1, 2: s2, "wds": wds}

    def run(w: int | str, name: str, *args: str) -> subprocess.Popen:
        loader = ("--loader", "webdataset", "--loader-threads", "1") if w == "wds" else ("--loader", "dali")
        workers = "1" if w == "wds" else str(w)
        return start(ray_cluster, data, where[w], name, "--workers", workers, *loader, *args)

    first = together(
        run(1, "straight", "--epochs", "3"),
        run(1, "stopped", "--epochs", "2"),
        run(2, "straight", "--epochs", "3"),
        run(2, "stopped", "--epochs", "2"),
        run("wds", "straight", "--epochs", "3"),
        run("wds", "stopped", "--epochs", "2"),
    )
    assert all(rc == 0 for rc, _ in first), first
    after_2 = {w: final_state(where[w] / "stopped") for w in where}
    to_legacy(s1 / "stopped", data)  # the 1-worker DALI run resumes from files in the pre-sections form
    straight = {w: final_state(where[w] / "straight") for w in where}
    procs = [
        run(1, "stopped", "--epochs", "3"),
        run(2, "stopped", "--epochs", "3"),
        run(1, "straight", "--epochs", "5", "--lr", "30", "--print-freq", "2", "--allow-changes"),
        run(
            1,
            "other",
            "--epochs",
            "4",
            "--resume",
            str(s1 / "straight" / "checkpoint_epoch_0003"),
            "--lr",
            "0.001",
            "--allow-changes",
        ),
        run("wds", "stopped", "--epochs", "3"),
    ]
    second = together(*procs)
    assert [rc for rc, _ in second] == [0, 0, 3, 0, 0], second
    return {
        "data": data,
        "manifest": tiny_shard_set[1],
        "storage": where,
        "straight": straight,
        "after_2": after_2,
        "resumed": {w: final_state(where[w] / "stopped") for w in where},
        "logs": {"diverged": second[2][1], "other": second[3][1]},
    }


@pytest.fixture(params=[1, 2, "wds"], ids=["dali-1-worker", "dali-2-workers", "webdataset-1-worker"])
def workers(request) -> int | str:
    return request.param


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(runs, workers):
    straight, resumed = runs["straight"][workers], runs["resumed"][workers]
    assert runs["after_2"][workers]["epoch"] == 2 and straight["epoch"] == resumed["epoch"] == 3
    assert identical(straight["weights"], resumed["weights"])
    assert identical(straight["shared"]["optimizer"], resumed["shared"]["optimizer"])  # momentum too
    assert identical(straight["shared"]["scheduler"], resumed["shared"]["scheduler"])
    # every epoch's numbers, the resumed epoch 3 included
    drop = ("epoch_seconds", "eval_seconds", "images_per_s", "data_wait_share")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in run["metrics"]] for run in (straight, resumed)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3]
    assert straight["metrics"][-1]["train_images"] == runs["manifest"]["splits"]["train"]["num_samples"]


@pytest.mark.slow
def test_every_rank_has_its_own_rng_streams_and_they_survive_a_resume(runs, workers):
    straight, resumed, after_2 = runs["straight"][workers], runs["resumed"][workers], runs["after_2"][workers]
    names = [f"rank_state_{r}.pt" for r in range(1 if workers == "wds" else workers)]
    assert sorted(straight["ranks"]) == sorted(resumed["ranks"]) == names
    for name in names:
        assert identical(straight["ranks"][name]["rng"], resumed["ranks"][name]["rng"])
        assert not identical(after_2["ranks"][name]["rng"]["torch"], resumed["ranks"][name]["rng"]["torch"])
    if workers == 2:
        a, b = (straight["ranks"][n]["rng"] for n in names)
        for key in ("torch", "python", "numpy"):
            assert not identical(a[key], b[key]), key


@pytest.mark.slow
def test_a_new_run_continues_from_another_runs_checkpoint_with_a_change_applied(runs):
    """--resume PATH into a new run, with --allow-changes for a new lr: it starts at epoch 4 at
    the new lr, and records the change."""
    log = runs["logs"]["other"]
    assert "straight/checkpoint_epoch_0003 after epoch 3" in log and "lr 0.005 -> 0.001" in log, log[-3000:]
    run = runs["storage"][1] / "other"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drops = runs["straight"][1]["metrics"][-1]["lr_drops"]  # taken by epoch 3, kept: lr 0.005 -> 0.001 rescales
    assert [r["epoch"] for r in rows] == [4] and rows[0]["lr"] == pytest.approx(0.001 * 0.1**drops)
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["changes"] == {"lr": [0.005, 0.001]}
    assert json.loads((run / "config.json").read_text())["recipe"]["lr"] == 0.001
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "checkpoint_epoch_0004" and read_meta(ckpt).run == "other"
    shared = torch.load(ckpt / "train_state.pt", weights_only=True)
    after = rows[0]["lr"] * 0.1 ** (rows[0]["lr_drops"] - drops)  # (epoch 4 may have dropped it again)
    assert [g["lr"] for g in shared["optimizer"]["param_groups"]] == [pytest.approx(after)] * 2


@pytest.mark.slow
def test_retention_keeps_the_best_by_val_error_and_the_newest(runs):
    """--keep-checkpoints 2 (the default): of a 3-epoch run's checkpoints the two with the
    lowest val top-1 error stay, and the newest (the one latest_checkpoint.json names) always does."""
    run = runs["storage"][1] / "straight"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kept = {int(p.name.rsplit("_", 1)[1]) for p in run.glob("checkpoint_epoch_*")}
    errors = [r["val_top1_error"] for r in rows]
    assert 3 in kept and len(kept) <= 3 and min(errors[e - 1] for e in kept) == min(errors), (kept, errors)
    if len(set(errors)) == len(errors):  # no ties: exactly the two best and the newest
        assert kept == {r["epoch"] for r in sorted(rows, key=lambda r: r["val_top1_error"])[:2]} | {3}
    assert latest_checkpoint(run).name == "checkpoint_epoch_0003"


@pytest.mark.slow
def test_changed_settings_are_refused_before_any_worker_starts_naming_each(runs):
    """fit() refuses before it even connects to Ray (no address is given here)."""
    data, storage = runs["data"], runs["storage"][1]
    run = storage / "other"
    config_before = (run / "config.json").read_text()
    with pytest.raises(TrainSetupError) as refused:
        fit(tiny(data, storage, "other", epochs=5, lr=0.002, momentum=0.8))
    assert "lr: 0.001 -> 0.002" in str(refused.value) and "momentum: 0.9 -> 0.8" in str(refused.value)
    assert "--allow-changes" in str(refused.value)
    with pytest.raises(TrainSetupError, match="loader: 'dali' -> 'webdataset'"):  # another data stream
        fit(tiny(data, storage, "other", epochs=5, lr=0.001, loader="webdataset"))
    with pytest.raises(TrainSetupError, match="input_size cannot change"):
        fit(tiny(data, storage, "other", epochs=5, lr=0.001, input_size=99), allow_changes=True)
    assert (run / "config.json").read_text() == config_before and latest_checkpoint(run).name.endswith("0004")


@pytest.mark.slow
def test_the_divergence_guard_stops_the_run_naming_where_and_the_last_good_checkpoint(runs):
    output = runs["logs"]["diverged"]
    assert "the divergence guard stopped run" in output and "in epoch 4 at step" in output, output[-3000:]
    assert "Last good checkpoint: " in output and "checkpoint_epoch_0003" in output
    run = runs["storage"][1] / "straight"
    assert json.loads((run / "diverged.json").read_text())["epoch"] == 4
    assert latest_checkpoint(run).name == "checkpoint_epoch_0003"  # nothing saved after the blow-up


@pytest.mark.slow
def test_evaluate_a_checkpoint_centre_and_ten_crop_with_either_loader(runs, tmp_path):
    run = runs["storage"][1] / "straight"
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "trainer.evaluate", str(run), "--data", str(runs["data"])]
    procs = [
        subprocess.Popen(
            cmd + ["--json", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
        subprocess.Popen(
            cmd + ["--loader", "webdataset"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
    ]
    (stdout, stderr), (wds_stdout, wds_stderr) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, stderr[-3000:]
    assert procs[1].returncode == 0, wds_stderr[-3000:]
    result, wds = json.loads(stdout), json.loads(wds_stdout)
    assert result == json.loads(out.read_text()) and result["loader"] == "dali" and wds["loader"] == "webdataset"
    # the same pixels (tests/trainer/test_backends.py), the same batches: the same predictions, and
    # the same losses up to float rounding (CPU kernels may sum in another order: 8e-8 relative seen in CI)
    assert result.keys() == wds.keys()
    assert {k: v for k, v in result.items() if k != "loader" and not k.endswith("_loss")} == {
        k: v for k, v in wds.items() if k != "loader" and not k.endswith("_loss")
    }
    assert [result[k] for k in result if k.endswith("_loss")] == [
        pytest.approx(wds[k], rel=1e-6) for k in result if k.endswith("_loss")
    ]
    val = runs["manifest"]["splits"]["val"]["num_samples"]
    assert result["epoch"] == 3 and result["center_images"] == result["ten_crop_images"] == val
    last = runs["straight"][1]["metrics"][-1]
    # the same pipeline and the same weights as the run's own validation of epoch 3
    # (a near-tie may flip with another batch size: one image at most)
    assert result["center_top1_error"] == pytest.approx(last["val_top1_error"], abs=1.01 / val)
    assert result["center_top5_error"] == pytest.approx(last["val_top5_error"], abs=1.01 / val)
    assert 0 <= result["ten_crop_top1_error"] <= 1 and "10 crops: top-1 error" in stderr


@pytest.mark.gpu
def test_a_resume_on_the_gpu_restores_the_cuda_rng_and_continues_as_if_never_stopped(tmp_path):
    """A worker on a GPU saved after one step, then two more steps; a fresh worker resumes from
    the save (weights, momentum, this rank's RNG streams, the CUDA one included: dropout's
    masks) and takes the same two steps: the same weights (up to the GPU's summation order)."""
    cuda = [torch.device("cuda", 0)]
    cfg = config(model={"num_classes": 10, "input_size": 67, "init": "kaiming"})
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:

        def worker(seed: int) -> rs.State:
            torch.manual_seed(seed)
            return rs.new_state(cfg.recipe, AlexNet(cfg.model, devices=(cuda[0], cuda[0])))

        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(8, 3, 67, 67, generator=gen) * 50).to(cuda[0])
        y = torch.arange(8, device=cuda[0]) % 10

        def step(state: rs.State) -> None:  # dropout draws from the CUDA generator
            state.optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(state.model(x), y).backward()
            state.optimizer.step()

        state = worker(0)
        seed_rank(5, rank=0)
        step(state)
        state.epoch = 1  # as a worker counts an epoch done before it saves
        folder = tmp_path / "checkpoint_epoch_0001"
        ck.save(
            folder,
            state.model,
            classes=CLASSES,
            normalization=Normalization((0.0, 0.0, 0.0)),
            epoch=1,
            metrics={},
            train_config=cfg.to_json(),
            train_state=rs.train_state_payload(state, cfg, world=1),
        )
        rs.save_rank_state(folder, 0, rs.rank_state_payload(state, 0, cuda))
        saved_cuda_rng = torch.cuda.get_rng_state(0)
        step(state)
        step(state)

        fresh = worker(1)
        torch.cuda.manual_seed_all(123)  # another process's streams, until the resume
        rs.resume(fresh, folder, cfg, rank=0, devices=cuda)
        assert torch.equal(torch.cuda.get_rng_state(0), saved_cuda_rng)
        step(fresh)
        step(fresh)
        for (name, p), q in zip(state.model.named_parameters(), fresh.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        torch.backends.cudnn.deterministic = deterministic
