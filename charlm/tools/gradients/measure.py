"""How far back the gradient reaches: the norm of d loss_T / d h_{T-k} for k = 0 .. K, per layer.

For each sequence of ``warmup + K + 2`` characters: the first ``warmup`` are read without gradients (so
the measured window starts from a typical state, not from zero); then K + 1 characters are read one step
at a time through each layer's own cell arithmetic (:meth:`charlm.model.recurrent_layer.RecurrentLayer.steps`), keeping
every step's hidden state h_t in the graph; the loss is the cross-entropy of the last character given the
state after the K + 1 read (step T). One ``torch.autograd.grad`` call then gives d loss_T / d h_t of every
step and layer at once (not K backward passes). The sequences run side by side as one batch; in eval mode
they are independent, so row n of each gradient is sequence n's own.

The gradient is the total derivative through h_t: every path from h_t to loss_T (the next step's h and,
for the LSTM family, c; the layer above). It is measured with respect to h only (for an LSTM, c_t is held
fixed), in eval mode (no dropout).

Clipping (``clip`` > 0): at every step, the gradient flowing back into h_t is norm-clipped per sequence to
at most ``clip`` before it goes on to earlier steps (a hook on h_t). The norm reported for h_t is the
gradient arriving there (from every later step, each clipped in turn), before h_t's own clipping. This is
per-step clipping of the backward through the hidden state; it is not the global gradient-norm clipping
of training (``optim.clip``), which rescales the summed weight gradient once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from charlm.model.char_lm import CharLM
from charlm.util.errors import CharlmError

RECURRENT_INITS = ("default", "orthogonal", "identity", "xavier")


def reinit_recurrent(model: CharLM, init: str) -> None:
    """Re-initialise every H x H block of every layer's ``weight_hh``: ``orthogonal``, ``identity`` or
    ``xavier`` (uniform); ``default`` keeps the cell's own initialisation (orthogonal; identity for irnn)."""
    if init not in RECURRENT_INITS:
        raise CharlmError(f"unknown --init '{init}'; valid: {', '.join(RECURRENT_INITS)}")
    if init == "default":
        return
    for layer in model.layers:
        if "weight_hh_l0" not in layer._parameters:
            raise CharlmError(f"--init {init} re-initialises the hidden-to-hidden matrix, which {layer.cell_name} does "
                              "not have (its gates read only the input); measure it with --init default")
    with torch.no_grad():
        for layer in model.layers:
            w = layer.weight_hh_l0
            h = w.shape[1]
            for k in range(w.shape[0] // h):
                block = w[k * h : (k + 1) * h]
                if init == "orthogonal":
                    nn.init.orthogonal_(block)
                elif init == "identity":
                    block.copy_(torch.eye(h))
                else:
                    nn.init.xavier_uniform_(block)


def _clipper(clip: float) -> Callable[[Tensor], Tensor]:
    def hook(grad: Tensor) -> Tensor:
        norm = grad.norm(dim=1, keepdim=True)
        return grad * (clip / norm).clamp(max=1.0)

    return hook


def state_gradient_norms(model: CharLM, windows: Tensor, *, warmup: int = 0, clip: float = 0.0) -> Tensor:
    """``windows`` (N, warmup + K + 2) ids -> norms (L, K + 1, N): entry [l, k, n] is |d loss_T / d h_{T-k}|
    of layer l + 1 for sequence n (see the module docstring)."""
    if windows.dim() != 2 or windows.shape[1] < warmup + 2:
        raise CharlmError(f"need windows of at least warmup + 2 = {warmup + 2} characters, got {tuple(windows.shape)}")
    model.eval()
    device = next(model.parameters()).device
    windows = windows.to(device)
    states = None
    if warmup:
        with torch.no_grad():
            states = model(windows[:, :warmup]).states
    x = windows[:, warmup:-1]  # the K + 1 measured steps
    target = windows[:, -1]
    with torch.enable_grad():
        v = model.encoder(x)
        hidden: list[list[Tensor]] = []
        for i, (layer, norm) in enumerate(zip(model.layers, model.norms, strict=True)):
            hs = []
            for state, _ in layer.steps(v, None if states is None else states[i]):
                h = state[0]
                if clip > 0:
                    h.register_hook(_clipper(clip))
                hs.append(h)
            hidden.append(hs)
            v = norm(torch.stack(hs, 1))
        logits = model.decoder(v[:, -1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
        loss = F.cross_entropy(logits, target, reduction="sum")
        flat = [h for hs in hidden for h in hs]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    steps = x.shape[1]
    # in float64: the squares of a float32 gradient below ~1e-19 would underflow to 0 in its own precision
    norms = torch.stack([torch.zeros(x.shape[0], device=device, dtype=torch.float64) if g is None
                         else g.double().norm(dim=1) for g in grads])
    return norms.reshape(len(hidden), steps, -1).flip(1).cpu()  # [l, t] -> [l, k = T - t]


@dataclass(frozen=True)
class LagCurve:
    """The summary over sequences of one layer's gradient norms, per lag k = 0 .. K."""

    source: str  # "init" or the checkpoint path
    cell: str
    init: str
    clip: float
    layer: int
    mean: list[float]
    std: list[float]
    q10: list[float]
    median: list[float]
    q90: list[float]

    @property
    def label(self) -> str:
        what = self.init if self.source == "init" else "trained"
        return f"{self.cell} ({what}{f', clip {self.clip:g}' if self.clip > 0 else ''})"


def summarise(norms: Tensor, *, source: str, cell: str, init: str, clip: float) -> list[LagCurve]:
    """norms (L, K + 1, N) -> one :class:`LagCurve` per layer (mean, std, 10 / 50 / 90 % quantiles over N)."""
    n = norms.double()
    q = torch.quantile(n, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=2)  # (3, L, K + 1)
    std = n.std(dim=2, correction=0)
    return [LagCurve(source, cell, init, clip, li + 1, n[li].mean(1).tolist(), std[li].tolist(), q[0, li].tolist(),
                     q[1, li].tolist(), q[2, li].tolist()) for li in range(n.shape[0])]


def sample_windows(ids: Tensor, count: int, length: int, seed: int) -> Tensor:
    """``count`` windows of ``length`` ids at random starts (seeded) in ``ids``: (count, length)."""
    if ids.numel() < length:
        raise CharlmError(f"the text has {ids.numel():,} characters, fewer than one window needs ({length:,}: "
                          f"--warmup + --max-lag + 2); use a longer text or a smaller --max-lag")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
