"""One generation for the page: each new character with its surprisal and the model's top-5 there.

Two small adapters live here until the features they stand for land in charlm's own modules:

- :func:`nucleus_filter` (top-p) stands for ``charlm.sampling.pick(..., top_p=...)``;
- :func:`score_step` (surprisal, top-5) stands for the same figures of ``charlm viz``.

Everything else is :mod:`charlm.sampling`'s own path: the prime read through ``CharLM.step`` from a zero
state, then :func:`charlm.sampling.pick` and one step per character, so at temperature 0 (and with the
same seed, without top-p) the text is exactly what ``charlm sample`` prints.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from charlm.errors import CharlmError
from charlm.model import CharLM
from charlm.sampling import check_options, pick
from charlm.vocab import Vocab

TOP = 5  # likeliest characters reported at each position


@dataclass(frozen=True)
class ScoredChar:
    """A generated character, its surprisal in bits (-log2 p at temperature 1, the model's own
    distribution, whatever the sampling settings), and the ``TOP`` likeliest characters at its position
    with their probabilities (also at temperature 1)."""

    char: str
    surprisal: float
    top: list[tuple[str, float]]

    def to_json(self) -> dict[str, object]:
        return {"c": self.char, "s": round(self.surprisal, 4), "top": [[c, round(p, 4)] for c, p in self.top]}


def check_top_p(top_p: float | None, prefix: str = "") -> None:
    """One clear error for a top-p outside (0, 1]."""
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise CharlmError(f"{prefix}top-p must be a number above 0 and at most 1 (1 keeps every character), "
                          f"got {top_p}")


def nucleus_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits (N, V) with every character outside the nucleus set to -inf: the fewest likeliest characters
    whose probabilities add up to at least ``top_p`` (Holtzman et al. 2020); the likeliest always stays.

    To be replaced by charlm.sampling.pick(top_p=...) once it lands."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the likelier characters
    drop_sorted = before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
              generator: torch.Generator) -> Tensor:
    """:func:`charlm.sampling.pick`, with top-p applied to ``softmax(logits / temperature)`` first.

    To be replaced by charlm.sampling.pick(logits, temperature, top_k, generator, top_p=top_p) once it
    lands."""
    if top_p is None or top_p >= 1.0 or temperature == 0.0:
        return pick(logits, temperature, top_k, generator)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.size(-1):
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return pick(nucleus_filter(scaled, top_p), 1.0, None, generator)


def score_step(logits: Tensor, chosen: int, chars: str) -> ScoredChar:
    """The surprisal of ``chosen`` and the top characters under ``softmax(logits)`` (one row, (V,)).

    To be replaced by charlm viz's per-character scores once it lands."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(log_probs, min(TOP, log_probs.numel()))
    top = [(chars[i], math.exp(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
    return ScoredChar(chars[chosen], -float(log_probs[chosen]) / math.log(2.0), top)


@torch.no_grad()
def generate_scored(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop: threading.Event | None = None) -> Iterator[ScoredChar]:
    """Yield ``length`` characters after ``prime``, one at a time, each scored; stops early once ``stop``
    is set (a client that went away)."""
    check_options(length, temperature, top_k, seed=seed)
    check_top_p(top_p)
    prime_ids = vocab.encode(prime, what="prime")
    if prime_ids.numel() == 0:
        raise CharlmError("the prime must have at least one character")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(torch.seed() if seed is None else seed)
    states = None
    logits = torch.empty(0)
    for char_id in prime_ids.tolist():
        logits, states = model.step(torch.tensor([char_id], device=device), states)
    chars = vocab.chars
    for _ in range(length):
        if stop is not None and stop.is_set():
            return
        row = logits.cpu()
        nxt = pick_next(row, temperature, top_k, top_p, generator)
        yield score_step(row[0], int(nxt[0]), chars)
        logits, states = model.step(nxt.to(device), states)
