"""Simple features of a text, and the units that track them best (Pearson correlation over the text).

Each feature is a number per character, read like a unit: its value just after reading character t.

- ``in_quotes``: 1 inside a double-quoted span (``"`` toggles it: the opening quote is inside, the closing
  one outside), else 0.
- ``in_brackets``: 1 while an opening ``(``, ``[`` or ``{`` is not yet closed (the opening bracket is
  inside, the closing one that returns to depth 0 outside), else 0.
- ``line_position``: the characters of the current line read so far (a newline is 0, the first
  character of a line 1).
- ``speaker_name``: 1 on the characters of a speaker line as tiny Shakespeare writes them: a capitalised
  name and a colon alone on a line (``First Citizen:``, ``KING RICHARD III:``), else 0.
- ``sentence_end``: 1 on a ``.``, ``!`` or ``?`` and on the whitespace after it, until the next character
  that is not whitespace, else 0.

:func:`find_units` scores every unit of every layer and quantity of a trace against each feature and keeps,
per feature, the units with the largest absolute correlation. A feature constant over the text (no quotes in
Shakespeare) has no correlation and is reported as absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from charlm.tools.viz.trace import Trace, units_of

FEATURES: dict[str, str] = {
    "in_quotes": 'inside double quotes "..."',
    "in_brackets": "inside brackets (...), [...], {...}",
    "line_position": "position in the line (characters since the newline)",
    "speaker_name": "on a speaker line (a capitalised name and a colon)",
    "sentence_end": "after the end of a sentence (. ! ? and the whitespace after)",
}
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]*:$")


def in_quotes(text: str) -> list[float]:
    out, inside = [], False
    for ch in text:
        if ch == '"':
            inside = not inside
        out.append(1.0 if inside else 0.0)
    return out


def in_brackets(text: str) -> list[float]:
    out, depth = [], 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        out.append(1.0 if depth > 0 else 0.0)
    return out


def line_position(text: str) -> list[float]:
    out, col = [], 0
    for ch in text:
        col = 0 if ch == "\n" else col + 1
        out.append(float(col))
    return out


def speaker_name(text: str) -> list[float]:
    out: list[float] = []
    for line in text.split("\n"):
        out.extend([1.0 if _SPEAKER.match(line) else 0.0] * len(line))
        out.append(0.0)  # the newline after it
    return out[: len(text)]


def sentence_end(text: str) -> list[float]:
    out, after = [], False
    for ch in text:
        if ch in ".!?":
            after = True
        elif not ch.isspace():
            after = False
        out.append(1.0 if after else 0.0)
    return out


_EXTRACTORS = {"in_quotes": in_quotes, "in_brackets": in_brackets, "line_position": line_position,
               "speaker_name": speaker_name, "sentence_end": sentence_end}


def text_features(text: str) -> dict[str, Tensor]:
    """Every feature of :data:`FEATURES` over ``text``: name -> (T,) float64."""
    return {name: torch.tensor(fn(text), dtype=torch.float64) for name, fn in _EXTRACTORS.items()}


@dataclass(frozen=True)
class UnitScore:
    """One unit: ``quantity`` (h, c or a gate) of layer ``layer`` (1-based), unit ``unit`` (0-based)."""

    quantity: str
    layer: int
    unit: int
    r: float  # Pearson correlation with the feature, in [-1, 1]


@dataclass(frozen=True)
class FeatureUnits:
    """The best units for one feature; ``present`` is False when the feature is constant over the text."""

    name: str
    description: str
    present: bool
    best: list[UnitScore]


def pearson(features: Tensor, units: Tensor) -> Tensor:
    """Correlation of each column of ``features`` (T, F) with each column of ``units`` (T, U): (F, U).
    A constant column has no correlation: NaN."""
    f = features.double() - features.double().mean(0)
    u = units.double() - units.double().mean(0)
    num = f.t() @ u
    den = f.norm(dim=0)[:, None] * u.norm(dim=0)[None, :]
    r = num / den
    r[den == 0] = float("nan")
    return r.clamp(-1.0, 1.0)


def find_units(tr: Trace, top: int = 5, layers: set[int] | None = None,
               quantities: set[str] | None = None) -> list[FeatureUnits]:
    """For each feature of :data:`FEATURES`, the ``top`` units of the trace (or of the given layers /
    quantities) with the largest |r|, best first."""
    feats = text_features(tr.text)
    names = list(feats)
    matrix = torch.stack([feats[n] for n in names], 1)  # (T, F)
    columns: list[tuple[str, int, int]] = []
    blocks: list[Tensor] = []
    for number, quantity, values in units_of(tr, layers, quantities):
        blocks.append(values)
        columns.extend((quantity, number, u) for u in range(values.shape[1]))
    r = pearson(matrix, torch.cat(blocks, 1))  # (F, U)
    out = []
    for fi, name in enumerate(names):
        present = bool(matrix[:, fi].std() > 0) if len(tr.text) > 1 else False
        row = r[fi]
        scored = torch.nan_to_num(row.abs(), nan=-1.0)
        best = []
        if present:
            for idx in scored.argsort(descending=True)[:top].tolist():
                if scored[idx] < 0:
                    break
                quantity, layer, unit = columns[idx]
                best.append(UnitScore(quantity, layer, unit, float(row[idx])))
        out.append(FeatureUnits(name, FEATURES[name], present, best))
    return out
