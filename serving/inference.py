"""How the loaded network runs in the service: `prepare(model, mode, device)`.

Modes (settings.inference):
- "eager": the network exactly as trained, eager PyTorch, float32: the baseline.
- "optimized": the same network with every max pooling computed as two strided 1-D maxima
  (`StridedMaxPool2d`). The pooled values are the same floats (a max picks one of its
  inputs), but PyTorch's CPU
  kernel for an NCHW max_pool2d, which also computes the indices that training needs, cost
  15% of a forward pass on the 2-core reference machine; the strided maxima cost 2%.
  The local response normalisation runs without autograd bookkeeping and with d^-0.75 as
  rsqrt(d) * rsqrt(sqrt(d)) (`InferenceLRN`: within float32 rounding, not bit-identical),
  and on a CPU the allocator keeps freed activation buffers (`keep_freed_memory`).
- "auto" (the default): "optimized" on a CPU, "eager" elsewhere (a GPU's pooling kernel is
  not slow; nothing was measured there).

What was measured and left out (docs/benchmarks.md, "Inference on a CPU"): on a CPU whose
float32 convolutions already run at its peak (oneDNN: ~57 GMAC/s a core on the reference
machine's Zen 4, 57% of the forward), channels_last, torch.jit freezing and torch.compile
(inductor, frozen weights) came within +-10% of eager; ONNX Runtime (settings.backend) is
faster at a batch of one (19 ms against 23) and slower at 32 (66 images/s against 107);
bfloat16
(avx512_bf16) did 1.6x the work per second but moved logits by ~0.4 and changed top-5
answers, so it is not a mode here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Literal

import torch
from torch import nn

from trainer.lrn import PaperLRN, channel_window_sum, paper_lrn
from trainer.model import AlexNet

Mode = Literal["auto", "eager", "optimized"]
MODES: tuple[str, ...] = ("auto", "eager", "optimized")


class StridedMaxPool2d(nn.Module):
    """nn.MaxPool2d(kernel, stride) without padding or dilation (floor mode), for inference:
    the max over each window's rows, taken as `kernel` strided row views, then over its
    columns the same way. Exactly max_pool2d's values; no indices, no gradient bookkeeping."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel, self.stride
        rows = _strided_max(x, -2, k, s)
        return _strided_max(rows, -1, k, s)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel}, stride={self.stride}"


def _strided_max(x: torch.Tensor, dim: int, kernel: int, stride: int) -> torch.Tensor:
    """max over x[..., i + stride * o, ...] for i < kernel along `dim`, o < the output size."""
    size = x.shape[dim]
    if size < kernel:
        raise ValueError(f"input of size {size} is smaller than the pooling window {kernel}")
    span = (size - kernel) // stride * stride + 1  # from the first to the last window's start

    def view(i: int) -> torch.Tensor:
        return x.narrow(dim, i, span)[(slice(None),) * (x.dim() + dim) + (slice(None, None, stride),)]

    out = view(0)
    for i in range(1, kernel):
        out = torch.maximum(out, view(i))
    return out


class InferenceLRN(nn.Module):
    """PaperLRN's forward for inference: the same sums, no autograd bookkeeping, few passes
    over the maps, and d^-0.75 (the paper's beta) as rsqrt(d) * rsqrt(sqrt(d)) instead of
    pow (torch's CPU pow with a fractional exponent was 9.5% of a forward pass; these three
    vector ops cost a fifth of it). Within a few float32 roundings of PaperLRN (tested); any
    other beta uses pow."""

    def __init__(self, lrn: PaperLRN):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = lrn.size, lrn.alpha, lrn.beta, lrn.k

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dtype != torch.float32 or a.requires_grad:
            return paper_lrn(a, self.size, self.alpha, self.beta, self.k)
        squares = a * a  # then d^-beta, then the output: one buffer
        d = channel_window_sum(squares, self.size).mul_(self.alpha).add_(self.k)
        if self.beta == 0.75:
            torch.rsqrt(d, out=squares)
            squares.mul_(d.sqrt_().rsqrt_())
        else:
            torch.pow(d, -self.beta, out=squares)
        return squares.mul_(a)

    def extra_repr(self) -> str:
        return f"n={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def resolve(mode: str, device: torch.device) -> str:
    """The mode "auto" stands for on `device`."""
    if mode == "auto":
        return "optimized" if device.type == "cpu" else "eager"
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; one of {', '.join(MODES)}")
    return mode


# glibc's mallopt parameters, and the sizes: a batch of 32's largest activation is ~37 MB, a
# batch of 64's ~74 MB; what is freed below the trim threshold stays for the next batch.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 128 << 20, 512 << 20


def keep_freed_memory() -> bool:
    """Let this process's allocator reuse freed activation buffers (glibc: no mmap below 128
    MiB, no trim below 512 MiB free). By default glibc serves every block over its mmap
    threshold with a fresh mmap and unmaps it on free, so each forward pass page-faults its
    activations in again, zero-filled: 8-18% of a CPU forward on the reference machine. The
    cost: the process keeps its peak heap (about one batch's activations). False where the
    C library has no mallopt (not glibc): nothing changes there."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # glibc before 2.35 refuses an mmap threshold over HEAP_MAX_SIZE / 2 (32 MiB on 64-bit):
    # then the most it takes.
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) or bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))
    trim_set = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return mmap_set and trim_set


def prepare(model: AlexNet, mode: str, device: torch.device) -> tuple[AlexNet, str]:
    """The loaded (eval-mode) `model` made ready to serve in `mode`; returns it and the mode
    used. "optimized" swaps the pooling and LRN modules in place (no weights are copied) and,
    on a CPU, keeps freed buffers in the process's heap (`keep_freed_memory`)."""
    used = resolve(mode, device)
    if used == "optimized" and device.type == "cpu":
        keep_freed_memory()
    if used == "optimized":
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, nn.MaxPool2d):
                    setattr(module, name, _strided(child))
                elif isinstance(child, PaperLRN):
                    setattr(module, name, InferenceLRN(child))
    return model, used


def _strided(pool: nn.MaxPool2d) -> nn.Module:
    """A StridedMaxPool2d computing exactly what `pool` computes; `pool` itself if it has a
    feature the strided form does not reproduce (padding, dilation, ceil mode, indices)."""
    kernel, stride = pool.kernel_size, pool.stride
    if not (isinstance(kernel, int) and isinstance(stride, int)):
        return pool
    plain = pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
    return StridedMaxPool2d(kernel, stride) if plain and not pool.return_indices else pool
