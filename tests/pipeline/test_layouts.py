"""Layout detection on real trees written to disk, one per layout users actually have."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.classes import bundled_names
from pipeline.layouts import LayoutError, detect
from pipeline.sample import CLASSES, SampleConfig, devkit_ids, generate


def small(tmp: Path, layout: str) -> Path:
    generate(SampleConfig(out=tmp / layout, train_per_class=3, val_per_class=3, val_layout=layout))
    return tmp / layout


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {layout: small(tmp, layout) for layout in ("folders", "kaggle", "devkit")}


def val_truth(tree: Path) -> dict[str, str]:
    """file name -> wnid, read off the folders layout (the labels are the folder names)."""
    return {p.name: p.parent.name for p in (tree / "val").glob("*/*.JPEG")}


def labels_by_name(source, split="val") -> dict[str, str]:
    return {f.relpath.rsplit("/", 1)[-1]: f.wnid for f in source.files[split]}


def test_folders_layout(trees):
    src = detect(trees["folders"])
    assert src.layouts == {"train": "folders", "val": "folders"}
    assert len(src.files["train"]) == 30 and len(src.files["val"]) == 30
    assert [c.wnid for c in src.classes] == sorted(w for w, _ in CLASSES)
    assert [c.index for c in src.classes] == list(range(10))
    assert src.classes[0].name == "tench, Tinca tinca" and src.names_source == "bundled"
    assert all(f.relpath.startswith("train/") and not f.relpath.startswith("/") for f in src.files["train"])


def test_kaggle_flat_val_with_csv_gives_the_true_labels(trees):
    src = detect(trees["kaggle"])
    assert src.layouts["val"] == "kaggle-csv"
    assert src.names_source == "LOC_synset_mapping.txt"
    assert labels_by_name(src) == val_truth(trees["folders"])


def test_devkit_labels_are_mapped_through_meta_mat_not_sorted_order(trees):
    src = detect(trees["devkit"])
    assert src.layouts["val"] == "devkit"
    assert labels_by_name(src) == val_truth(trees["folders"])
    # The devkit's IDs really are out of sorted order in this tree: a reader that used
    # ILSVRC2012_ID - 1 as the class index would be wrong for most images.
    ids = devkit_ids()
    index = {c.wnid: c.index for c in src.classes}
    assert sum(ids[w] - 1 != index[w] for w in ids) >= 8


def test_kaggle_nested_ilsvrc_tree(trees, tmp_path):
    root = tmp_path / "kaggle-root"
    nested = root / "ILSVRC" / "Data" / "CLS-LOC"
    nested.mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(trees["kaggle"] / split, nested / split)
    for meta in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(trees["kaggle"] / meta, root / meta)
    src = detect(root)
    assert src.layouts == {"train": "folders", "val": "kaggle-csv"}
    assert src.files["train"][0].relpath.startswith("ILSVRC/Data/CLS-LOC/train/")
    assert labels_by_name(src) == val_truth(trees["folders"])


def test_flat_val_file_missing_from_csv_is_reported_not_fatal(trees, tmp_path):
    root = tmp_path / "k"
    shutil.copytree(trees["kaggle"], root)
    (root / "val" / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"x")
    src = detect(root)
    assert [u.relpath for u in src.unlabelled["val"]] == ["val/ILSVRC2012_val_99999999.JPEG"]
    assert "LOC_val_solution.csv" in src.unlabelled["val"][0].reason


def test_no_layout_error_names_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(LayoutError) as err:
        detect(tmp_path)
    msg = str(err.value)
    assert "train" in msg and "val" in msg and "ILSVRC/Data/CLS-LOC" in msg


def test_flat_val_without_labels_error_names_both_label_sources(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(LayoutError) as err:
        detect(tmp_path)
    msg = str(err.value)
    assert "LOC_val_solution.csv" in msg and "ILSVRC2012_validation_ground_truth.txt" in msg and "meta.mat" in msg


def test_missing_src_is_a_clear_error(tmp_path):
    with pytest.raises(LayoutError, match="not a folder"):
        detect(tmp_path / "nope")


def test_bundled_names_cover_the_1000_classes():
    names = bundled_names()
    assert len(names) == 1000
    assert names["n01440764"].startswith("tench") and names["n15075141"].startswith("toilet tissue")
    assert list(names) == sorted(names)


def test_an_empty_class_folder_keeps_its_index(trees, tmp_path):
    root = tmp_path / "gap"
    shutil.copytree(trees["folders"], root)
    emptied = sorted((root / "train").iterdir())[3]
    for split in ("train", "val"):
        for f in (root / split / emptied.name).iterdir():
            f.unlink()
    src = detect(root)
    assert [c.wnid for c in src.classes] == sorted(w for w, _ in CLASSES)  # still all ten, same indices
    assert emptied.name not in {f.wnid for f in src.files["train"]}
