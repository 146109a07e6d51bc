"""Generation: step the cells one character at a time (fast), with temperature and top-k."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from charlm.errors import CharlmError
from charlm.model import CharLM
from charlm.vocab import Vocab


def pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> Tensor:
    """Next ids (N,) from logits (N, V): greedy at temperature 0, else softmax(logits / T) within top-k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_options(length: int, temperature: float, top_k: int | None, num_samples: int = 1,
                  prefix: str = "") -> None:
    """One clear error for each sampling option out of range (``prefix="--"`` names the CLI flags)."""
    if length < 0:
        raise CharlmError(f"{prefix}length must be >= 0, got {length}")
    if temperature < 0:
        raise CharlmError(f"{prefix}temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise CharlmError(f"{prefix}top-k must be at least 1, got {top_k}")
    if num_samples < 1:
        raise CharlmError(f"{prefix}num-samples must be at least 1, got {num_samples}")


@torch.no_grad()
def generate_ids(model: CharLM, prime_ids: Tensor, length: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 num_samples: int = 1) -> Iterator[Tensor]:
    """Yield (num_samples,) ids, one step at a time, after reading the prime through the cells."""
    check_options(length, temperature, top_k, num_samples)
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


def generate(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, num_samples: int = 1,
             on_char: Callable[[str], None] | None = None) -> list[str]:
    """Texts that start with ``prime``; ``on_char`` receives each new char of sample 0 as it comes."""
    prime_ids = vocab.encode(prime, what="prime")
    columns: list[Tensor] = []
    for ids in generate_ids(model, prime_ids, length, temperature=temperature, top_k=top_k, seed=seed,
                            num_samples=num_samples):
        columns.append(ids)
        if on_char is not None:
            on_char(vocab.chars[int(ids[0])])
    if not columns:
        return [prime] * num_samples
    table = torch.stack(columns, dim=1)  # (N, length)
    return [prime + vocab.decode(row) for row in table]
