"""Beam search over characters: the likeliest continuations of a given length (log-probabilities at temperature 1).

The K beams are K streams stepped side by side through :func:`charlm.model.fast_step.step`; after each step
the K best of the K x V one-character extensions survive, and the states follow their beams (``index_select`` on the
stream dimension). Ties go to the better-ranked beam, then to the lower character id (a stable sort), so
the search is deterministic and K = 1 is exactly greedy decoding (``argmax`` also takes the first maximum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from charlm.data.vocab import Vocab
from charlm.generation.continuation import Sample, decode_row, id_dtype, read_prime
from charlm.generation.options import check_options
from charlm.model import fast_step
from charlm.model.char_lm import CharLM
from charlm.util.errors import NOT_FINITE, CharlmError


@torch.no_grad()
def beam_search(model: CharLM, vocab: Vocab, prime: str, length: int, *, beam: int,
                num_results: int = 1) -> list[Sample]:
    """The ``num_results`` likeliest continuations of ``length`` characters found by a ``beam``-wide search,
    best first (fewer only when fewer distinct continuations exist, for a very short ``length``)."""
    check_options(length, 1.0, None, num_results, beam=beam)
    prime_ids = vocab.encode(prime, what="prime")
    model.eval()
    device = next(model.parameters()).device
    logits, states = read_prime(model, prime_ids)
    chars = torch.empty((length, beam), dtype=id_dtype(len(vocab)))  # the character each beam took at step t
    parents = torch.empty((length, beam), dtype=torch.int16 if beam <= 2**15 else torch.int32)  # and its beam
    scores = torch.zeros(1, dtype=torch.float64)
    for t in range(length):
        candidates = (scores[:, None] + F.log_softmax(logits.cpu().double(), dim=-1)).flatten()
        if bool(torch.isnan(candidates).any()):
            raise CharlmError(NOT_FINITE)
        best = candidates.sort(descending=True, stable=True).indices[:beam]
        parent, char = best // len(vocab), best % len(vocab)
        chars[t, :best.numel()], parents[t, :best.numel()] = char, parent
        scores = candidates[best]
        if t + 1 < length:
            states = [tuple(s.index_select(1, parent.to(device)) for s in state) for state in states]
            logits, states = fast_step.step(model, char.to(device), states)
    char_table, parent_table = chars.numpy(), parents.numpy()
    results = []
    for rank in range(min(num_results, scores.numel())):
        path, b = torch.empty(length, dtype=chars.dtype), rank
        path_view = path.numpy()
        for t in range(length - 1, -1, -1):  # follow the beam back to the prime
            path_view[t], b = char_table[t, b], int(parent_table[t, b])
        results.append(Sample(decode_row(vocab, path), float(scores[rank]), stopped=False))
    return results
