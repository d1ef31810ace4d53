"""`pip install '.[serving]'` plus torch is enough to serve: a fresh venv with nothing else
(no Ray, pyarrow, DALI, matplotlib), the project installed from this tree (not imported from
it), `python -m serving` started from another folder on a run folder, and a prediction.

Where the interpreter running the tests is already such an install (.ci/serving-floors), it
is used as it is; elsewhere the test makes the venv, with this interpreter's torch linked in
(unpacking torch again was most of a minute)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, register
from tests.serving.helpers import jpeg, running_server, serving_env

HEAVY = ("ray", "pyarrow", "nvidia.dali", "matplotlib")


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def link_torch(venv: Path, folder: Path) -> None:
    """Put this interpreter's torch, and what torch requires, on the venv's path: symlinks in
    FOLDER (outside the venv, so that pip never changes what they point at), named by a .pth
    file. pip then finds torch installed, as after `pip install torch`, without unpacking its
    ~700 MB again; nothing else of this environment (Ray, pyarrow, DALI, matplotlib) comes
    along. A namespace folder that packages share (CUDA torch's nvidia/..., beside DALI's
    nvidia/dali) is made here, and only the packages' own folders in it are linked."""
    from importlib import metadata

    from packaging.requirements import Requirement

    folder.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        shared: dict[str, bool] = {}  # per top-level name: a namespace (or dist-info) folder?
        heads = set()  # what to link: a top-level name, or a name inside a shared folder
        for file in dist.files or []:
            name = file.parts[0]
            if name == "..":  # scripts, outside site-packages
                continue
            if name not in shared:  # once per name, not per file (torch lists ~15,000)
                top = Path(dist.locate_file(name))
                shared[name] = top.is_dir() and not (top / "__init__.py").exists()
            heads.add(file.parts[:2] if shared[name] else file.parts[:1])
        for parts in heads:
            link = folder.joinpath(*parts)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(dist.locate_file("/".join(parts)))
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "torch-site.pth").write_text(f"{folder}\n")


def serving_only_python(tmp: Path) -> str:
    if not any(installed(m) for m in HEAVY):
        return sys.executable
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    link_torch(venv, tmp / "torch-site")
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, f"{REPO}[serving]"], check=True, timeout=900)
    return py


@pytest.mark.slow
def test_a_serving_only_install_starts_and_predicts(checkpoint, tmp_path):
    py = serving_only_python(tmp_path)
    probe = (
        "import importlib.util, json, serving\n"
        "def has(m):\n"
        "    try: return importlib.util.find_spec(m) is not None\n"
        "    except ModuleNotFoundError: return False\n"
        f"print(json.dumps({{'absent': [m for m in {HEAVY!r} if not has(m)], 'at': serving.__file__}}))"
    )
    facts = json.loads(
        subprocess.run([py, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    )
    assert facts["absent"] == list(HEAVY)  # none of them installed, so none can be imported
    assert not facts["at"].startswith(str(REPO))  # the installed package, not this tree
    # A run folder whose newest registered checkpoint is ours (the serving path's lookup).
    run = tmp_path / "run"
    (run / "checkpoint_epoch_0001").mkdir(parents=True)
    for f in checkpoint.iterdir():
        (run / "checkpoint_epoch_0001" / f.name).write_bytes(f.read_bytes())
    register(run, "checkpoint_epoch_0001")
    env = serving_env()
    env.pop("PYTHONPATH", None)
    with running_server(["--checkpoint", str(run)], tmp_path / "server.log", env, python=py, cwd=tmp_path) as url:
        r = httpx.post(f"{url}/predict", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5, r.text
        assert r.json()["checkpoint"]["checkpoint"] == "checkpoint_epoch_0001"
