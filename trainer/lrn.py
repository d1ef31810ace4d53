"""Section 3.3's local response normalisation, as the paper writes it (alpha not divided by
n, as torch's local_response_norm would), with its gradient in closed form: `PaperLRN`, the
module the model uses after conv1 and conv2, and `paper_lrn`, the function (the grouped twin
applies it to its column-halves)."""

from __future__ import annotations

import torch
from torch import nn


def channel_window_sum(t: torch.Tensor, size: int) -> torch.Tensor:
    """sum_{j=max(0,i-size/2)}^{min(N-1,i+size/2)} t[:, j] for every channel i (dim 1): the
    paper's window, clipped at the first and last map."""
    s = t.clone()
    for d in range(1, size // 2 + 1):
        s[:, d:] += t[:, :-d]
        s[:, :-d] += t[:, d:]
    return s


class _PaperLRNFunction(torch.autograd.Function):
    """The LRN with its gradient written out. With d = k + alpha * W(a^2) (W: the channel
    window, symmetric) and b = a * d^-beta:

        dL/da = g * d^-beta - 2 * alpha * beta * a * W(g * b / d)

    torch's local_response_norm (pad + avg_pool3d + pow, differentiated op by op) cost as
    much as the conv layers on CPU: a training step took 1.33-1.40x as long with it
    (benchmarks/model_step.py, its `torch_lrn` baseline).
    Lower-precision maps (bf16 autocast) are normalised in float32, and the output is float32,
    as torch's LRN gave under CUDA autocast (its pow runs in float32 there)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        wide = a.to(torch.promote_types(a.dtype, torch.float32))  # bf16/fp16 maps: the sums in fp32
        d = channel_window_sum(wide * wide, size).mul_(alpha).add_(k)
        scale = d.pow(-beta)
        ctx.save_for_backward(a, d, scale)
        ctx.constants = (size, alpha, beta)
        return wide * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        a, d, scale = ctx.saved_tensors
        size, alpha, beta = ctx.constants
        wide = a.to(d.dtype)
        g_scaled = g.to(d.dtype) * scale
        w = channel_window_sum(g_scaled * wide / d, size)  # g * b / d
        grad = g_scaled.sub_(w.mul_(wide).mul_(2 * alpha * beta))
        return grad.to(a.dtype), None, None, None, None


def paper_lrn(a: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Section 3.3's response normalisation across the maps (dim 1) of `a`."""
    return _PaperLRNFunction.apply(a, size, alpha, beta, k)


class PaperLRN(nn.Module):
    """Local response normalisation exactly as the paper writes it (3.3):

        b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2) ^ beta

    alpha is the paper's, not divided by n (torch's local_response_norm divides it).
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN size n must be odd (the window i-n/2..i+n/2 spans n maps only then), got {size}")
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return paper_lrn(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"n={self.size}, alpha={self.alpha} (paper's, not divided by n), beta={self.beta}, k={self.k}"
