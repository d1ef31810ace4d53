"""trainer/config.py: TrainConfig in sections, the recipes as files (`--preset`, `--recipe
PATH`), the config.json of runs written before the sections, paths resolved when the
command runs. (The paper's values themselves: test_recipe.py; what a resubmission may
change: test_resume.py.)"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from trainer.config import RECIPES_DIR, RecipeError, TrainConfig, flat, read_recipe
from trainer.model import AlexNetConfig
from trainer.run import parse_args

LEGACY = Path(__file__).parent / "legacy"


def test_the_model_section_is_the_architecture_itself_and_every_section_round_trips():
    cfg = TrainConfig.preset("sample").updated({"model": {"lrn": False}, "runtime": {"workers": 4}})
    assert isinstance(cfg.model, AlexNetConfig) and cfg.model.init == "kaiming" and not cfg.model.lrn
    doc = json.loads(json.dumps(cfg.to_json()))
    assert set(doc) == {"recipe", "model", "input", "runtime"} and TrainConfig.from_json(doc) == cfg
    names = [f.name for section in (cfg.recipe, cfg.model, cfg.input, cfg.runtime) for f in fields(section)]
    assert len(flat(doc)) == len(names) and flat(doc)["recipe"] == "sample"  # one name per setting


def test_the_flat_config_json_of_runs_before_the_sections_still_loads():
    """tests/trainer/legacy/config.json: 37 flat fields, as the trainer wrote them before."""
    legacy = json.loads((LEGACY / "config.json").read_text())
    assert len(legacy) == 37
    cfg = TrainConfig.from_json(legacy)
    assert (cfg.recipe.name, cfg.recipe.epochs, cfg.recipe.lr, cfg.recipe.batch_size) == ("sample", 2, 0.005, 16)
    assert (cfg.model.input_size, cfg.model.init, cfg.input.loader, cfg.input.divide_by_std) == (
        67,
        "kaiming",
        "dali",
        True,
    )
    assert (cfg.runtime.name, cfg.runtime.storage_path, cfg.input.data) == ("stopped", "/runs", "/data/shards")
    assert not cfg.recipe.ten_crop_at_end and cfg.runtime.print_freq == 0
    assert {k: v for k, v in cfg.flat().items() if k in legacy or k == "recipe"} == {
        **{k: v for k, v in legacy.items() if k != "preset"},
        "recipe": "sample",
    }
    assert TrainConfig.from_json({**legacy, "a_setting_from_the_future": 1}) == cfg


def test_a_recipe_file_of_ones_own_with_flags_over_it(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(
        '# few classes\n[recipe]\nlr = 0.002\nwarmup_epochs = 1.5\n[model]\ninit = "kaiming"\n[runtime]\nworkers = 2\n'
    )
    cfg, _ = parse_args(["--data", "d", "--recipe", str(mine), "--warmup-epochs", "2"])
    assert cfg.recipe.name == str(mine) and cfg.recipe.lr == 0.002 and cfg.recipe.warmup_epochs == 2
    assert cfg.recipe.epochs == 90 and cfg.model.init == "kaiming" and cfg.runtime.workers == 2  # paper's, else
    (tmp_path / "bad.toml").write_text("[recipe]\nlearning_rate = 0.1\n")
    with pytest.raises(RecipeError, match=r"\[recipe\] has no setting learning_rate"):
        read_recipe(tmp_path / "bad.toml")
    (tmp_path / "worse.toml").write_text("[optimizer]\nlr = 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--recipe", str(tmp_path / "worse.toml")])
    with pytest.raises(SystemExit):  # one recipe or the other
        parse_args(["--data", "d", "--recipe", str(mine), "--preset", "sample"])
    assert sorted(p.name for p in RECIPES_DIR.iterdir()) == ["paper.toml", "sample.toml"]


def test_paths_are_resolved_when_the_command_runs_not_at_import(tmp_path, monkeypatch):
    assert TrainConfig().runtime.storage_path == "" and TrainConfig().input.data == ""  # nothing resolved at import
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALEXNET_HOME", str(tmp_path / "home"))
    cfg, _ = parse_args([])  # the home's shard set and runs folder (pipeline.home)
    assert cfg.input.data == str(tmp_path / "home" / "shards")
    assert cfg.runtime.storage_path == str(tmp_path / "home" / "runs")
    monkeypatch.setenv("ALEXNET_HOME", "")  # unset: ~/alexnet
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert parse_args([])[0].input.data == str(tmp_path / "user" / "alexnet" / "shards")
    cfg, _ = parse_args(["--data", "shards", "--storage-path", "runs", "--resume", "old/checkpoint_epoch_0001"])
    assert cfg.runtime.storage_path == str(tmp_path / "runs") and cfg.input.data == str(tmp_path / "shards")
    assert cfg.runtime.resume_from == str(tmp_path / "old" / "checkpoint_epoch_0001")
    cfg, _ = parse_args(["--data", "shards", "--storage-path", "s3://bucket/runs"])
    assert cfg.runtime.storage_path == "s3://bucket/runs"  # a URI stays as given
