"""The ``charlm viz`` page: one self-contained HTML file (inline CSS and JavaScript, no network) holding a
:class:`charlm.tools.viz.trace.Trace` and, optionally, the :func:`charlm.tools.viz.features.find_units` results.

The values travel compactly: each quantity of a layer is stored per unit as a scale (the unit's largest
|value| over the text) and one signed byte per character (value / scale x 127), base64; surprisal and
probabilities are rounded to 3 decimals. :func:`page_values` counts what a page would hold, and
:func:`render` refuses more than ``max_values`` with one sentence saying how to cut it down.

The JSON sits in a ``<script type="application/json">`` element; every ``<``, ``>``, ``&`` and ``/`` in it
is written as a ``\\u`` escape, so no text can end the element early and no URL appears in the file.
The colour scale is ``charlmColour`` of ``assets/colour.js`` (the one place it lives).
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from charlm.tools.viz.features import FeatureUnits, text_features
from charlm.tools.viz.trace import Trace, units_of
from charlm.util.errors import CharlmError

MAX_VALUES = 12_000_000  # unit values (characters x units x quantities) one page holds by default
UNIT_INTERVAL = frozenset("ifozr")  # sigmoid gates: coloured on their absolute [0, 1] scale
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "/": "\\/"}


def _asset(name: str) -> str:
    return resources.files("charlm.tools.viz").joinpath("assets", name).read_text(encoding="utf-8")


def page_values(tr: Trace, layers: set[int] | None = None, quantities: set[str] | None = None) -> int:
    """Unit values the page of ``tr`` would hold: characters x the units of every (chosen) layer and quantity."""
    return sum(v.numel() for _, _, v in units_of(tr, layers, quantities))


def encode_unit_bytes(values: Tensor) -> tuple[list[float], str]:
    """(T, H) values -> per-unit scales (max |v|, rounded up) and base64 of the (T, H) int8 codes, row-major
    (character by character). Decoded: value = code / 127 * scale."""
    v = values.double()
    scale = v.abs().amax(0) if v.shape[0] else torch.zeros(v.shape[1], dtype=torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(v / scale * 127).clamp(-127, 127).to(torch.int8)
    return [float(f"{s:.6g}") for s in scale.tolist()], base64.b64encode(codes.numpy().tobytes()).decode("ascii")


def _round(x: float, digits: int = 3) -> float | None:
    return None if not math.isfinite(x) else round(x, digits)


def page_data(tr: Trace, vocab: str, units: list[FeatureUnits] | None, title: str,
              layers: set[int] | None = None, quantities: set[str] | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON values."""
    by_layer: dict[int, dict[str, Any]] = {}
    for number, name, values in units_of(tr, layers, quantities):
        scale, data = encode_unit_bytes(values)
        entry = by_layer.setdefault(number, {"number": number, "size": int(values.shape[1]), "quantities": {}})
        entry["quantities"][name] = {"scale": scale, "data": data,
                                     "range": "unit" if name in UNIT_INTERVAL else "signed"}
    data: dict[str, Any] = {
        "title": title, "cell": tr.cell, "text": tr.text, "vocab": vocab,
        "surprisal": [_round(s) for s in tr.surprisal.tolist()],
        "top_ids": tr.top_ids.flatten().tolist(), "top_k": int(tr.top_ids.shape[1]),
        "top_probs": [round(p, 3) for p in tr.top_probs.flatten().tolist()],
        "layers": list(by_layer.values()), "features": None,
    }
    if units is not None:
        feats = text_features(tr.text)
        data["features"] = [
            {"name": f.name, "description": f.description, "present": f.present,
             "values": [round(v, 3) for v in feats[f.name].tolist()],
             "best": [{"quantity": u.quantity, "layer": u.layer, "unit": u.unit, "r": round(u.r, 4)}
                      for u in f.best]}
            for f in units]
    return data


def embed_json(data: dict[str, Any]) -> str:
    """JSON safe inside a ``<script>`` element and free of URLs (see the module docstring)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def render(tr: Trace, vocab: str, units: list[FeatureUnits] | None = None, *, title: str = "charlm viz",
           layers: set[int] | None = None, quantities: set[str] | None = None, max_values: int = MAX_VALUES) -> str:
    """The whole page as one string: the chosen layers and quantities (default: all) of ``tr``."""
    n = page_values(tr, layers, quantities)
    if n > max_values:
        raise CharlmError(
            f"the page would hold {n:,} unit values ({len(tr.text):,} characters x {n // max(len(tr.text), 1):,} "
            f"units over every layer and quantity), more than the limit of {max_values:,}; pick fewer with "
            f"--layers / --quantities, or use a shorter text")
    return (_asset("page.html")
            .replace("{{title}}", html.escape(title))
            .replace("{{css}}", _asset("page.css"))
            .replace("{{colour_js}}", _asset("colour.js"))
            .replace("{{page_js}}", _asset("page.js"))
            .replace("{{data}}", embed_json(page_data(tr, vocab, units, title, layers, quantities))))
