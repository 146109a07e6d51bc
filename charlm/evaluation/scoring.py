"""Scoring a text exactly: every character once, the hidden state carried across windows; and nanoGPT's way,
random blocks each read from a zero state (:func:`evaluate_blocks`), for figures comparable with its."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.data.datamodule import eval_streams
from charlm.data.streams import Batch, StreamLayout, WindowSampler
from charlm.evaluation.metrics import summarize
from charlm.model.char_lm import CharLM, States


def score_batch(model: CharLM, batch: Batch, states: States | None, reduction: str = "sum") -> tuple[Tensor, States]:
    """Summed NLL (nats) of one window and the states to carry; a tail window continues the last row.
    ``reduction="none"``: the NLL of every character instead, (B T,) row by row."""
    if batch.tail and states is not None:
        states = [tuple(t[:, -1:] for t in s) for s in states]
    out = model(batch.x, states)
    logits = out.logits.reshape(-1, out.logits.size(-1)).float()
    return F.cross_entropy(logits, batch.y.reshape(-1), reduction=reduction), out.states


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


@torch.no_grad()
def char_nlls(model: CharLM, ids: Tensor, *, batch_size: int = 16, bptt: int = 256,
              device: torch.device | str = "cpu") -> Tensor:
    """The NLL (nats, float64) of every character of ``ids`` but the first, in text order (entry ``p - 1`` is
    the character at position ``p``), scored exactly as :func:`evaluate_ids` scores them: the same streams,
    windows and carried state, so their sum is its summed NLL."""
    model.eval()
    batch_size = max(1, min(batch_size, ids.numel() - 1))
    layout = StreamLayout(ids, batch_size, keep_tail=True)
    nll = torch.empty(ids.numel() - 1, dtype=torch.float64)
    used = layout.row_length * batch_size
    rows = nll[:used].view(batch_size, layout.row_length)  # row r, column j: the target at r L + j + 1
    states: States | None = None
    for window in WindowSampler(layout, bptt):
        batch = layout.batch(window)
        per_char, states = score_batch(model, Batch(batch.x.to(device), batch.y.to(device), batch.tail), states,
                                       reduction="none")
        per_char = per_char.view(batch.y.shape).double().cpu()
        if batch.tail:
            nll[used + window.start : used + window.start + window.length] = per_char[0]
        else:
            rows[:, window.start : window.start + window.length] = per_char
    return nll


@torch.no_grad()
def evaluate_blocks(model: CharLM, ids: Tensor, *, block: int, blocks: int, seed: int, batch_size: int = 64,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """The mean NLL over ``blocks`` random blocks of ``block`` characters, each read from a zero state, as nanoGPT's
    ``estimate_loss`` scores a split: starts drawn uniformly from [0, len(ids) - block) by a generator seeded with
    ``seed``, every position of a block a target (the first predicted from one character, the last from ``block``),
    all positions weighted alike. The same seed draws the same blocks, whatever ``batch_size`` (blocks per forward).
    """
    if block < 1 or blocks < 1:
        raise ValueError(f"block and blocks must be at least 1, got {block} and {blocks}")
    if ids.numel() < block + 1:
        raise ValueError(f"{ids.numel()} characters hold no block of {block} plus its last target")
    model.eval()
    starts = torch.randint(ids.numel() - block, (blocks,), generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(block + 1)
    nll_sum = 0.0
    start = time.perf_counter()
    for chunk in starts.split(batch_size):
        rows = ids[chunk[:, None] + offsets]  # (n, block + 1)
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        logits = model(x).logits.float()
        nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
    seconds = time.perf_counter() - start
    chars = blocks * block
    return {**summarize(nll_sum, chars), "seconds": seconds, "chars_per_s": chars / max(seconds, 1e-9)}


def validation_streams(checkpoint: dict[str, Any], n_ids: int, eval_batch_size: int) -> int:
    """Streams that score ``n_ids`` ids as the run's validation did: ``data.eval_batch_size`` per process
    (fewer for a short split) times the processes it ran on, as recorded in the checkpoint."""
    resume_state = checkpoint.get("resume_state")
    world = resume_state.get("world_size", 1) if isinstance(resume_state, dict) else 1
    world = world if isinstance(world, int) and world >= 1 else 1
    return eval_streams(n_ids, eval_batch_size, world) * world


def nonfinite_parameters(model: CharLM) -> list[str]:
    """Names of the model's weights that hold NaN or inf (a run that diverged and was saved anyway)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def finite_or_null(result: dict[str, Any], why: str) -> dict[str, Any]:
    """``result`` with every non-finite figure as ``None`` (JSON null) and, if there was one, ``reason``."""
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return result
    return {**{k: None if k in bad else v for k, v in result.items()},
            "reason": f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a finite number: {why}"}
