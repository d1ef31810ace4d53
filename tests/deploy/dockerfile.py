"""deploy/Dockerfile read as a file: its stages (build targets) and its build arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.helpers import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"


@dataclass(frozen=True)
class Stage:
    name: str
    parent: str  # an image, or an earlier stage's name
    lines: tuple[str, ...]  # the instructions, comments dropped

    def instructions(self, keyword: str) -> list[str]:
        return [line.split(None, 1)[1] for line in self.lines if line.split(None, 1)[0] == keyword]


def stages(text: str | None = None) -> dict[str, Stage]:
    text = DOCKERFILE.read_text() if text is None else text
    joined = re.sub(r"\\\n", " ", text)  # continuation lines
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    found, current = {}, None
    for line in lines:
        m = re.fullmatch(r"FROM (\S+) AS (\S+)", line)
        if m:
            current = Stage(m.group(2), m.group(1), ())
        elif current is not None:
            current = Stage(current.name, current.parent, current.lines + (line,))
        if current is not None:
            found[current.name] = current
    return found


def build_targets() -> set[str]:
    return set(stages())


def arg_default(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S*)$", DOCKERFILE.read_text(), re.M)
    return value.strip('"')
