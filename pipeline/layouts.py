"""Find the images and their labels in the raw ImageNet layouts people actually have.

Recognised (SRC is what the user passes to `pipeline.shard --src`):
- train:  `train/<wnid>/*`                      (ILSVRC tarballs unpacked; also Kaggle)
- val:    `val/<wnid>/*`                        ("folders": torchvision-style, already sorted)
          `val/*` + `LOC_val_solution.csv`      ("kaggle-csv": Kaggle's ImageNet challenge)
          `val/*` + devkit's `ILSVRC2012_validation_ground_truth.txt` + `meta.mat`
                                                ("devkit": the labels are ILSVRC2012_IDs,
                                                 whose order is NOT sorted-wnid order)
The image folders may sit directly under SRC or under Kaggle's `ILSVRC/Data/CLS-LOC/`.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.classes import ImageClass, build_classes, bundled_names, read_synset_mapping
from pipeline.shardset import SPLITS  # the raw split folders are named as the shard set's

IMAGE_ROOTS = (".", "ILSVRC/Data/CLS-LOC", "Data/CLS-LOC")
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
_DEVKIT_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


class LayoutError(ValueError):
    """SRC does not look like any ImageNet layout we know; the message says what was looked for."""


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # POSIX path relative to SRC, so the manifest does not depend on the mount point
    wnid: str


@dataclass(frozen=True)
class Unlabelled:
    relpath: str
    reason: str


@dataclass
class SourceSet:
    root: Path
    layouts: dict[str, str]  # split -> layout name
    files: dict[str, list[SourceFile]]  # split -> files, sorted by relpath
    unlabelled: dict[str, list[Unlabelled]] = field(default_factory=dict)
    classes: list[ImageClass] = field(default_factory=list)
    names_source: str = "bundled"

    def label_of(self) -> dict[str, int]:
        return {c.wnid: c.index for c in self.classes}


def _visible_files(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))


def _visible_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _find(src: Path, name: str, max_depth: int = 4) -> Path | None:
    """First file called `name` at most `max_depth` folders below src (shallowest first),
    skipping the image folders themselves (which hold a million files)."""
    level = [src]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for folder in level:
            candidate = folder / name
            if candidate.is_file():
                return candidate
            try:
                nxt.extend(folder / d for d in _visible_dirs(folder) if d not in ("train", "val", "test"))
            except OSError:
                continue
        level = nxt
    return None


def _folder_split(src: Path, split_dir: Path) -> list[SourceFile]:
    files = []
    for wnid in _visible_dirs(split_dir):
        for name in _visible_files(split_dir / wnid):
            files.append(SourceFile((split_dir / wnid / name).relative_to(src).as_posix(), wnid))
    return files


def read_kaggle_val_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid; the label is the first token of PredictionString (all boxes share it)."""
    labels = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            tokens = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and tokens:
                labels[row["ImageId"]] = tokens[0]
    if not labels:
        raise LayoutError(f"{path} has no ImageId,PredictionString rows")
    return labels


