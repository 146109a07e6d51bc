"""One generation for the page: each new character with its surprisal and the model's top-5 there.

It is :mod:`charlm.generation`'s own path: the prime read in one forward pass from a zero state
(:func:`charlm.generation.continuation.read_prime`), then :func:`charlm.generation.options.pick` (temperature, top-k,
top-p) and one ``CharLM.step`` per character, so for the same seed and settings the text is exactly what
``charlm sample`` prints. :func:`score_step` adds what the page shows of each character: its surprisal and
the top 5 at its position, as ``charlm viz`` reports them for a given text (``charlm.tools.viz.trace``), but one
character at a time, as it is generated.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from charlm.data.vocab import Vocab
from charlm.generation.continuation import Continuation, read_prime, seeded_generator
from charlm.generation.options import check_options
from charlm.model.char_lm import CharLM

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
    check_options(length, temperature, top_k, seed=seed, top_p=top_p)
    prime_ids = vocab.encode(prime, what="prime")
    model.eval()
    logits, states = read_prime(model, prime_ids)
    chars = vocab.chars
    for nxt, scores in Continuation(model, logits, states, length, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=seeded_generator(seed)):
        if stop is not None and stop.is_set():
            return
        yield score_step(scores[0].cpu(), int(nxt[0]), chars)
