"""Print pip constraints pinning the core and the serving extra of pyproject.toml to their
declared minimums (`name>=X` -> `name==X`), for .ci/serving-floors. torch is left out: CI
installs its CPU build (the Makefile's TORCH)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip's own copy of tomli
    from pip._vendor import tomli as tomllib

SKIP = {"torch"}


def floors(pyproject: Path, extra: str = "serving") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    out = []
    for spec in project["dependencies"] + project["optional-dependencies"][extra]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,;\s]+)", spec.strip())
        if m is None:
            sys.exit(f"{spec!r}: every core and {extra} dependency needs a plain '>=' floor")
        if m.group(1).lower() not in SKIP:
            out.append(f"{m.group(1)}=={m.group(3)}")
    return out


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml")))