def read_devkit_labels(ground_truth: Path, meta: Path) -> dict[int, str]:
    """Validation image number (1-based) -> wnid, through meta.mat's ILSVRC2012_ID -> WNID.

    The devkit numbers classes 1..1000 in its own order, which is NOT ascending wnid order:
    label 1 is n02119789 (kit fox), while sorted-wnid index 0 is n01440764 (tench).
    """
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy is in the pipeline extra
        raise LayoutError("reading the devkit's meta.mat needs scipy: pip install 'alexnet-2012[pipeline]'") from exc
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {}
    for ilsvrc_id, wnid, num_children in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]):
        if int(num_children) == 0:  # leaves are the 1000 classes; inner nodes follow them
            id_to_wnid[int(ilsvrc_id)] = str(wnid)
    labels = {}
    for number, line in enumerate(ground_truth.read_text().split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in id_to_wnid:
            raise LayoutError(f"{ground_truth} line {number}: ILSVRC2012_ID {ilsvrc_id} is not a class in {meta}")
        labels[number] = id_to_wnid[ilsvrc_id]
    return labels


def _flat_val(src: Path, val_dir: Path, image_root: Path) -> tuple[str, list[SourceFile], list[Unlabelled]]:
    names = _visible_files(val_dir)
    csv_path = _find(src, KAGGLE_VAL_CSV) or _find(image_root, KAGGLE_VAL_CSV)
    if csv_path is not None:
        by_stem = read_kaggle_val_csv(csv_path)
        lookup = lambda name: by_stem.get(name.split(".", 1)[0])  # noqa: E731
        layout, missing = "kaggle-csv", f"no row in {KAGGLE_VAL_CSV}"
    else:
        gt, meta = _find(src, DEVKIT_GROUND_TRUTH), _find(src, DEVKIT_META)
        if gt is None or meta is None:
            raise LayoutError(
                f"{val_dir} holds images directly (no class folders), but no labels were found for "
                f"them: looked under {src} for {KAGGLE_VAL_CSV} (Kaggle) or for the devkit's "
                f"{DEVKIT_GROUND_TRUTH} together with {DEVKIT_META}"
            )
        by_number = read_devkit_labels(gt, meta)

        def lookup(name: str) -> str | None:
            m = _DEVKIT_VAL_NAME.search(name)
            return by_number.get(int(m.group(1))) if m else None

        layout, missing = "devkit", f"no ILSVRC2012_val_NNNNNNNN number in {DEVKIT_GROUND_TRUTH}"
    files, unlabelled = [], []
    for name in names:
        rel = (val_dir / name).relative_to(src).as_posix()
        wnid = lookup(name)
        if wnid is None:
            unlabelled.append(Unlabelled(rel, missing))
        else:
            files.append(SourceFile(rel, wnid))
    return layout, files, unlabelled


def detect(src: Path | str) -> SourceSet:
    """Look at SRC, decide its layout per split, and list every file with its wnid."""
    src = Path(src).resolve()
    if not src.is_dir():
        raise LayoutError(f"--src {src} is not a folder")
    image_root = next((src / r for r in IMAGE_ROOTS if any((src / r / s).is_dir() for s in SPLITS)), None)
    if image_root is None:
        looked = ", ".join(f"{(src / r).resolve()}/{{train,val}}/" for r in IMAGE_ROOTS)
        raise LayoutError(
            f"no ImageNet layout found in {src}: looked for {looked} "
            "(train/<wnid>/*.JPEG; val/<wnid>/* or flat val/* with LOC_val_solution.csv or the devkit)"
        )
    layouts: dict[str, str] = {}
    files: dict[str, list[SourceFile]] = {}
    unlabelled: dict[str, list[Unlabelled]] = {}
    train_dir, val_dir = image_root / "train", image_root / "val"
    if train_dir.is_dir():
        if not _visible_dirs(train_dir):
            raise LayoutError(f"{train_dir} has no class folders: expected train/<wnid>/*.JPEG")
        layouts["train"], files["train"] = "folders", _folder_split(src, train_dir)
    if val_dir.is_dir():
        if _visible_dirs(val_dir):
            layouts["val"], files["val"] = "folders", _folder_split(src, val_dir)
        else:
            layouts["val"], files["val"], unlabelled["val"] = _flat_val(src, val_dir, image_root)
    for split in files:
        files[split].sort(key=lambda f: f.relpath)
        if not files[split]:
            raise LayoutError(f"the {split} split in {image_root / split} holds no labelled files")

    mapping = _find(src, KAGGLE_SYNSET_MAPPING)
    names, names_source = (
        (read_synset_mapping(mapping), KAGGLE_SYNSET_MAPPING) if mapping else (bundled_names(), "bundled")
    )
    # Classes are the class folders (as torchvision's ImageFolder: an empty folder still
    # holds its index, so one missing class cannot shift every other label) plus any wnid
    # seen only in val labels; sorted -> index.
    wnids = {f.wnid for split_files in files.values() for f in split_files}
    for split in ("train", "val"):
        if layouts.get(split) == "folders":
            wnids.update(_visible_dirs(image_root / split))
    return SourceSet(
        root=src,
        layouts=layouts,
        files=files,
        unlabelled=unlabelled,
        classes=build_classes(wnids, names),
        names_source=names_source,
    )
