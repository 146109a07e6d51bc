"""The character vocabulary: sorted distinct characters, saved in every checkpoint."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from charlm.util.errors import CharlmError


class Vocab:
    """Maps characters to ids and back. ``Vocab.from_text("abca").chars == "abc"``."""

    def __init__(self, chars: str, origin: str | None = None) -> None:
        """``origin`` (e.g. ``"checkpoint runs/x/best.ckpt"``) is named when a text does not fit."""
        repeated = [c for c, n in Counter(chars).items() if n > 1]
        if repeated:
            listed = ", ".join(f"{c!r}" for c in repeated[:10])
            raise CharlmError(f"vocabulary has repeated characters: {listed}{' ...' if len(repeated) > 10 else ''}")
        self.chars, self.origin = chars, origin
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def unknown(self, text: str) -> Counter[str]:
        """Characters of ``text`` outside the vocabulary, with how often each occurs."""
        return Counter(c for c in text if c not in self._index)

    def describe_unknown(self, text: str, what: str = "text") -> str | None:
        """``"<what> has N character(s) outside ...: 'x' (2x), ..."``, or None when every one is known."""
        missing = self.unknown(text)
        if not missing:
            return None
        listed = ", ".join(f"{c!r} ({n}x)" for c, n in missing.most_common(10))
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        return (f"{what} has {sum(missing.values())} character(s) outside the model's {len(self)}-character "
                f"vocabulary: {listed}{more}")

    def check(self, text: str, what: str = "text") -> None:
        """Raise a clear error naming every character of ``text`` the vocabulary lacks (and whose it is)."""
        problem = self.describe_unknown(text, what)
        if problem:
            whose = (f"; {self.origin} knows only the characters of the text it was trained on"
                     if self.origin else "")
            raise CharlmError(problem + whose)

    def encode(self, text: str, what: str = "text") -> Tensor:
        self.check(text, what)
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in values)
