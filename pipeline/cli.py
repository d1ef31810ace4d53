"""The one bridge from a settings dataclass to a command line, and the one logging setup.

Every CLI built on a dataclass (`pipeline.shard`, `trainer.run`, `trainer.evaluate`,
`deploy.job`) declares its options here from the dataclass's fields: the flag is the field's
name (`--batch-size` for `batch_size`) unless `Flag.flag` says otherwise, the type and
choices come from the annotation, and `--help` prints each default's value once, as the
dataclass holds it (or as `note` words it, for a default that depends on something else).

- `bool`: `--x` / `--no-x` (both spellings always work); `bool | Literal["auto"]` likewise,
  its word the default when neither is given;
- `int`, `float`, `str`, `Path`, `X | None` (the flag takes an X);
- `Literal[...]`: its values are the choices;
- `int | Literal["auto"]` and such: a word of the Literal, else the other type.

Options default to "not given" (argparse.SUPPRESS): `given(namespace, names)` returns only
what was typed, so a caller layers flags over any base (a recipe, the environment).
`env_values` reads PREFIX_FIELD variables for a dataclass (an empty one counts as unset).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Every command's console logging: time, level, logger, message, on stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one field appears on the command line (everything optional)."""

    help: str = ""
    flag: str | None = None  # the option's name; default `--field-name`
    choices: Sequence[Any] | None = None  # default: a Literal annotation's values
    metavar: str | None = None
    positional: bool = False
    required: bool = False
    inverted: bool = False  # a bool field set False by `flag` alone (`--quiet` for progress)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_switch(tp: Any) -> bool:
    """bool, or bool | Literal[...] (a switch whose default may be a word: "auto")."""
    if tp is bool:
        return True
    if not _is_union(tp):
        return False
    members = [t for t in typing.get_args(tp) if t is not type(None)]
    return bool in members and all(t is bool or typing.get_origin(t) is Literal for t in members)


def _switch_value(text: str, tp: Any) -> Any:
    """An environment variable's value for a switch: one of its words, else true or false."""
    words = [v for t in typing.get_args(tp) if typing.get_origin(t) is Literal for v in typing.get_args(t)]
    return text if text in words else text.lower() in ("1", "true", "yes", "on")


def _converter(tp: Any) -> tuple[Callable[[str], Any], list[Any] | None]:
    """A str -> value function for annotation `tp`, and its choices (Literal) if any."""
    if _is_union(tp):
        members = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(members) == 1:
            return _converter(members[0])
        words = [v for t in members if typing.get_origin(t) is Literal for v in typing.get_args(t)]
        others = [t for t in members if typing.get_origin(t) is not Literal]

        def convert(text: str) -> Any:
            if text in words:
                return text
            for other in others:
                try:
                    return _converter(other)[0](text)
                except (TypeError, ValueError):
                    continue
            raise argparse.ArgumentTypeError(f"expected {' or '.join(map(repr, words))} or a number, got {text!r}")

        convert.__name__ = " or ".join([*(repr(w) for w in words), *(getattr(t, "__name__", str(t)) for t in others)])
        return convert, None
    if typing.get_origin(tp) is Literal:
        values = list(typing.get_args(tp))
        return type(values[0]), values
    if tp in (int, float, str):
        return tp, None
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        return Path, None
    raise TypeError(f"no command-line form for {tp!r}")


def shown(value: Any) -> str:
    """A default as --help prints it."""
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: object | None = None,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    flags: Mapping[str, Flag] | None = None,
    note: Callable[[str], str | None] | None = None,
    env_prefix: str | None = None,
) -> list[str]:
    """One option per field of dataclass `cls` (those in `only`, less `skip`); returns their
    names, the namespace attributes `given` reads. `defaults` (an instance; else the class's
    own) supplies the values --help shows, unless `note(name)` words one itself."""
    hints = _field_types(cls)
    flags = flags or {}
    wanted = list(only) if only is not None else [f.name for f in dataclasses.fields(cls)]
    names = [n for n in wanted if n not in set(skip)]
    for name in names:
        spec = flags.get(name, Flag())
        tp = hints[name]
        default = getattr(defaults, name) if defaults is not None else _class_default(cls, name)
        if spec.inverted:  # the flag's own state: given, it turns the field off
            default = not default
        text = spec.help
        if not spec.required and not spec.positional:
            said = note(name) if note is not None else None
            text = f"{text} (default: {said if said is not None else shown(default)}"
            text += f"; env {env_prefix}{name.upper()})" if env_prefix else ")"
        text = text.strip()
        option = spec.flag or f"--{name.replace('_', '-')}"
        kw: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
        if _is_switch(tp):
            if spec.inverted:
                parser.add_argument(option, dest=name, action="store_false", **kw)
            else:
                parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, **kw)
            continue
        convert, choices = _converter(tp)
        kw.update(type=convert, choices=spec.choices or choices, metavar=spec.metavar)
        if spec.positional:
            kw.pop("default")
            parser.add_argument(name, **kw)
        else:
            parser.add_argument(option, dest=name, required=spec.required, **kw)
    return names


def _class_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def given(ns: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among `names` that were given on the command line."""
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


def env_values(
    cls: type, prefix: str, environ: Mapping[str, str], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """PREFIX_FIELD variables for `cls`'s fields, converted by their annotations (an empty
    variable counts as unset: compose passes unset variables on as "")."""
    hints = _field_types(cls)
    out = {}
    for name in names if names is not None else [f.name for f in dataclasses.fields(cls)]:
        raw = environ.get(prefix + name.upper()) or None
        if raw is not None:
            tp = hints[name]
            out[name] = _switch_value(raw, tp) if _is_switch(tp) else _converter(tp)[0](raw)
    return out
