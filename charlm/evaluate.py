"""Scoring a text exactly: every character once, the hidden state carried across windows."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.metrics import summarize
from charlm.model import CharLM, States
from charlm.streams import Batch, StreamLayout, WindowSampler


def score_batch(model: CharLM, batch: Batch, states: States | None) -> tuple[Tensor, States]:
    """Summed NLL (nats) of one window and the states to carry; a tail window continues the last row."""
    if batch.tail and states is not None:
        states = [tuple(t[:, -1:] for t in s) for s in states]
    out = model(batch.x, states)
    logits = out.logits.reshape(-1, out.logits.size(-1)).float()
    return F.cross_entropy(logits, batch.y.reshape(-1), reduction="sum"), out.states


@torch.no_grad()
def evaluate_ids(model: CharLM, ids: Tensor, *, batch_size: int = 16, bptt: int = 256,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """Loss, bits per char and perplexity of ``ids`` under ``model``, plus characters per second."""
    model.eval()
    batch_size = max(1, min(batch_size, ids.numel() - 1))
    layout = StreamLayout(ids, batch_size, keep_tail=True)
    states: States | None = None
    nll_sum, chars = 0.0, 0
    start = time.perf_counter()
    for window in WindowSampler(layout, bptt):
        batch = layout.batch(window)
        batch = Batch(batch.x.to(device), batch.y.to(device), batch.tail)
        nll, states = score_batch(model, batch, states)
        nll_sum += float(nll)
        chars += batch.y.numel()
    seconds = time.perf_counter() - start
    return {**summarize(nll_sum, chars), "seconds": seconds, "chars_per_s": chars / max(seconds, 1e-9)}
