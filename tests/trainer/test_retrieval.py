"""trainer.retrieval: the fc7 index that the paper's Figure 4 and serving's /similar share."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shardset import open_shard_set
from tests.helpers import make_checkpoint
from trainer.checkpoint import load_model
from trainer.retrieval import Cancelled, embed_all, figure4_rows, retrieval_sheet, shard_samples


@pytest.fixture(scope="module")
def checkpoint(shard_set, tmp_path_factory):
    return make_checkpoint(shard_set, tmp_path_factory.mktemp("retrieval") / "checkpoint_epoch_0001")


def val_items(shard_set, meta, split="val"):
    shards = open_shard_set(shard_set[0])
    tars = [(s["tar"], shards.root / s["tar"]) for s in shards.shards(split)]
    return shards, shard_samples(tars, meta.input_size, meta.normalization)


def test_every_val_sample_is_its_own_nearest_neighbour(shard_set, checkpoint):
    model, meta = load_model(checkpoint)
    shards, items = val_items(shard_set, meta)
    with torch.no_grad():
        index = embed_all(shards.root, items, lambda x: model.forward_with_embedding(torch.from_numpy(x))[1], batch=7)
    assert len(index.keys) == shards.num_samples("val") and index.vectors.shape == (len(index.keys), 4096)
    assert all(origin.endswith(":" + key) for key, origin in zip(index.keys, index.origins))
    for q in range(0, len(index.keys), 10):
        first, second = index.nearest(index.vectors[q], 2)
        assert first["key"] == index.keys[q] and first["distance"] < 1e-3 < second["distance"]


def test_a_build_stops_when_asked(shard_set, checkpoint):
    _, meta = load_model(checkpoint)
    shards, items = val_items(shard_set, meta)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        embed_all(shards.root, items, lambda x: torch.zeros(len(x), 4096), batch=4, stop=stop)


def test_the_retrieval_sheet_is_figure_4s_grid(shard_set, checkpoint, tmp_path):
    out = retrieval_sheet(checkpoint, shard_set[0], tmp_path / "retrieval.png", queries=3, neighbours=4, thumb=32)
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (3 * (32 + 8), 32 + 16 + 4 * (32 + 8), 3)
    # each row starts with its query: a thumbnail, not the white gap
    assert all(sheet[r * 40 : r * 40 + 32, :32].std() > 0 for r in range(3))


def test_figure_4_queries_validation_images_against_training_images(shard_set, checkpoint):
    model, meta = load_model(checkpoint)

    def index(split):
        shards, items = val_items(shard_set, meta, split)
        with torch.no_grad():
            return embed_all(
                shards.root,
                items,
                lambda x: model.forward_with_embedding(torch.from_numpy(x))[1],
                batch=16,
                split=split,
            )

    train, val = index("train"), index("val")
    rows = figure4_rows(train, val, queries=5, neighbours=6)
    assert len(rows) == 5 and len({query for query, _ in rows}) == 5
    for query, found in rows:
        assert query.startswith("val/") and len(found) == 6 and all(f.startswith("train/") for f in found)
        q = val.origins.index(query)
        distances = torch.tensor(
            [float(torch.dist(val.vectors[q], train.vectors[train.origins.index(f)])) for f in found]
        )
        nearest = (train.vectors - val.vectors[q]).norm(dim=1).sort().values[:6]  # the 6 nearest of all
        assert torch.allclose(distances, nearest, rtol=1e-4)
