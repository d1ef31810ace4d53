"""Training throughput of the trainer's own step on one GPU, both columns on it: the
`trainer.engine.train_one_epoch` path (bf16 autocast, channels_last, optional torch.compile)
fed synthetic batches already on the GPU, so no DALI is needed (DALI's wheel cannot reach
the lent GPU machines). Under 5 minutes on an H100.

    python -m benchmarks.train_gpu [--batch 128 256] [--steps 50] [--compile]

Prints JSON: images/s per batch size, the GPU's name, peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.engine import train_one_epoch
from trainer.config import TrainConfig
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import build_optimizer


class SyntheticLoader:
    """`steps` batches of one fixed random batch on the device; reports zero data wait."""

    def __init__(self, batch: int, steps: int, device: torch.device, channels_last: bool):
        self.x = torch.randn(batch, 3, 227, 227, device=device) * 60
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.steps = steps
        self.wait_s = 0.0

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    device = torch.device("cuda", 0)
    channels_last = not a.no_channels_last
    out = {"benchmark": "train_gpu", "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "columns_on": "one GPU (both)", "bf16_autocast": True, "channels_last": channels_last,
           "compile": a.compile, "by_batch": {}}
    for batch in a.batch:
        torch.manual_seed(0)
        model = AlexNet(AlexNetConfig(), devices=(device, device))
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if a.compile else model
        opt = build_optimizer(model, TrainConfig())  # the paper's recipe, as trainer.run builds it
        train_one_epoch(step_model, SyntheticLoader(batch, 5, device, channels_last), opt,
                        amp_dtype=torch.bfloat16, device=device)  # warm-up (and compile)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        tally = train_one_epoch(step_model, SyntheticLoader(batch, a.steps, device, channels_last), opt,
                                amp_dtype=torch.bfloat16, device=device)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out["by_batch"][str(batch)] = {"img_per_s": round(tally.count / dt, 1),
                                       "step_ms": round(1e3 * dt / a.steps, 2),
                                       "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
