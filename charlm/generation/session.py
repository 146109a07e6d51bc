"""A running text: what the user writes is read into the state, the model continues it, the state carries on.

Each read is one forward pass over the new text from the state so far, each continuation one
:meth:`CharLM.step` per character, so a long session costs the same per character as a short one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from charlm.data.vocab import Vocab
from charlm.generation.continuation import Continuation, StopMatcher, seeded_generator
from charlm.generation.options import check_options
from charlm.model.char_lm import CharLM, States
from charlm.util.errors import CharlmError


@dataclass
class Settings:
    """What a continuation draws with; the interactive commands change it between continuations."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    length: int = 500
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        check_options(self.length, self.temperature, self.top_k, top_p=self.top_p, stop=self.stop)


class Session:
    """The model's state after everything read and written so far (none: a zero state)."""

    def __init__(self, model: CharLM, vocab: Vocab, settings: Settings | None = None, seed: int | None = None) -> None:
        self.model, self.vocab = model.eval(), vocab
        self.settings = settings or Settings()
        self.settings.check()
        self._generator = seeded_generator(seed)
        self._device = next(model.parameters()).device
        self._carry: tuple[Tensor, States] | None = None  # last logits (1, V) and states: replaced, never mutated

    def reset(self) -> None:
        """Forget everything: the next read starts from a zero state."""
        self._carry = None

    @torch.no_grad()
    def read(self, text: str) -> None:
        """Read ``text`` (every character in the vocabulary) into the state: one forward pass."""
        ids = self.vocab.encode(text, what="the text")
        if ids.numel() == 0:
            return
        out = self.model(ids.view(1, -1).to(self._device), None if self._carry is None else self._carry[1])
        self._carry = (out.logits[:, -1], out.states)

    def continue_text(self, write: Callable[[str], None], stop_now: Callable[[], bool] = lambda: False) -> str:
        """Generate up to ``settings.length`` characters, each to ``write`` as it comes and read into the state
        before it is written (so an interruption loses nothing); ends right after a stop string, or when
        ``stop_now()`` turns true. Says why it ended: ``"length"``, ``"stop"`` or ``"interrupted"``."""
        if self._carry is None:
            raise CharlmError("there is nothing to continue yet: read some text first")
        s = self.settings
        matcher, chars = StopMatcher(s.stop), self.vocab.chars
        continuation = Continuation(self.model, *self._carry, s.length, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p, generator=self._generator)
        steps = iter(continuation)
        try:
            for _ in range(s.length):
                if stop_now():
                    return "interrupted"
                nxt, _ = next(steps)
                ch = chars[int(nxt[0])]
                write(ch)
                if matcher.feed(ch):
                    return "stop"
            return "length"
        finally:  # the state after the last character drawn, however it ended
            self._carry = continuation.finish()


def usable_text(vocab: Vocab, text: str, what: str) -> tuple[str, str | None]:
    """``text`` without the characters outside the vocabulary, and a sentence naming them (None if none)."""
    problem = vocab.describe_unknown(text, what=what)
    if problem is None:
        return text, None
    unknown = vocab.unknown(text)
    return "".join(c for c in text if c not in unknown), f"{problem}; they were skipped"

