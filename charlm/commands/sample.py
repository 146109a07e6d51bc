"""``charlm sample``: text from a checkpoint, streamed as it comes; beam search, JSON, an interactive session."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from charlm.commands.common import checkpoint_path, friendly, stdout_may_close
from charlm.util.errors import CharlmError

if TYPE_CHECKING:
    from pathlib import Path

    from charlm.data.vocab import Vocab
    from charlm.generation.continuation import Sample
    from charlm.model.char_lm import CharLM

DEFAULT_TEMPERATURE = 0.8


@friendly
def sample(
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint: a .ckpt file or an exported safetensors folder (default: newest run's best).")] = None,
    prime: Annotated[str | None, typer.Option(
        help="Text the sample starts with (default: a newline).", show_default=False)] = None,
    prime_file: Annotated[str | None, typer.Option(help="Read the prime from this UTF-8 file.")] = None,
    length: Annotated[int, typer.Option(
        help="Characters to generate after the prime (at most 100,000,000).")] = 500,
    temperature: Annotated[float | None, typer.Option(
        help="0 is greedy; higher is wilder.", show_default=str(DEFAULT_TEMPERATURE))] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample only from the k likeliest characters.")] = None,
    top_p: Annotated[float | None, typer.Option(
        help="Nucleus: sample only from the likeliest characters whose probabilities add up to P (after "
             "--temperature and --top-k).")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        metavar="STR", show_default=False,
        help="End right after this text (repeatable; escapes such as \\n understood; included in the output).")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text (0 to 2**32 - 1).")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated together (with --beam: the "
                                                  "best beams).")] = 1,
    beam: Annotated[int | None, typer.Option(
        help="Beam search with K beams: the likeliest continuation (deterministic; 1 is greedy).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: each sample's text and "
                                                         "log-probability.")] = False,
    interactive: Annotated[bool, typer.Option(
        "--interactive", help="A session: each line you type is read into the running state and continued.")] = False,
) -> None:
    """Generate text, streamed as it comes; the output starts with the prime."""
    from charlm.generation.options import check_options, check_prime, decode_escapes, read_prime_file

    if prime is not None and prime_file is not None:
        raise CharlmError("--prime and --prime-file both give the prime; use one of them")
    stops = [decode_escapes(s, what="--stop") for s in stop or []]
    _refuse_combinations(beam, as_json, interactive, num_samples, temperature, top_k, top_p, seed, stops)
    temp = DEFAULT_TEMPERATURE if temperature is None else temperature
    check_options(length, temp, top_k, num_samples, prefix="--", seed=seed, top_p=top_p, beam=beam, stop=stops)
    text = read_prime_file(prime_file) if prime_file is not None else prime  # before the slow load
    if prime is not None:
        check_prime(prime)
    what = f"--prime-file {prime_file}" if prime_file is not None else "--prime"
    model, vocab, path = _load(checkpoint)
    if text is not None:
        vocab.check(text, what=what)
    if interactive:
        _interactive(model, vocab, text, length, temp, top_k, top_p, stops, seed)
        return
    text = "\n" if text is None else text
    with stdout_may_close():
        if beam is not None:
            from charlm.generation.beam import beam_search

            results = beam_search(model, vocab, text, length, beam=beam, num_results=num_samples)
            _print(results, text, as_json, path, "beam", length=length, beam=beam)
        elif num_samples == 1 and not as_json:
            _stream(model, vocab, text, length, temperature=temp, top_k=top_k, top_p=top_p, seed=seed, stop=stops)
        else:
            from charlm.generation.continuation import generate_samples

            results = generate_samples(model, vocab, text, length, temperature=temp, top_k=top_k, top_p=top_p,
                                       seed=seed, num_samples=num_samples, stop=stops)
            _print(results, text, as_json, path, "sample", length=length, temperature=temp, top_k=top_k,
                   top_p=top_p, seed=seed, stop=stops)


def _refuse_combinations(beam: int | None, as_json: bool, interactive: bool, num_samples: int,
                         temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None,
                         stops: list[str]) -> None:
    if interactive:
        given = [flag for flag, on in (("--beam", beam is not None), ("--json", as_json),
                                       ("--num-samples", num_samples != 1)) if on]
        if given:
            raise CharlmError(f"--interactive continues one text line by line, so {', '.join(given)} cannot go "
                              "with it; drop them")
    if beam is not None:
        given = [flag for flag, on in (("--temperature", temperature is not None), ("--top-k", top_k is not None),
                                       ("--top-p", top_p is not None), ("--seed", seed is not None),
                                       ("--stop", bool(stops))) if on]
        if given:
            raise CharlmError(f"--beam searches for the likeliest continuation of --length characters at "
                              f"temperature 1, so {', '.join(given)} cannot go with it; drop them")


def _load(checkpoint: str | None) -> tuple[CharLM, Vocab, Path]:
    from charlm.evaluation.scoring import nonfinite_parameters
    from charlm.model.checkpoint import load_model
    from charlm.util.threads import fast_cpu_math, sampling_threads

    path = checkpoint_path(checkpoint)
    model, vocab, _, _ = load_model(path)
    bad = nonfinite_parameters(model)
    if bad:
        raise CharlmError(f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. "
                          f"{bad[0]}), so it cannot generate text; use an earlier checkpoint of that run or retrain")
    fast_cpu_math(sampling_threads())
    return model, vocab, path


def _stream(model: CharLM, vocab: Vocab, prime: str, length: int, **options: Any) -> None:
    from charlm.generation.continuation import stream

    sys.stdout.write(prime)
    sys.stdout.flush()

    def emit(ch: str) -> None:
        sys.stdout.write(ch)
        sys.stdout.flush()

    stream(model, vocab, prime, length, emit, **options)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print(results: list[Sample], prime: str, as_json: bool, path: object, kind: str, **options: object) -> None:
    """Each result as plain text (``=== sample 2 ===`` above each when there are several), or one JSON object."""
    if as_json:
        from charlm.evaluation.scoring import finite_or_null

        why = "the model gave a character of this text a probability that is 0 in floating point"
        samples = [finite_or_null({"text": r.text, "logprob": r.logprob, "chars": len(r.text), "stopped": r.stopped},
                                  why) for r in results]
        print(json.dumps({"checkpoint": str(path), "prime": prime, "mode": kind, **options, "samples": samples},
                         allow_nan=False))
        return
    if len(results) == 1:
        sys.stdout.write(f"{prime}{results[0].text}\n")
    else:
        for i, r in enumerate(results):
            sys.stdout.write(f"=== {kind} {i + 1} ===\n{prime}{r.text}\n")
    sys.stdout.flush()


def _interactive(model: CharLM, vocab: Vocab, prime: str | None, length: int, temperature: float,
                 top_k: int | None, top_p: float | None, stops: list[str], seed: int | None) -> None:
    from charlm.generation.interactive import run
    from charlm.generation.session import Session, Settings

    session = Session(model, vocab, Settings(temperature, top_k, top_p, length, tuple(stops)), seed=seed)
    if prime is not None:
        session.read(prime)
    with stdout_may_close():
        run(session, terminal=sys.stdin.isatty())
