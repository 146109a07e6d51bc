"""The character vocabulary: sorted distinct characters, saved in every checkpoint."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from charlm.errors import CharlmError


class Vocab:
    """Maps characters to ids and back. ``Vocab.from_text("abca").chars == "abc"``."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise CharlmError("vocabulary has repeated characters")
        self.chars = chars
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

    def check(self, text: str, what: str = "text") -> None:
        """Raise a clear error naming every character of ``text`` the vocabulary lacks."""
        missing = self.unknown(text)
        if missing:
            listed = ", ".join(f"{c!r} ({n}x)" for c, n in missing.most_common(10))
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise CharlmError(f"{what} has {sum(missing.values())} character(s) outside the model's "
                              f"{len(self)}-character vocabulary: {listed}{more}")

    def encode(self, text: str, what: str = "text") -> Tensor:
        self.check(text, what)
        return torch.tensor([self._index[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i] for i in values)
