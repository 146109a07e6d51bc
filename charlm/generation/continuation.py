"""Generation: the prime read in one forward pass, then the cells stepped one character at a time.

One sample can be streamed for as long as asked in constant memory (:func:`stream`); several samples
are generated together and kept as compact ids until the end (:func:`generate`, :func:`generate_samples`).
Each sample can end at the first of a set of stop strings (:class:`StopMatcher`) and carries its
log-probability under the model at temperature 1, whatever temperature and filters drew it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.data.vocab import Vocab
from charlm.generation.options import check_options, pick
from charlm.model import fast_step
from charlm.model.char_lm import CharLM, States
from charlm.util.errors import CharlmError

_DECODE_CHUNK = 1 << 16  # ids turned into text at a time, so decoding a long sample stays compact
# Characters a Continuation draws per C++ call: the first run short (the first characters show at once),
# each next one twice as long up to MAX_RUN (a Ctrl-C or a stop string waits for at most one run).
FIRST_RUN = 8
MAX_RUN = 256


@dataclass(frozen=True)
class Sample:
    """One generated continuation (the prime not included)."""

    text: str
    logprob: float  # nats: sum over its characters of log p(char | everything before) at temperature 1
    stopped: bool  # it ended at a stop string (which ``text`` includes)


class StopMatcher:
    """Finds the first stop string in a text that arrives one character at a time; keeps only a short tail,
    so a stop string that straddles two arrivals is found and a long stream costs no memory."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._keep = max((len(s) for s in self.stops), default=1) - 1
        self._tail = ""

    def feed(self, ch: str) -> bool:
        """True when the text so far ends with a stop string (for the first time: the caller stops there)."""
        if not self.stops:
            return False
        tail = self._tail + ch
        self._tail = tail[len(tail) - self._keep:] if self._keep else ""
        return tail.endswith(self.stops)


@torch.no_grad()
def read_prime(model: CharLM, prime_ids: Tensor, streams: int = 1) -> tuple[Tensor, States]:
    """Last logits (streams, V) and states after ``prime_ids``: one forward pass over the whole prime from a
    zero state (the sequence kernel), its result repeated for each stream. The model must be in eval mode."""
    if prime_ids.numel() == 0:
        raise CharlmError("the prime must have at least one character")
    device = next(model.parameters()).device
    out = model(prime_ids.view(1, -1).to(device))
    logits = out.logits[:, -1]
    if streams == 1:
        return logits, out.states
    return logits.expand(streams, -1), [tuple(t.repeat(1, streams, 1) for t in s) for s in out.states]


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of its own: seeded with ``seed``, or (None) from the operating system's randomness,
    leaving torch's global generator, which the caller may have seeded, where it was."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def char_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids) (N,) in float64 under ``logits`` (N, V) at temperature 1."""
    return F.log_softmax(logits.double(), dim=-1).gather(1, ids.view(-1, 1)).squeeze(1)


class Continuation:
    """Characters drawn one after another from the scores ``logits`` (N, V) and ``states`` (eval mode, the
    options checked): iterating yields ``length`` times the drawn ids (N,) and the scores they were drawn
    from (N, V); :meth:`finish` ends it after the last one taken.

    Where :func:`charlm.model.fast_step.sample` runs, the characters are drawn and stepped in runs of up to
    :data:`MAX_RUN` per C++ call (shorter at first, so the first characters come at once), else one
    :func:`pick` and one :func:`~charlm.model.fast_step.step` at a time.
    """

    def __init__(self, model: CharLM, logits: Tensor, states: States, length: int, *, temperature: float,
                 top_k: int | None, top_p: float | None, generator: torch.Generator) -> None:
        self.model, self.length, self.generator = model, length, generator
        self.options = (temperature, top_k, top_p)
        self._start: tuple[Tensor, States] = (logits, states)  # logits and states before the current run
        self._run: tuple[Tensor, tuple[Tensor, States], Tensor] | None = None  # ids, the carry after, rng before
        self._taken = 0  # characters of the current run yielded
        self._pending: Tensor | None = None  # a character drawn one at a time, not yet stepped

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        temperature, top_k, top_p = self.options
        left, run = self.length, FIRST_RUN
        while left > 0:
            logits, states = self._start
            fused = fast_step.sample(self.model, logits, temperature, top_k, top_p, self.generator, states,
                                     min(run, left))
            if fused is None:
                nxt = pick(logits.cpu(), temperature, top_k, self.generator, top_p=top_p)
                self._pending, left = nxt.to(logits.device), left - 1
                yield nxt, logits
                if left > 0:  # the step after the last character only if finish() asks for it
                    self._start, self._pending = fast_step.step(self.model, self._pending, states), None
                continue
            ids, scores, after, rng = fused
            self._run, self._taken = (ids, after, rng), 0
            for i in range(ids.size(0)):
                self._taken = i + 1
                yield ids[i], scores[i]
            self._start, self._run = after, None
            left, run = left - ids.size(0), min(2 * run, MAX_RUN)

    @torch.no_grad()
    def finish(self) -> tuple[Tensor, States]:
        """(logits, states) after the last character taken, with the generator where the one-at-a-time draws
        would have left it: a run cut short is stepped again up to there (the same arithmetic, so the same
        state) and its unused draws are given back."""
        if self._pending is not None:
            self._start, self._pending = fast_step.step(self.model, self._pending, self._start[1]), None
        if self._run is None:
            return self._start
        ids, after, rng = self._run
        if self._taken < ids.size(0):
            logits, states = self._start
            for i in range(self._taken):
                logits, states = fast_step.step(self.model, ids[i], states)
            after = (logits, states)
            self.generator.set_state(rng)
            torch.rand(self._taken * ids.size(1), dtype=torch.float64, generator=self.generator)  # the draws used
        self._start, self._run = after, None
        return after


