"""Generation: step the cells one character at a time (fast), with temperature and top-k.

One sample can be streamed for as long as asked in constant memory (:func:`stream`); several samples
are generated together and kept as compact ids until the end (:func:`generate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from charlm.errors import CharlmError
from charlm.model import CharLM
from charlm.vocab import Vocab

MAX_LENGTH = 100_000_000  # characters one command generates (several samples: all of them together)
MAX_NUM_SAMPLES = 10_000  # rows stepped side by side
MAX_SEED = 2**32 - 1  # torch's CPU generator (mt19937) uses the low 32 bits: 2**32 would repeat seed 0
_DECODE_CHUNK = 1 << 16  # ids turned into text at a time, so decoding a long sample stays compact


NOT_FINITE = ("the model's scores for the next character are not finite numbers (NaN or inf): its weights or "
              "its state overflowed, so it cannot go on generating")


def pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> Tensor:
    """Next ids (N,) from logits (N, V): greedy at temperature 0, else softmax(logits / T) within top-k."""
    if temperature == 0.0:
        if not bool(torch.isfinite(logits).all()):
            raise CharlmError(NOT_FINITE)
        return logits.argmax(dim=-1)
    # from the top score down: a tiny temperature gives 0 for the best and -inf for the rest (never
    # inf - inf = NaN), a huge one gives a uniform draw; float64 only for a temperature float32 cannot hold
    logits = logits.to(torch.float32 if temperature >= torch.finfo(torch.float32).tiny else torch.float64)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    except RuntimeError:  # NaN / inf scores: the probabilities are NaN, which multinomial refuses
        raise CharlmError(NOT_FINITE) from None


def check_options(length: int, temperature: float, top_k: int | None, num_samples: int = 1,
                  prefix: str = "", seed: int | None = None) -> None:
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
    if num_samples < 1:
        raise CharlmError(f"{prefix}num-samples must be at least 1, got {num_samples}")
    if num_samples > MAX_NUM_SAMPLES:
        raise CharlmError(f"{prefix}num-samples must be at most {MAX_NUM_SAMPLES:,}, got {num_samples:,}")
    if num_samples > 1 and num_samples * length > MAX_LENGTH:
        raise CharlmError(f"{prefix}num-samples x {prefix}length must be at most {MAX_LENGTH:,} characters "
                          f"(several samples are kept in memory until all are done), got {num_samples:,} x "
                          f"{length:,}; ask for fewer or shorter samples, or stream one long sample")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise CharlmError(f"{prefix}seed must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed}")


@torch.no_grad()
def generate_ids(model: CharLM, prime_ids: Tensor, length: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 num_samples: int = 1) -> Iterator[Tensor]:
    """Yield (num_samples,) ids, one step at a time, after reading the prime through the cells."""
    check_options(length, temperature, top_k, num_samples, seed=seed)
    if prime_ids.numel() == 0:
        raise CharlmError("the prime must have at least one character")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(torch.seed() if seed is None else seed)
    states = None
    logits = None
    for char_id in prime_ids.tolist():  # read the prime with the same step path
        x = torch.full((num_samples,), char_id, dtype=torch.long, device=device)
        logits, states = model.step(x, states)
    assert logits is not None
    for _ in range(length):
        nxt = pick(logits.cpu(), temperature, top_k, generator)
        yield nxt
        logits, states = model.step(nxt.to(device), states)


def stream(model: CharLM, vocab: Vocab, prime: str, length: int, write: Callable[[str], None], *,
           temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> None:
    """One sample after ``prime``: each new character goes to ``write`` as it comes; nothing is kept."""
    prime_ids = vocab.encode(prime, what="prime")
    chars = vocab.chars
    for ids in generate_ids(model, prime_ids, length, temperature=temperature, top_k=top_k, seed=seed):
        write(chars[int(ids[0])])


def _id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id: one byte a character for up to 256 characters."""
    if vocab_size <= 256:
        return torch.uint8
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def generate(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, num_samples: int = 1) -> list[str]:
    """Texts that start with ``prime``; the ids are kept in one compact (N, length) table until the end."""
    prime_ids = vocab.encode(prime, what="prime")
    check_options(length, temperature, top_k, num_samples, seed=seed)  # before the table is allocated
    table = torch.empty((num_samples, length), dtype=_id_dtype(len(vocab)))
    for step, ids in enumerate(generate_ids(model, prime_ids, length, temperature=temperature, top_k=top_k,
                                            seed=seed, num_samples=num_samples)):
        table[:, step] = ids
    return [prime + "".join(vocab.decode(row[i:i + _DECODE_CHUNK]) for i in range(0, length, _DECODE_CHUNK))
            for row in table]
