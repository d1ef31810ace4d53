"""pipeline/cli.py, the one bridge from a settings dataclass to a command line: the forms of
each type, flags over a base, the environment, and --help showing every default's value once,
for every CLI built on it."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from pipeline.cli import Flag, add_fields, env_values, given


@dataclass(frozen=True)
class Example:
    src: Path
    workers: int | Literal["auto"] = "auto"
    amp: bool = True
    quiet_progress: bool = True
    limit: int | None = None
    mode: Literal["fast", "exact"] = "exact"
    rate: float = 0.5


def parser(**kw) -> tuple[argparse.ArgumentParser, list[str]]:
    p = argparse.ArgumentParser(prog="example")
    flags = {"src": Flag("where from", required=True), "quiet_progress": Flag("no bar", flag="--quiet", inverted=True)}
    return p, add_fields(p, Example, flags=flags, **kw)


def parse(*argv: str) -> Example:
    p, names = parser()
    return Example(**given(p.parse_args(argv), names))


def test_each_annotation_gets_its_command_line_form():
    assert parse("--src", "a") == Example(src=Path("a"))
    got = parse("--src", "a", "--workers", "4", "--no-amp", "--quiet", "--limit", "3", "--mode", "fast", "--rate", "2")
    assert got == Example(Path("a"), 4, False, False, 3, "fast", 2.0)
    assert parse("--src", "a", "--workers", "auto", "--amp").workers == "auto"  # int or the word
    for bad in (["--workers", "many"], ["--mode", "slow"], ["--rate", "x"], []):
        with pytest.raises(SystemExit):
            parse(*(["--src", "a"] if bad else []), *bad)


def test_only_what_was_typed_is_given_so_flags_layer_over_any_base():
    p, names = parser()
    assert given(p.parse_args(["--src", "a", "--rate", "1"]), names) == {"src": Path("a"), "rate": 1.0}
    environ = {"X_WORKERS": "3", "X_AMP": "false", "X_LIMIT": "", "X_MODE": "fast"}
    assert env_values(Example, "X_", environ) == {"workers": 3, "amp": False, "mode": "fast"}  # "" is unset


@dataclass(frozen=True)
class Switches:
    channels_last: bool | Literal["auto"] = "auto"


def test_a_switch_whose_default_is_a_word_keeps_both_spellings_and_the_word():
    """`bool | Literal["auto"]` (trainer.run's --amp, --channels-last): --x / --no-x as for a
    bool, the word when neither is given, and the word or a truth value from the environment."""
    p = argparse.ArgumentParser(prog="example")
    names = add_fields(p, Switches)
    assert given(p.parse_args([]), names) == {}  # the default, "auto", stays the dataclass's
    assert given(p.parse_args(["--channels-last"]), names) == {"channels_last": True}
    assert given(p.parse_args(["--no-channels-last"]), names) == {"channels_last": False}
    with pytest.raises(SystemExit):
        p.parse_args(["--channels-last", "auto"])
    assert env_values(Switches, "X_", {"X_CHANNELS_LAST": "auto"}) == {"channels_last": "auto"}
    assert env_values(Switches, "X_", {"X_CHANNELS_LAST": "0"}) == {"channels_last": False}
    assert "--channels-last, --no-channels-last (default: auto)" in " ".join(p.format_help().split())


def test_help_shows_each_default_once_as_its_value():
    p, _ = parser(env_prefix="X_", note={"rate": "half"}.get)
    text = " ".join(p.format_help().split())
    assert "--workers WORKERS (default: auto; env X_WORKERS)" in text
    assert "--amp, --no-amp (default: on; env X_AMP)" in text
    assert "--quiet no bar (default: off; env X_QUIET_PROGRESS)" in text
    assert "--limit LIMIT (default: none; env X_LIMIT)" in text and "(default: half; env X_RATE)" in text
    assert "--mode {fast,exact}" in text and "--src SRC where from" in text and "where from (default" not in text


def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command built on the bridge, its parser as `--help` prints it."""
    import deploy.job
    import pipeline.shard
    import trainer.evaluate
    import trainer.run

    parsers = {"trainer.run": trainer.run.build_parser()}
    for name, module in (
        ("pipeline.shard", pipeline.shard),
        ("trainer.evaluate", trainer.evaluate),
        ("deploy.job", deploy.job),
    ):
        captured = {}

        def capture(self, args=None, namespace=None, _captured=captured):
            _captured["parser"] = self
            raise SystemExit(0)

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
        try:
            with pytest.raises(SystemExit):
                module.parse_args([])
        finally:
            argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        parsers[name] = captured["parser"]
    return parsers


@pytest.mark.parametrize("name", ["pipeline.shard", "trainer.run", "trainer.evaluate", "deploy.job"])
def test_every_cli_help_shows_values_not_placeholders(name):
    text = " ".join(cli_parsers()[name].format_help().split())
    defaults = re.findall(r"\(default: ([^)]*)\)", text)
    assert len(defaults) >= 3, text
    assert "None" not in defaults and "the preset's" not in text and "default: None" not in text
    for action in cli_parsers()[name]._actions:  # each option's default, once
        assert (action.help or "").count("(default:") <= 1, action.help
    if name == "trainer.run":
        assert "--lr LR learning rate (default: 0.01; --preset sample: 0.005)" in text
        assert (
            "--epochs EPOCHS epochs to train (a resubmission may change it) (default: 90; --preset sample: 8)" in text
        )
        assert "--no-lrn" in text and "--no-ten-crop-at-end" in text and "--no-divergence-guard" in text
