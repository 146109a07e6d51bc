"""Generation from a trained model: sampling (temperature, top-k, top-p), stop strings, beam search, and a
running session that carries the state from one line to the next.

- :mod:`~charlm.sampling.options`: :func:`pick` (the next character), :func:`draw` and the limits of every option
- :mod:`~charlm.sampling.generation`: the prime read in one pass, then :func:`stream` / :func:`generate`
  (the draws: :class:`Continuation`)
- :mod:`~charlm.sampling.beam`: :func:`beam_search`
- :mod:`~charlm.sampling.session`: :class:`Session` (read, continue, reset)
- :mod:`~charlm.sampling.interactive`: the ``charlm sample --interactive`` loop
"""

from charlm.sampling.beam import beam_search
from charlm.sampling.generation import (
    Continuation,
    Sample,
    StopMatcher,
    generate,
    generate_ids,
    generate_samples,
    generate_steps,
    read_prime,
    stream,
)
from charlm.sampling.options import (
    MAX_BEAM,
    MAX_LENGTH,
    MAX_NUM_SAMPLES,
    MAX_SEED,
    NOT_FINITE,
    check_options,
    decode_escapes,
    draw,
    pick,
)
from charlm.sampling.session import Session, Settings

__all__ = ["MAX_BEAM", "MAX_LENGTH", "MAX_NUM_SAMPLES", "MAX_SEED", "NOT_FINITE", "Continuation", "Sample", "Session",
           "Settings", "StopMatcher", "beam_search", "check_options", "decode_escapes", "draw", "generate",
           "generate_ids", "generate_samples", "generate_steps", "pick", "read_prime", "stream"]
