"""``charlm sample``: text from a checkpoint, streamed as it comes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from charlm.commands.common import checkpoint_path, friendly, stdout_may_close
from charlm.errors import CharlmError


@friendly
def sample(
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint (default: newest run's best).")] = None,
    prime: Annotated[str, typer.Option(help="Text the sample starts with.")] = "\n",
    length: Annotated[int, typer.Option(
        help="Characters to generate after the prime (at most 100,000,000).")] = 500,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher is wilder.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample only from the k likeliest characters.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text (0 to 2**32 - 1).")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated together.")] = 1,
) -> None:
    """Generate text, streamed as it comes; the output starts with the prime."""
    from charlm.checkpoint import load_model
    from charlm.evaluate import nonfinite_parameters
    from charlm.fast_step import SAMPLING_THREADS
    from charlm.sampling import check_options, generate, stream
    from charlm.train import fast_cpu_math

    check_options(length, temperature, top_k, num_samples, prefix="--", seed=seed)  # before the slow load
    path = checkpoint_path(checkpoint)
    model, vocab, _, _ = load_model(path)
    vocab.check(prime, what="--prime")
    bad = nonfinite_parameters(model)
    if bad:
        raise CharlmError(f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. "
                          f"{bad[0]}), so it cannot generate text; use an earlier checkpoint of that run or retrain")
    fast_cpu_math(SAMPLING_THREADS)
    with stdout_may_close():
        if num_samples == 1:
            sys.stdout.write(prime)
            sys.stdout.flush()

            def emit(ch: str) -> None:
                sys.stdout.write(ch)
                sys.stdout.flush()

            stream(model, vocab, prime, length, emit, temperature=temperature, top_k=top_k, seed=seed)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        texts = generate(model, vocab, prime, length, temperature=temperature, top_k=top_k, seed=seed,
                         num_samples=num_samples)
        for i, text in enumerate(texts):
            sys.stdout.write(f"=== sample {i + 1} ===\n{text}\n")
        sys.stdout.flush()
