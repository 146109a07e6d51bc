"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, "Dynamic Evaluation of Neural Sequence
Models"): the weights adapt to the text as it is read, and every character is still scored before it is
seen.

The text is read as one stream, in segments of ``bptt`` characters, the hidden state carried across
them. For each segment, in this order:

1. score it with the current weights: the NLL of each of its characters counts;
2. one gradient step on the same segment's mean NLL, RMS-normalised, with decay toward the trained
   weights θ_g (the paper's "RMS with a global prior", its eq. 8-9)::

       θ <- θ - lr * ∇ / (RMS + eps) + decay * (RMS / mean(RMS)) * (θ_g - θ)

   where RMS is the root mean squared gradient of each weight, collected once on ``rms_windows`` windows
   of the training split with the trained weights (:func:`gradient_rms`), mean(RMS) its mean over every
   weight, and the decay rate per weight is capped at 1 (a weight never moves past θ_g); both terms are
   taken from the weights before the step (:func:`dynamic_update`);
3. carry the state into the next segment.

So the score of the character at position p depends only on the characters before p: the weights it is
scored with were adapted on earlier segments, and the state comes from its own prefix.

One stream only: the streams of ``charlm eval`` are consecutive pieces of the text read side by side,
so with one set of weights shared by all of them, a step on stream 1's segment (text from later in the
file) would change the weights that score stream 0's next segment (text from earlier): a score would
depend on text after it. Reading the text in order, as one stream, is the layout in which every score
stays a prediction; ``charlm eval --dynamic`` therefore refuses ``--batch-size`` above 1.
The model runs in eval mode (no dropout, no weight drop) with gradients on; the weights are put back as
they were when it ends.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from charlm.data.streams import Batch, StreamLayout, WindowSampler
from charlm.data.vocab import Vocab
from charlm.evaluation.metrics import summarize
from charlm.evaluation.scoring import char_nlls, score_batch
from charlm.model.char_lm import CharLM, States, detach_states
from charlm.util.atomic import atomic_file
from charlm.util.errors import CharlmError


