"""Choosing the next character (temperature, then top-k, then top-p), the limits of every sampling option, and
the inputs that arrive as text: stop strings with escapes, a prime from a file."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from charlm.data.corpus import read_utf8
from charlm.util.errors import NOT_FINITE, CharlmError

MAX_LENGTH = 100_000_000  # characters one command generates (several samples or beams: all of them together)
MAX_NUM_SAMPLES = 10_000  # rows stepped side by side
MAX_BEAM = 1_000  # beams stepped side by side (each keeps its --length characters until the end)
MAX_SEED = 2**32 - 1  # torch's CPU generator (mt19937) uses the low 32 bits: 2**32 would repeat seed 0
MAX_PRIME = 100_000  # characters of a prime: read in one forward pass, which holds every position's output


def pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator,
         top_p: float | None = None) -> Tensor:
    """Next ids (N,) from logits (N, V): greedy at temperature 0, else a draw from softmax(logits / T).

    The filters apply in this order: the temperature scales the scores, top-k keeps the k likeliest
    characters (ties at the k-th score are all kept), then top-p (nucleus) keeps the likeliest of those
    whose probabilities, renormalised over the top k, add up to at least ``top_p`` (the likeliest is always
    kept). ``top_p`` None or 1 keeps everything: exactly the draw without it.
    """
    if temperature == 0.0:
        if not bool(torch.isfinite(logits).all()):
            raise CharlmError(NOT_FINITE)
        return logits.argmax(dim=-1)
    return draw(filtered_probs(logits, temperature, top_k, top_p), generator)


def filtered_probs(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """The weights (N, V) :func:`pick` draws from at a temperature above 0: softmax(logits / T) over the top k,
    0 outside the nucleus of mass ``top_p`` (not renormalised: the draw divides by the sum)."""
    # from the top score down: a tiny temperature gives 0 for the best and -inf for the rest (never
    # inf - inf = NaN), a huge one gives a uniform draw; float64 only for a temperature float32 cannot hold
    logits = logits.to(torch.float32 if temperature >= torch.finfo(torch.float32).tiny else torch.float64)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return probs


def draw(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One id per row of ``weights`` (N, V), each drawn with probability proportional to its weight: with one
    u ~ U[0, 1) per row (``torch.rand(N, dtype=float64)``), the first id whose running sum (in float64)
    exceeds u times the row's sum, so a zero weight is never drawn. (The fused C++ step draws the same way
    from the same generator: :mod:`charlm.model.fused_step`.)"""
    if not bool(torch.isfinite(weights).all()):  # NaN / inf scores give NaN probabilities
        raise CharlmError(NOT_FINITE)
    running = weights.double().cumsum(dim=-1)
    u = torch.rand((weights.size(0), 1), dtype=torch.float64, generator=generator)
    return (running <= u * running[:, -1:]).sum(dim=-1).clamp_(max=weights.size(-1) - 1)


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` (N, V) with 0 for every character outside the smallest likeliest set of mass >= top_p."""
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the likelier characters: 0 for the first
    drop = torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)
    return probs.masked_fill(drop, 0.0)  # the draw renormalises what is left


def check_options(length: int, temperature: float, top_k: int | None, num_samples: int = 1,
                  prefix: str = "", seed: int | None = None, *, top_p: float | None = None,
                  beam: int | None = None, stop: Sequence[str] = ()) -> None:
    """One clear error for each sampling option out of range (``prefix="--"`` names the CLI flags)."""
    if length < 0:
        raise CharlmError(f"{prefix}length must be >= 0, got {length}")
    if length > MAX_LENGTH:
        raise CharlmError(f"{prefix}length must be at most {MAX_LENGTH:,}, got {length:,}")
    if not math.isfinite(temperature):
        raise CharlmError(f"{prefix}temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if temperature < 0:
        raise CharlmError(f"{prefix}temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise CharlmError(f"{prefix}top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise CharlmError(f"{prefix}top-p must be a number above 0 and at most 1 (1 keeps every character), "
                          f"got {top_p}")
    if num_samples < 1:
        raise CharlmError(f"{prefix}num-samples must be at least 1, got {num_samples}")
    if num_samples > MAX_NUM_SAMPLES:
        raise CharlmError(f"{prefix}num-samples must be at most {MAX_NUM_SAMPLES:,}, got {num_samples:,}")
    if beam is not None:
        _check_beam(beam, length, num_samples, prefix)
    elif num_samples > 1 and num_samples * length > MAX_LENGTH:
        raise CharlmError(f"{prefix}num-samples x {prefix}length must be at most {MAX_LENGTH:,} characters "
                          f"(several samples are kept in memory until all are done), got {num_samples:,} x "
                          f"{length:,}; ask for fewer or shorter samples, or stream one long sample")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise CharlmError(f"{prefix}seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed}")
    for s in stop:
        if not s:
            raise CharlmError(f"{prefix}stop must not be empty (an empty stop string would end every sample "
                              "before its first character)")


def _check_beam(beam: int, length: int, num_samples: int, prefix: str) -> None:
    if beam < 1:
        raise CharlmError(f"{prefix}beam must be at least 1, got {beam}")
    if beam > MAX_BEAM:
        raise CharlmError(f"{prefix}beam must be at most {MAX_BEAM:,}, got {beam:,}")
    if num_samples > beam:
        raise CharlmError(f"{prefix}num-samples must be at most {prefix}beam: beam search keeps {beam} "
                          f"candidate(s), so it cannot return {num_samples}; ask for fewer samples or more beams")
    if beam * length > MAX_LENGTH:
        raise CharlmError(f"{prefix}beam x {prefix}length must be at most {MAX_LENGTH:,} characters (every beam "
                          f"is kept in memory until the search ends), got {beam:,} x {length:,}")


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.?)", re.DOTALL)
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r", "0": "\0", "'": "'", '"': '"',
                   "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def decode_escapes(text: str, what: str = "text") -> str:
    """``text`` with Python's backslash escapes (``\\n``, ``\\t``, ``\\\\``, ``\\xHH``, ``\\uHHHH``,
    ``\\UHHHHHHHH``) turned into their characters; every other character, non-ASCII included, is kept."""

    def one(match: re.Match[str]) -> str:
        body = match.group(1)
        if body in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[body]
        if len(body) > 1:
            code = int(body[1:], 16)
            if code > 0x10FFFF:
                raise CharlmError(f"{what} '{text}' has the escape \\{body}, beyond the last Unicode character "
                                  "(\\U0010ffff)")
            return chr(code)
        shown = f"\\{body}" if body else "a lone \\ at the end"
        raise CharlmError(f"{what} '{text}' has an unknown escape ({shown}); known: \\n \\t \\r "
                          "\\0 \\\\ \\' \\\" \\a \\b \\f \\v \\xHH \\uHHHH \\UHHHHHHHH (write a backslash as \\\\)")

    return _ESCAPE.sub(one, text)


def read_prime_file(path: str | Path, option: str = "--prime-file") -> str:
    """The whole text of a UTF-8 file (a final newline included), or one sentence saying why it cannot be: not
    a regular file (``/dev/zero`` would never end), or more than :data:`MAX_PRIME` characters (no more is read)."""
    return read_utf8(Path(path), option, "; the prime needs at least one character", max_chars=MAX_PRIME)[0]


def check_prime(text: str, option: str = "--prime") -> None:
    """Refuse a prime longer than :data:`MAX_PRIME` characters in one sentence."""
    if len(text) > MAX_PRIME:
        raise CharlmError(f"{option} is longer than {MAX_PRIME:,} characters ({len(text):,}); give a shorter text")
