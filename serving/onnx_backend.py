"""The ONNX Runtime back-end (ALEXNET_BACKEND=onnxruntime): the checkpoint's network exported to
ONNX as it loads, by `python -m trainer.export`'s own functions (the same graph, dynamic batch,
logits and fc7 out), checked against the PyTorch model on the same kind of inputs with the
export's tolerance, then run by ONNX Runtime on the CPU. It answers what the torch back-end
answers (to float32 rounding); which one is faster on a machine, benchmarks/serve.py measures.

Loading takes the export's time (~10 s for the 1000-class network on 2 cores) and holds a
second copy of the weights (~0.25 GB), on start-up and on each hot reload. Needs the `onnx`
extra (`pip install '.[serving,onnx]'`).
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.checkpoint import CheckpointMeta
from trainer.export import FC7, INPUT, LOGITS, TOLERANCE, max_logit_difference, ort_session, parity_inputs, to_onnx
from trainer.model import AlexNet


class OnnxRuntimeNet:
    """forward(crops) -> (logits, fc7 embeddings), as the torch model's forward_with_embedding."""

    def __init__(self, model: AlexNet, meta: CheckpointMeta):
        self.session = ort_session(to_onnx(model))
        diff = max_logit_difference(model, self.session, parity_inputs(meta))
        if not diff <= TOLERANCE:
            raise RuntimeError(
                f"the ONNX export of this checkpoint differs from the PyTorch model by {diff:.3g} "
                f"(max |logit difference|; tolerance {TOLERANCE:g}): not serving it with onnxruntime"
            )
        self.parity = diff

    def __call__(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, hidden = self.session.run([LOGITS, FC7], {INPUT: np.ascontiguousarray(crops, dtype=np.float32)})
        return torch.from_numpy(logits), torch.from_numpy(hidden)
