"""minGRU and minLSTM (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?",
arXiv 2410.01201): the GRU and the LSTM with the hidden state taken out of their gates.

Every gate and the candidate depend on the input alone, so a layer's recurrence is the linear one
h_t = a_t h_{t-1} + b_t, with a_t and b_t known for the whole window after one input projection. Training
runs it as a parallel scan over the window in log space, as the paper's appendix does: log h_t =
log A_t + logcumsumexp(log b - log A)_t with log A_t = cumsum(log a)_t, numerically stable because every
term stays a logarithm (no product of a hundred gates underflows, no quotient overflows), in chunks of 8
steps that bound float32 rounding (:func:`log_space_scan`). For the log of b_t to exist the candidate must
be positive: the paper's g (x + 1/2 for x >= 0, sigmoid(x) below) makes it so, in the parallel and the
sequential form alike. Sampling steps sequentially (:meth:`Cell.step`), the same function.

The carried state enters the scan linearly, h_t = A_t h_0 + (the scan from zero), rather than as log h_0 as
in the paper's code: the same value, exact for any h_0 (a fresh state's zeros included, whose logarithm
is -inf), so the state carried from one window to the next is the one the sequential steps reach.

Parameters: ``weight_ih`` [G H, in] and ``bias_ih`` [G H] only (G = 2: z, g; G = 3: f, i, g); there is
no ``weight_hh``, so weight drop (``model.weight_drop``) acts on ``weight_ih``
(:attr:`charlm.cells.base.Cell.dropped_weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells.base import Cell, CellState, Gates, Params
from charlm.cells.onednn_matmul import linear


def g(x: Tensor) -> Tensor:
    """The paper's positive activation of the candidate: x + 1/2 for x >= 0, sigmoid(x) below (continuous)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g: log(x + 1/2) for x >= 0, log sigmoid(x) = -softplus(-x) below."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


SCAN_CHUNK = 8  # steps per log-space scan; the chunks follow one another, each from the last one's end


def log_space_scan(log_a: Tensor, log_b: Tensor, h0: Tensor, chunk: int = SCAN_CHUNK) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for every t of dim 0, from ``h0``, given log a (a in (0, 1]) and log b (b > 0):

        h_t = A_t h0 + A_t sum_{k <= t} b_k / A_k,   A_t = a_1 ... a_t,

    with the sum taken as exp(log A_t + logcumsumexp(log b - log A)_t). ``log_a``, ``log_b``: (T, B, H);
    ``h0``: (B, H); returns every h_t, (T, B, H).

    The window is scanned in chunks of ``chunk`` steps, each starting from the previous chunk's last h.
    In float32, log A_t + logcumsumexp(...) is the difference of two terms of size |log A_t|, which grows
    with every step (by |log a|), and so does its rounding: over a whole window it outgrows the sequential
    step's own; restarting A every 8 steps keeps it at that size, for a loop of T / 8 iterations
    (``tests/test_cells_2024.py`` holds both forms to 1e-5 of h over a 128-step window).
    """
    outs: list[Tensor] = []
    h = h0
    for la, lb in zip(log_a.split(chunk), log_b.split(chunk), strict=True):
        log_cum_a = torch.cumsum(la, dim=0)
        from_zero = torch.exp(log_cum_a + torch.logcumsumexp(lb - log_cum_a, dim=0))
        outs.append(torch.addcmul(from_zero, torch.exp(log_cum_a), h))
        h = outs[-1][-1]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _scan_dtype(xw: Tensor) -> torch.dtype:
    """float32 at least: under autocast the projection comes in half precision, too coarse for the scan's sums."""
    return torch.promote_types(xw.dtype, torch.float32)


class MinGRUCell(Cell):
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU whose gate and candidate see only x,

        z = s(W_z x + b_z),   h' = (1 - z) * h + z * g(W_h x + b_h),   g(v) = v + 1/2 (v >= 0), s(v) (v < 0)

    ``weight_ih`` blocks (z, h), ``bias_ih`` the same; no hidden-to-hidden weights. Training: the log-space
    parallel scan (module docstring) with log(1 - z) = -softplus(a_z), log z = -softplus(-a_z); the forget
    bias (``model.forget_bias``) starts b_z at minus its value (a larger 1 - z keeps more of h). Gates
    reported: z and the candidate g.
    """

    gate_names = ("z", "g")
    dropped_weight = "weight_ih"
    blocks = 2

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight_ih": (self.blocks * self.hidden_size, self.input_size),
                "bias_ih": (self.blocks * self.hidden_size,)}

    def forget_block(self) -> tuple[int, float] | None:
        return (0, -1.0)

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        return linear(x, q["weight_ih"], q["bias_ih"])

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        hs, h = self.hidden_size, state[0]
        a_z, candidate = xw[:, :hs], g(xw[:, hs:])
        z = torch.sigmoid(a_z)
        # 1 - z as s(-a_z), and a sum of two positive terms: no cancellation where h is small
        return (torch.addcmul(torch.sigmoid(-a_z) * h, z, candidate),), {"z": z, "g": candidate}

    def scan_terms(self, xw: Tensor) -> tuple[Tensor, Tensor]:
        """log a_t = log(1 - z_t) and log b_t = log z_t + log g_t of every step, (T, B, H) each."""
        hs = self.hidden_size
        a_z = xw[..., :hs]
        return -F.softplus(a_z), log_g(xw[..., hs:]) - F.softplus(-a_z)

    def sequence(self, xw: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """Every step of ``xw`` (T, B, K) at once: the log-space parallel scan."""
        dtype = _scan_dtype(xw)
        log_a, log_b = self.scan_terms(xw.to(dtype))
        hs = log_space_scan(log_a, log_b, state[0].to(dtype)).to(xw.dtype)
        return hs, (hs[-1],)


class MinLSTMCell(MinGRUCell):
    """minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): an LSTM whose gates see only x, its forget and
    input gates normalised to sum to 1 (so the state needs no separate cell c and stays on the scale of g),

        f = s(W_f x + b_f),  i = s(W_i x + b_i),  f' = f / (f + i),  i' = i / (f + i),
        h' = f' * h + i' * g(W_h x + b_h)

    ``weight_ih`` blocks (f, i, h); no hidden-to-hidden weights. Training: the log-space parallel scan with
    d = softplus(-a_f) - softplus(-a_i), log f' = -softplus(d), log i' = -softplus(-d) (the paper's appendix).
    The forget bias starts b_f. Gates reported: the normalised f' and i', and the candidate g.
    """

    gate_names = ("f", "i", "g")
    blocks = 3

    def forget_block(self) -> tuple[int, float] | None:
        return (0, 1.0)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        hs, h = self.hidden_size, state[0]
        f, i = torch.sigmoid(xw[:, :hs]), torch.sigmoid(xw[:, hs : 2 * hs])
        total = f + i
        f, i, candidate = f / total, i / total, g(xw[:, 2 * hs :])
        return (f * h + i * candidate,), {"f": f, "i": i, "g": candidate}

    def scan_terms(self, xw: Tensor) -> tuple[Tensor, Tensor]:
        hs = self.hidden_size
        d = F.softplus(-xw[..., :hs]) - F.softplus(-xw[..., hs : 2 * hs])
        return -F.softplus(d), log_g(xw[..., 2 * hs :]) - F.softplus(-d)
