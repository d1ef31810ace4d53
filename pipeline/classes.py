"""Class index and names: index = position of the wnid in ascending order (every modern tool's
convention); names from the dataset's own mapping file when present, else a bundled list."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class ImageClass:
    index: int
    wnid: str
    name: str

    def to_json(self) -> dict:
        return asdict(self)


def bundled_names() -> dict[str, str]:
    """wnid -> name for the 1000 ILSVRC-2012 classes, shipped with the package (offline).

    Source: timm's data/_info (Apache-2.0), the WordNet lemmas of the ILSVRC-2012 synsets.
    """
    text = resources.files("pipeline").joinpath("data/imagenet_classes.tsv").read_text("utf-8")
    return _parse_tab_or_space_mapping(text)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Kaggle's LOC_synset_mapping.txt: 'n01440764 tench, Tinca tinca' per line."""
    return _parse_tab_or_space_mapping(path.read_text("utf-8"))


def _parse_tab_or_space_mapping(text: str) -> dict[str, str]:
    names = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.replace("\t", " ", 1).partition(" ")
        names[wnid] = name.strip()
    return names


def build_classes(wnids: set[str] | list[str], names: dict[str, str]) -> list[ImageClass]:
    """Sorted wnids -> 0..N-1; a wnid with no known name is named by its wnid."""
    return [ImageClass(index=i, wnid=w, name=names.get(w, w)) for i, w in enumerate(sorted(set(wnids)))]
