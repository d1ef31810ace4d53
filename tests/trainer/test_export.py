"""`python -m trainer.export`: a checkpoint written by the trainer's save function exported by
the real command into a Triton model repository; the ONNX model, run by ONNX Runtime, agrees
with the PyTorch model on real photographs (../shared/photos; the sample's images where that
is absent) within the export's tolerance (trainer.export.TOLERANCE: 1e-3 on the logits) at
any batch size; config.pbtxt parses as Triton's model configuration (protobuf text format,
tritonclient's model_config.proto) and describes the model; an export that misses its
tolerance fails and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, make_checkpoint, photographs
from trainer.checkpoint import load_model
from trainer.export import TOLERANCE, parity_inputs

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def export(checkpoint: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.export", str(checkpoint), "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def images(sample_root) -> list[bytes]:
    return photographs(8) or [p.read_bytes() for p in sorted((sample_root / "val").rglob("*.JPEG"))[:8]]


@pytest.fixture(scope="module")
def exported(shard_set, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    checkpoint = make_checkpoint(shard_set, folder / "run" / "checkpoint_epoch_0002", epoch=2)
    (folder / "photos").mkdir()
    for i, data in enumerate(images):
        (folder / "photos" / f"{i}.jpg").write_bytes(data)
    done = export(checkpoint, folder / "repo", "--images", str(folder / "photos"))
    assert done.returncode == 0, done.stderr[-3000:]
    return checkpoint, folder / "repo", done


def test_the_triton_layout_and_the_printed_parity(exported):
    checkpoint, repo, done = exported
    model = repo / "alexnet"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
        "preprocessing.json",
    ]
    assert not [p for p in repo.iterdir() if p.name != "alexnet"]  # no staging left behind
    report = json.loads(done.stdout)
    assert report["model"] == str(model) and 0 <= report["max_abs_logit_difference"] <= TOLERANCE
    assert "max |logit difference| ONNX Runtime vs PyTorch" in done.stderr
    onnx.checker.check_model(str(model / "1" / "model.onnx"))


def test_onnx_runtime_agrees_with_pytorch_on_real_photographs_at_any_batch(exported, images):
    checkpoint, repo, _ = exported
    net, meta = load_model(checkpoint)
    session = ort.InferenceSession(str(repo / "alexnet" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (tensor,) = session.get_inputs()
    assert tensor.name == "input" and tensor.shape[1:] == [3, meta.input_size, meta.input_size]
    assert isinstance(tensor.shape[0], str)  # the batch dimension is dynamic
    crops = parity_inputs(meta, images)  # serving's preprocessing of each photograph
    with torch.no_grad():
        logits, fc7 = (t.numpy() for t in net.forward_with_embedding(torch.from_numpy(crops)))
    for batch in (crops[:1], crops):
        ours_logits, ours_fc7 = session.run(["logits", "fc7"], {"input": batch})
        assert np.abs(ours_logits - logits[: len(batch)]).max() <= TOLERANCE
        assert np.abs(ours_fc7 - fc7[: len(batch)]).max() <= TOLERANCE
    top5 = lambda x: np.argsort(-x, axis=1)[:, :5].tolist()  # noqa: E731
    assert top5(ours_logits) == top5(logits)


def test_config_pbtxt_is_tritons_model_configuration(exported):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    checkpoint, repo, _ = exported
    _, meta = load_model(checkpoint)
    config = text_format.Parse((repo / "alexnet" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "alexnet" and config.backend == "onnxruntime"
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    (tensor,) = config.input
    assert (tensor.name, list(tensor.dims)) == ("input", [3, meta.input_size, meta.input_size])
    assert tensor.data_type == model_config_pb2.TYPE_FP32
    outputs = {o.name: (list(o.dims), o.label_filename) for o in config.output}
    assert outputs == {"logits": ([len(meta.classes)], "labels.txt"), "fc7": ([4096], "")}
    assert (repo / "alexnet" / "labels.txt").read_text().split() == meta.wnids
    recipe = json.loads((repo / "alexnet" / "preprocessing.json").read_text())
    assert recipe["mean"] == list(meta.normalization.mean) and recipe["std"] == list(meta.normalization.std)
    assert recipe["input_size"] == meta.input_size and recipe["input"] == "input"


@pytest.mark.slow
def test_an_export_over_its_tolerance_fails_and_leaves_the_repository_as_it_was(exported):
    checkpoint, repo, _ = exported
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*")}
    done = export(checkpoint, repo, "--tolerance", "1e-12")
    assert done.returncode == 1 and "over the tolerance 1e-12" in done.stderr, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*")} == before


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    done = export(tmp_path / "nothing", tmp_path / "repo")
    assert done.returncode == 2 and "cannot export" in done.stderr and not (tmp_path / "repo").exists()
