"""What a page may ask for: the server's limits, and a generation request read from untrusted JSON.

Every way a request can be wrong is one sentence (:class:`BadRequest`), which the page shows as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from charlm.generation.options import MAX_SEED

MAX_BODY_BYTES = 64 * 1024  # a generation request is a few fields; anything longer is refused unread


class BadRequest(Exception):
    """A request the server refuses: ``message`` for the page, ``status`` for HTTP."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class Limits:
    """The bounds on what one request may ask (``charlm serve`` options)."""

    max_prime: int = 1000  # characters of a prime
    max_length: int = 5000  # characters generated per request
    max_generations: int = 2  # generations running at once; one more is answered 503


@dataclass(frozen=True)
class GenerateRequest:
    checkpoint: str
    prime: str
    length: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None


def _number(body: dict[str, Any], key: str, label: str, default: float | None, *, integer: bool) -> float | None:
    """``body[key]`` as a number (a JSON number or a numeric string; empty or null: ``default``)."""
    value = body.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        raise BadRequest(f"{label} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadRequest(f"{label} must be a number, got {value[:40]!r}") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{label} must be a finite number, got {str(value)[:40]}")
    if integer:
        if value != int(value):
            raise BadRequest(f"{label} must be a whole number, got {value}")
        return int(value)
    return float(value)


def parse_generate(body: object, limits: Limits) -> GenerateRequest:
    """Check every field of a generation request against ``limits``; the first problem is raised."""
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object with a prime and the sampling settings")
    prime = body.get("prime")
    if not isinstance(prime, str) or not prime:
        raise BadRequest("type a prime: the text the model continues (at least one character)")
    try:
        prime.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the prime is not valid text (it holds a lone UTF-16 surrogate)") from None
    if len(prime) > limits.max_prime:
        raise BadRequest(f"the prime has {len(prime):,} characters; this server takes at most "
                         f"{limits.max_prime:,} (charlm serve --max-prime)")
    length = _number(body, "length", "length", min(500, limits.max_length), integer=True)
    assert length is not None
    if not 1 <= length <= limits.max_length:
        raise BadRequest(f"length must be from 1 to {limits.max_length:,} characters "
                         f"(charlm serve --max-length), got {length:,}")
    temperature = _number(body, "temperature", "temperature", 1.0, integer=False)
    assert temperature is not None
    if not 0.0 <= temperature <= 100.0:
        raise BadRequest(f"temperature must be from 0 (greedy) to 100, got {temperature:g}")
    top_k = _number(body, "top_k", "top-k", None, integer=True)
    if top_k is not None and top_k < 1:
        raise BadRequest(f"top-k must be at least 1 (or empty: every character), got {top_k}")
    top_p = _number(body, "top_p", "top-p", None, integer=False)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top-p must be above 0 and at most 1 (or empty: no nucleus cut), got {top_p:g}")
    seed = _number(body, "seed", "seed", None, integer=True)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must be a whole number from 0 to {MAX_SEED} (or empty: a fresh one), got {seed}")
    checkpoint = body.get("checkpoint", "0")
    if not isinstance(checkpoint, str):
        checkpoint = str(checkpoint)[:40]
    return GenerateRequest(checkpoint, prime, int(length), float(temperature),
                           None if top_k is None else int(top_k), top_p, None if seed is None else int(seed))
