"""The helpers of the cell tests that write each cell's equations out by hand (``test_cells_variants.py``,
``test_cells_normalised.py``): float64 layers with every parameter moved off its initial value, inputs, and the
logistic and tanh written from their definitions, so that no expected value comes from the library's code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from charlm.model.recurrent_layer import RecurrentLayer
from charlm.native import build

B, T, IN, H = 2, 4, 3, 2
TOL = 1e-10  # float64 throughout


def sig(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def tanh(v: Tensor) -> Tensor:
    return (torch.exp(v) - torch.exp(-v)) / (torch.exp(v) + torch.exp(-v))


# lstm-ln / lstm-bn have two hand-written kernels: C++ (where it builds, see test_norm_lstm_cpp.py) and Python
KERNELS = ("c++", "python", "autograd")


@contextmanager
def use_kernel(layer: RecurrentLayer, kernel: str) -> Iterator[None]:
    """Inside the block the layer runs the given path: a hand-written kernel ("kernel": the cell's,
    "c++" / "python": the normalised LSTMs') or autograd through the step."""
    layer.cell.kernel_on = kernel != "autograd"
    with build.cpp_off() if kernel == "python" else nullcontext():
        yield


def make(cell: str, **kw: object) -> RecurrentLayer:
    """A float64 layer with every parameter (peepholes, gains, ...) moved to a random non-trivial value."""
    torch.manual_seed(sum(map(ord, cell)))
    layer = RecurrentLayer(cell, IN, H, torch_rnn=False, **kw).double()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return layer


def rand_inputs(layer: RecurrentLayer, steps: int = T) -> tuple[Tensor, tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, steps, IN, generator=g, dtype=torch.float64)
    state = tuple(torch.rand(1, B, s, generator=g, dtype=torch.float64) - 0.3 for s in layer.cell.state_sizes())
    return x, state


def blocks(v: Tensor, n: int) -> list[Tensor]:
    return list(v.reshape(n, H, *v.shape[1:]).unbind(0))


def affine(w: Tensor, v: Tensor) -> Tensor:
    return v @ w.t()


def check(layer: RecurrentLayer, expected: Tensor, x: Tensor, state: tuple[Tensor, ...]) -> None:
    out, _ = layer(x, state)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
