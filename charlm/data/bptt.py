"""Variable-length truncated-BPTT window schedule (Merity et al. 2017, arXiv:1708.02182, section 4.1).

The training split is laid out as ``B`` parallel streams of ``n`` columns (see :mod:`charlm.data.streams`).
A window starting at column ``start`` with length ``seq_len`` reads inputs ``[start, start + seq_len)``
and targets ``[start + 1, start + seq_len + 1)``, so the windows of one epoch tile the ``n - 1``
input positions ``[0, n - 1)`` exactly once, in order.

Variable mode (AWD-LSTM): each window draws a base length ``T = bptt`` with probability 0.95, else
``bptt / 2``, then ``seq_len = max(5, round(N(T, 5)))``. The number of windows is fixed by the stream
length (:func:`variable_window_count`, about ``n / (0.975 bptt)``) so every epoch has the same number
of batches, and the drawn lengths are stretched or shrunk by a common factor (above the minimum of 5)
so that they tile the stream exactly. The draws come from a private ``torch.Generator`` seeded from ``(seed, epoch)``
only, so every DDP rank cuts identical windows and the global RNG is left alone.

Scale: the loss of a window is a mean over its ``seq_len`` positions, so short and long windows
would otherwise move the weights equally. AWD-LSTM multiplies the learning rate by ``seq_len / bptt``
for that one step, and so does training here (``CharLMModule.on_train_batch_start``). With Adam/AdamW
the effect is much weaker, since their steps are normalised by the running gradient scale.
"""

from __future__ import annotations

import hashlib
import math

import torch

__all__ = ["MIN_SEQ_LEN", "P_FULL", "SEQ_LEN_STD", "variable_window_count", "window_schedule"]

P_FULL = 0.95
"""Probability of the full base length ``bptt`` (else ``bptt / 2``) (Merity et al. 2017)."""
SEQ_LEN_STD = 5.0
"""Standard deviation of the sampled window length (Merity et al. 2017)."""
MIN_SEQ_LEN = 5
"""Shortest window (unless the whole stream is shorter) (Merity et al. 2017)."""


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A private CPU generator keyed on (seed, epoch) for the AWD-LSTM window draws (Merity et al. 2017).

    torch's CPU generator keeps only the low 32 bits of a seed, so the pair is hashed into 32 bits
    rather than packed (packing would make seeds that differ in the high bits collide).
    """
    key = hashlib.blake2b(f"charlm-bptt:{int(seed)}:{int(epoch)}".encode(), digest_size=4).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(key, "little"))


def window_schedule(
    n_inputs: int,
    bptt: int,
    *,
    variable: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[tuple[int, int]]:
    """The (start, seq_len) windows of one epoch over ``n_inputs`` input positions (Merity et al. 2017).

    ``n_inputs`` is the number of input positions, i.e. stream columns minus one (the last column
    is only ever a target). Windows are contiguous, in order, and cover ``[0, n_inputs)`` exactly
    once. ``variable=False`` gives windows of exactly ``bptt`` (the last one shorter) and ignores
    seed and epoch. ``variable=True`` draws AWD-LSTM lengths from a private generator keyed on
    ``(seed, epoch)``: the same pair always gives the same list, on every process.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    if n_inputs < 0:
        raise ValueError(f"n_inputs must be >= 0, got {n_inputs}")
    windows: list[tuple[int, int]] = []
    if not variable:
        for start in range(0, n_inputs, bptt):
            windows.append((start, min(bptt, n_inputs - start)))
        return windows

    count = variable_window_count(n_inputs, bptt)
    if count == 0:
        return []
    gen = _generator(seed, epoch)
    uniforms = torch.rand(count, generator=gen, dtype=torch.float64)
    normals = torch.randn(count, generator=gen, dtype=torch.float64)
    base = torch.where(uniforms < P_FULL, float(bptt), bptt / 2)
    drawn = torch.clamp(torch.round(base + SEQ_LEN_STD * normals), min=MIN_SEQ_LEN)  # AWD-LSTM lengths
    # Fit the draws to the stream: every window keeps its floor, the length above it is rescaled so the
    # windows end exactly at the stream's end (cumulative rounding keeps the sum exact).
    floor = min(MIN_SEQ_LEN, n_inputs // count)
    extra = drawn - floor
    total_extra = n_inputs - floor * count
    weights = extra / extra.sum() if float(extra.sum()) > 0 else torch.full_like(extra, 1.0 / count)
    ends = [floor * (k + 1) + math.floor(total_extra * c + 1e-9) for k, c in
            enumerate(torch.cumsum(weights, 0).tolist())]
    ends[-1] = n_inputs
    starts = [0, *ends[:-1]]
    return [(start, end - start) for start, end in zip(starts, ends, strict=True)]


def variable_window_count(n_inputs: int, bptt: int) -> int:
    """Windows per epoch in variable mode: fixed by (n_inputs, bptt), the same in every epoch.

    Lightning sizes an epoch once, from the first epoch's loader, so a count that changed from epoch
    to epoch would drop or cut short windows; the lengths vary, their number does not.
    """
    if n_inputs <= 0:
        return 0
    mean_length = max(float(MIN_SEQ_LEN), (P_FULL + (1.0 - P_FULL) / 2) * bptt)
    return max(1, min(round(n_inputs / mean_length), n_inputs // MIN_SEQ_LEN or 1))
