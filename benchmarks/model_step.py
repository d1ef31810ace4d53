"""Training-step throughput of the two-column AlexNet against the same network written as one
module with grouped convolutions (same FLOPs, same function), in the same run; and against
itself with torch's F.local_response_norm in place of trainer.lrn.paper_lrn (`torch_lrn`:
the LRN the model had before its gradient was written out).

    python -m benchmarks.model_step                       # all three models, prints JSON
    python -m benchmarks.model_step --batch-sizes 32 64 --compile

On the CPU. The GPU's train step (fp32, bf16 + channels_last, torch.compile, the grouped
twin, at the trainer's batch sizes, in TFLOP/s against the chip's peak) has its one home in
benchmarks/gpu_check.py.

A step is forward + cross-entropy + backward + the trainer's update (trainer.optim.PaperSGD:
the paper's rule, momentum 0.9, wd 5e-4 on weights) on a fixed
synthetic batch (no data loading: this measures the model). The two models are measured in
alternating rounds so that drift in the machine's speed hits all alike; the figure is the
median round. Target on CPU: columns/grouped >= 0.95 (the column split costs almost nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, cast

import torch
import torch.nn.functional as F

from trainer.grouped_model import GroupedAlexNet
from trainer.lrn import PaperLRN
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import PaperSGD, param_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: torch.nn.Module, device: torch.device, amp: bool):
    opt = PaperSGD(param_groups(model, 5e-4, decay_biases=False), lr=1e-4, momentum=0.9)
    dtype = torch.bfloat16

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One training step; returns (forward s, backward+update s)."""
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    return step


class TorchLRN(PaperLRN):
    """The baseline LRN: torch's own (pad + avg_pool3d + pow, autograd op by op), alpha * n
    because torch divides alpha by n and the paper does not. The same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, self.size, alpha=self.alpha * self.size, beta=self.beta, k=self.k)


KINDS = ("columns", "grouped", "torch_lrn")


def build(kind: str, device: torch.device, channels_last: bool, compile_: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GroupedAlexNet().to(device) if kind == "grouped" else AlexNet(AlexNetConfig(), devices=(device, device))
    if kind == "torch_lrn":
        for m in model.modules():
            if isinstance(m, PaperLRN):
                m.__class__ = TorchLRN
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch documents and accepts memory_format; its overloads omit it
    # compile wraps a Module in an OptimizedModule, a Module; its stubs say only Callable
    return cast(torch.nn.Module, torch.compile(model)) if compile_ else model


def measure(
    kinds: list[str],
    device: torch.device,
    batch: int,
    steps: int,
    rounds: int,
    warmup: int,
    amp: bool,
    channels_last: bool,
    compile_: bool,
) -> dict:
    x = torch.randn(batch, 3, 227, 227, device=device) * 60
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    models = {k: build(k, device, channels_last, compile_) for k in kinds}
    steps_fn = {k: make_step(m, device, amp) for k, m in models.items()}
    for k in kinds:
        for _ in range(warmup):
            steps_fn[k](x, y)
    per_round: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    peak = dict.fromkeys(kinds, 0)
    for _ in range(rounds):
        for k in kinds:  # alternate, so machine drift hits every model alike
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [steps_fn[k](x, y) for _ in range(steps)]
            per_round[k].append((sum(t[0] for t in times) / steps, sum(t[1] for t in times) / steps))
            if device.type == "cuda":
                peak[k] = max(peak[k], torch.cuda.max_memory_allocated(device))
    out: dict[str, Any] = {}
    for k in kinds:
        total = statistics.median(f + b for f, b in per_round[k])
        out[k] = {
            "img_per_s": round(batch / total, 1),
            "forward_ms": round(statistics.median(f for f, _ in per_round[k]) * 1e3, 2),
            "backward_update_ms": round(statistics.median(b for _, b in per_round[k]) * 1e3, 2),
        }
        if device.type == "cuda":  # during this model's steps (the other models' weights stay resident)
            out[k]["peak_memory_gib"] = round(peak[k] / 2**30, 2)
    for other in ("grouped", "torch_lrn"):
        if "columns" in out and other in out:
            out[f"columns_over_{other}"] = round(out["columns"]["img_per_s"] / out[other]["img_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--only", choices=KINDS, nargs="+", default=None, help="measure these models only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    device = torch.device("cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    kinds = a.only or list(KINDS)
    result = {
        "benchmark": "model_step",
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "bf16_autocast": False,
        "channels_last": False,
        "compile": a.compile,
        "steps_per_round": a.steps,
        "rounds": a.rounds,
        "by_batch": {
            str(b): measure(kinds, device, b, a.steps, a.rounds, a.warmup, False, False, a.compile)
            for b in a.batch_sizes
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
