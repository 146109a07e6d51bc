"""The matrix products of the cells and their hand-written kernels, through oneDNN where it is faster.

On x86 CPUs PyTorch's float32 ``addmm`` calls MKL's sgemm, while ``nn.LSTM`` runs oneDNN's RNN
primitive; oneDNN's own products, with the weight packed once, beat ``addmm`` for the kernels' shapes
on the CPU the benchmarks ran on (``benchmarks/results/onednn-notes.md``). This module depends on
nothing else of charlm but its on/off :class:`~charlm.util.switch.Switch`: it is the layer under the cells
and the kernels.

- :class:`StepProduct` packs a weight once per kernel call (oneDNN's linear-weight reorder) and then
  computes ``x @ W^T`` for every step, added into or written to the step's buffer.
- :func:`project_rows` / :func:`project_rows_backward` are the input projection of all steps and
  its gradients (dx through oneDNN; dW stays with PyTorch's matmul, MKL here, faster for that shape).
- :func:`linear` is ``F.linear`` with that forward and backward, for the cells' ``project``.

Where oneDNN is not built in, the tensors are not float32 on the CPU, under autocast or
torch.compile, or with ``CHARLM_ONEDNN=0`` in the environment, every function falls back to the
plain ATen op, with the same result up to float rounding (``tests/test_onednn_matmul.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from charlm.util.switch import Switch

OneDNNOps = tuple[Callable[..., Tensor], Callable[..., Tensor]]  # (packed-weight linear, weight reorder)


def _onednn_ops() -> OneDNNOps | None:
    """oneDNN's packed-weight linear ops, or None where this PyTorch build lacks them."""
    if os.environ.get("CHARLM_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    ops = torch.ops.mkldnn
    try:
        linear, reorder = ops._linear_pointwise.default, ops._reorder_linear_weight.default
        w = torch.arange(6.0).view(3, 2)  # a tiny check that the ops run and agree with a matmul
        x = torch.ones(2, 2)
        if not torch.equal(linear(x, reorder(w, 2), None, "none", [], ""), x @ w.t()):
            return None
    except (AttributeError, RuntimeError):
        return None
    return linear, reorder


_ONEDNN = _onednn_ops()
_enabled = Switch()


def onednn_in_use() -> bool:
    """Whether the products here go through oneDNN's packed-weight ops (this build has them, not turned off)."""
    return _ONEDNN is not None


def _onednn_eligible(x: Tensor, w: Tensor) -> bool:
    """oneDNN is there and on, and the operands are float32 CPU tensors outside autocast and compile."""
    return (
        _ONEDNN is not None
        and _enabled
        and x.dtype == w.dtype == torch.float32
        and x.device.type == w.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def onednn_off() -> AbstractContextManager[None]:
    """Inside the block every product here is PyTorch's own (for side-by-side measurements)."""
    return _enabled.off()


# Packing a weight costs more than one small product, so oneDNN is used only where the packing pays for
# itself: for 16 or more products against one weight (a kernel's steps), or for one product of 2048 or
# more rows (a projection of every step); not for sampling's one row at a time. The timings behind the
# two thresholds: benchmarks/results/onednn-notes.md.
MIN_CALLS, MIN_ROWS = 16, 2048


class StepProduct:
    """``x @ W^T`` for ``calls`` inputs x of ``rows`` rows against one weight W (N, K), packed once."""

    def __init__(self, weight: Tensor, rows: int, calls: int) -> None:
        self.packed: Tensor | None = None
        self.wt = weight.t()
        if (calls >= MIN_CALLS or rows >= MIN_ROWS) and _onednn_eligible(weight, weight):
            self.packed = _ONEDNN[1](weight.contiguous(), rows)  # type: ignore[index]

    def __call__(self, x: Tensor) -> Tensor:
        """x (rows, K) @ W^T, a new (rows, N) tensor."""
        if self.packed is None:
            return x @ self.wt
        return _ONEDNN[0](x, self.packed, None, "none", [], "")  # type: ignore[index]

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """out (rows, N) += x (rows, K) @ W^T, in place; returns out."""
        if self.packed is None:
            return out.addmm_(x, self.wt)
        return out.add_(self(x))

    def write(self, out: Tensor, x: Tensor) -> Tensor:
        """out (rows, N) = x (rows, K) @ W^T; returns out."""
        if self.packed is None:
            return torch.mm(x, self.wt, out=out)
        return out.copy_(self(x))


def project_rows(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x (N, in) @ W^T + b -> (N, out): the input projection of every step at once."""
    if x.shape[0] >= MIN_ROWS and _onednn_eligible(x, w):
        linear, reorder = _ONEDNN  # type: ignore[misc]
        return linear(x, reorder(w, x.shape[0]), b, "none", [], "")
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def project_rows_backward(
    dy: Tensor, x: Tensor, w: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`project_rows` from dy (N, out): dx = dy W (oneDNN where it can), dW = dy^T x,
    db = the column sums of dy; None where ``needs`` (x, W, b) says not wanted."""
    # (dW stays with PyTorch's matmul: oneDNN would want both operands transposed first, which costs more)
    dx = dw = db = None
    if needs[0]:
        dx = StepProduct(w.t(), dy.shape[0], 1)(dy)
    if needs[1]:
        dw = dy.t() @ x
    if needs[2]:
        db = dy.sum(0)
    return dx, dw, db


class _ProjectRows(torch.autograd.Function):
    """:func:`project_rows` for (..., in) inputs, with its hand-written backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        return project_rows(x2, w, b).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, db = project_rows_backward(dy.reshape(-1, dy.shape[-1]), x2, w, (needs[0], needs[1], needs[2]))
        return dx.view(ctx.x_shape) if dx is not None else None, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for the input projections: through oneDNN for float32 on the CPU (outside autocast
    and torch.compile), else ``F.linear`` itself."""
    if x.numel() >= MIN_ROWS * x.shape[-1] and _onednn_eligible(x, weight):
        return _ProjectRows.apply(x, weight, bias)
    return F.linear(x, weight, bias)
