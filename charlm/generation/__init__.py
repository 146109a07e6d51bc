"""Generation from a trained model: sampling (temperature, top-k, top-p), stop strings, beam search, and a
running session that carries the state from one line to the next.

- :mod:`~charlm.generation.options`: :func:`pick` (the next character), :func:`draw` and the limits of every option
- :mod:`~charlm.generation.continuation`: the prime read in one pass, then :func:`stream` / :func:`generate`
  (the draws: :class:`Continuation`)
- :mod:`~charlm.generation.beam`: :func:`beam_search`
- :mod:`~charlm.generation.session`: :class:`Session` (read, continue, reset)
- :mod:`~charlm.generation.interactive`: the ``charlm sample --interactive`` loop
"""