@dataclass(frozen=True)
class DynamicSettings:
    """The update's settings: learning rate, decay toward the trained weights, segment length, the RMS
    statistics' windows of training text and the epsilon under the RMS. (``charlm eval``'s defaults for the
    first three are its options'.)"""

    lr: float
    decay: float
    bptt: int
    rms_windows: int = 20
    eps: float = 1e-5

    def check(self) -> None:
        if not self.lr > 0:
            raise CharlmError(f"--dynamic-lr must be positive, got {self.lr}")
        if not 0 <= self.decay <= 1:
            raise CharlmError(f"--dynamic-decay must be between 0 and 1, got {self.decay}")
        if self.bptt < 1:
            raise CharlmError(f"--dynamic-bptt must be at least 1, got {self.bptt}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(ids: Tensor, batch_size: int, bptt: int) -> Iterator[Batch]:
    layout = StreamLayout(ids, max(1, min(batch_size, ids.numel() - 1)), keep_tail=True)
    for window in WindowSampler(layout, bptt):
        yield layout.batch(window)


def gradient_rms(model: CharLM, train_ids: Tensor, *, batch_size: int, bptt: int, windows: int) -> list[Tensor]:
    """Root mean squared gradient of each weight (the mean NLL of a window) over the first ``windows``
    windows of ``train_ids``, read as in training (``batch_size`` streams, the state carried), without
    changing the weights."""
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    states: States | None = None
    seen = 0
    for batch in _windows(train_ids, batch_size, bptt) if train_ids.numel() >= 2 else ():
        if seen == windows or batch.tail:
            break
        model.zero_grad(set_to_none=True)
        nll, states = score_batch(model, batch, states)
        (nll / batch.y.numel()).backward()
        states = detach_states(states)
        for total, p in zip(sums, params, strict=True):
            if p.grad is not None:
                total.add_(p.grad.square())
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen == 0:
        raise CharlmError("dynamic evaluation needs training text for its gradient statistics, and the training "
                          "split is too short for one window")
    return [(total / seen).sqrt() for total in sums]


@contextmanager
def _weights_restored(model: CharLM) -> Iterator[list[Tensor]]:
    """The trained weights θ_g (copies); the model gets them back, and its mode, when the block ends."""
    saved = [p.detach().clone() for p in model.parameters()]
    was_training = model.training
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, theta in zip(model.parameters(), saved, strict=True):
                p.copy_(theta)
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def dynamic_char_nlls(model: CharLM, ids: Tensor, train_ids: Tensor, settings: DynamicSettings, *,
                      train_batch_size: int, train_bptt: int) -> Tensor:
    """The NLL (nats, float64) of every character of ``ids`` but the first, in text order (entry ``p - 1``
    is position ``p``), under dynamic evaluation (see the module docstring)."""
    settings.check()
    model.eval()
    nll = torch.empty(ids.numel() - 1, dtype=torch.float64)
    with _weights_restored(model) as theta_g, torch.enable_grad():
        params = list(model.parameters())
        rms = gradient_rms(model, train_ids, batch_size=train_batch_size, bptt=train_bptt,
                           windows=settings.rms_windows)
        mean_rms = torch.cat([r.flatten() for r in rms]).mean()
        decay_rates = [(settings.decay * r / mean_rms).clamp_(max=1.0) for r in rms]
        scales = [1.0 / (r + settings.eps) for r in rms]
        states: States | None = None
        done = 0
        for batch in _windows(ids, 1, settings.bptt):  # one stream: no tail
            model.zero_grad(set_to_none=True)
            per_char, states = score_batch(model, batch, states, reduction="none")
            nll[done : done + per_char.numel()] = per_char.detach().double()  # scored before the step
            done += per_char.numel()
            per_char.mean().backward()
            states = detach_states(states)
            dynamic_update(params, theta_g, decay_rates, scales, settings.lr)
    return nll


@torch.no_grad()
def dynamic_update(params: list[Tensor], theta_g: list[Tensor], decay_rates: list[Tensor], scales: list[Tensor],
                   lr: float) -> None:
    """One step of the update, in place: ``θ <- θ - lr * ∇ * scale + rate * (θ_g - θ)``, both terms taken
    from the weights before the step (``scale`` = 1 / (RMS + eps)); a weight without a gradient only decays.

    The pull toward θ_g is computed first: applied after the gradient step it would pull back part of that
    step too, ``θ + rate (θ_g - θ) - (1 - rate) lr ∇ scale``, so a weight whose rate is capped at 1 would
    never adapt."""
    for p, theta, rate, scale in zip(params, theta_g, decay_rates, scales, strict=True):
        pull = rate * (theta - p)
        if p.grad is not None:
            p.addcmul_(p.grad, scale, value=-lr)
        p.add_(pull)


def summarize_chars(nll: Tensor, seconds: float) -> dict[str, Any]:
    """Per-character NLLs as ``evaluate_ids`` reports a text: loss, bpc, perplexity, chars, seconds, chars/s."""
    return {**summarize(float(nll.sum()), nll.numel()), "seconds": seconds,
            "chars_per_s": nll.numel() / max(seconds, 1e-9)}


def evaluate_dynamic(model: CharLM, ids: Tensor, train_ids: Tensor, settings: DynamicSettings, *,
                     train_batch_size: int, train_bptt: int) -> tuple[dict[str, Any], Tensor]:
    """:func:`dynamic_char_nlls` summarised (:func:`summarize_chars`), and the per-character NLLs."""
    start = time.perf_counter()
    nll = dynamic_char_nlls(model, ids, train_ids, settings, train_batch_size=train_batch_size,
                            train_bptt=train_bptt)
    return summarize_chars(nll, time.perf_counter() - start), nll


def evaluate_static(model: CharLM, ids: Tensor, *, batch_size: int, bptt: int) -> tuple[dict[str, Any], Tensor]:
    """:func:`charlm.evaluation.scoring.char_nlls` summarised (the figures of ``evaluate_ids``), and the NLLs."""
    start = time.perf_counter()
    nll = char_nlls(model, ids, batch_size=batch_size, bptt=bptt)
    return summarize_chars(nll, time.perf_counter() - start), nll


def escape_char(ch: str) -> str:
    """One character as printable ASCII: ``\\n``, ``\\t``, ``\\\\``, ``\\xe9``; other ASCII as itself."""
    return ch.encode("unicode_escape").decode("ascii")


def write_char_nlls(path: str | Path, ids: Tensor, vocab: Vocab, nll: Tensor) -> None:
    """CSV ``position,char,nll``: each scored character (position = its index in the text, from 1; the
    first character has no prediction), escaped, and its NLL in nats. Written atomically."""
    chars = vocab.decode(ids)
    with atomic_file(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["position", "char", "nll"])
        for p, value in enumerate(nll.tolist(), start=1):
            writer.writerow([p, escape_char(chars[p]), f"{value:.9g}"])