def generate_steps(model: CharLM, prime_ids: Tensor, length: int, *, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   num_samples: int = 1, logprobs: bool = False) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield, one step at a time, the next ids (num_samples,) and, with ``logprobs``, their log-probabilities
    (num_samples,) at temperature 1 (else None)."""
    check_options(length, temperature, top_k, num_samples, seed=seed, top_p=top_p)
    model.eval()
    logits, states = read_prime(model, prime_ids, num_samples)
    for nxt, scores in Continuation(model, logits, states, length, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=seeded_generator(seed)):
        yield nxt, char_logprobs(scores.cpu(), nxt) if logprobs else None


def generate_ids(model: CharLM, prime_ids: Tensor, length: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None, num_samples: int = 1,
                 top_p: float | None = None) -> Iterator[Tensor]:
    """Yield (num_samples,) ids, one step at a time, after reading the prime in one forward pass."""
    for ids, _ in generate_steps(model, prime_ids, length, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, num_samples=num_samples):
        yield ids


def stream(model: CharLM, vocab: Vocab, prime: str, length: int, write: Callable[[str], None], *,
           temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
           top_p: float | None = None, stop: Sequence[str] = ()) -> bool:
    """One sample after ``prime``: each new character goes to ``write`` as it comes; nothing is kept. Ends
    right after the first stop string (written too); True if it did."""
    check_options(length, temperature, top_k, seed=seed, top_p=top_p, stop=stop)
    prime_ids = vocab.encode(prime, what="prime")
    chars, matcher = vocab.chars, StopMatcher(stop)
    for ids in generate_ids(model, prime_ids, length, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed):
        ch = chars[int(ids[0])]
        write(ch)
        if matcher.feed(ch):
            return True
    return False


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id: one byte a character for up to 256 characters."""
    if vocab_size <= 256:
        return torch.uint8
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def decode_row(vocab: Vocab, row: Tensor) -> str:
    """The text of a row of compact ids, decoded a chunk at a time."""
    return "".join(vocab.decode(row[i:i + _DECODE_CHUNK]) for i in range(0, row.numel(), _DECODE_CHUNK))


def generate_samples(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     num_samples: int = 1, stop: Sequence[str] = ()) -> list[Sample]:
    """``num_samples`` continuations of ``prime`` drawn side by side, each with its log-probability; each
    ends right after its first stop string (the others go on; all end when every one has stopped)."""
    prime_ids = vocab.encode(prime, what="prime")
    check_options(length, temperature, top_k, num_samples, seed=seed, top_p=top_p, stop=stop)  # before the table
    table = torch.empty((num_samples, length), dtype=id_dtype(len(vocab)))
    ends = [length] * num_samples
    total = torch.zeros(num_samples, dtype=torch.float64)
    live = torch.ones(num_samples, dtype=torch.bool)
    matchers = [StopMatcher(stop) for _ in range(num_samples)] if stop else []
    chars = vocab.chars
    for step, (ids, lp) in enumerate(generate_steps(model, prime_ids, length, temperature=temperature, top_k=top_k,
                                                    top_p=top_p, seed=seed, num_samples=num_samples,
                                                    logprobs=True)):
        table[:, step] = ids
        assert lp is not None
        total += lp.masked_fill(~live, 0.0)  # masked, not multiplied: a stopped row's -inf must not give NaN
        for row in (live.nonzero().flatten().tolist() if matchers else ()):
            if matchers[row].feed(chars[int(ids[row])]):
                ends[row], live[row] = step + 1, False
        if matchers and not bool(live.any()):
            break
    return [Sample(decode_row(vocab, table[i, :ends[i]]), float(total[i]), not bool(live[i]))
            for i in range(num_samples)]


def generate(model: CharLM, vocab: Vocab, prime: str, length: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, num_samples: int = 1,
             top_p: float | None = None, stop: Sequence[str] = ()) -> list[str]:
    """Texts that start with ``prime``; the ids are kept in one compact (N, length) table until the end."""
    return [prime + s.text for s in generate_samples(model, vocab, prime, length, temperature=temperature,
                                                     top_k=top_k, top_p=top_p, seed=seed,
                                                     num_samples=num_samples, stop=stop)]
