"""``charlm export --format web``: one self-contained HTML page that writes with the model in the browser.

The page (``assets/page.html``, ``page.css``, ``model.js``, ``page.js``, put together by :func:`render_page`) holds
the model's tensors and vocabulary and runs the model's step in plain JavaScript: no server, nothing fetched, so
it works from ``file://`` and offline. ``model.js`` has one step per kind of cell (:func:`layer_spec`); every cell
that exports to ONNX has one, and ``lstm-bn`` is refused for the same reason.

What the page holds is what its step reads, from the model in eval mode and in float64 before it is rounded to
the page's precision: per layer the recurrent tensors, the input projection's weight and its summed bias (or the
cell's own: ``gru``, ``mut1``, ``lstm-ln``), and ``mogrifier``'s prepared round matrices; then each output
LayerNorm and the decoder. Layer 0 reads embedding rows only, so its input projection is stored once per
character as a table (V, K) = ``cell.project(embedding)``: for the default model a fifth fewer numbers and a
quarter fewer multiplications per character. The page computes in float64 (JavaScript's numbers) from
these float32 or float16 values.

The numbers travel as one blob: every value in float16 (default) or float32, the bytes split into planes (every
value's first byte, then every second byte, ...: the high bytes of float16 weights repeat a lot), deflated (zlib),
base64. The browser inflates it with its own ``DecompressionStream``. The JSON beside it escapes ``<``, ``>``,
``&`` and ``/``, so no text ends its ``<script>`` element early.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from charlm import __version__
from charlm.cells.gru import GRUCell
from charlm.cells.lstm import GatedLSTMCell, GateRecurrentLSTMCell
from charlm.cells.mogrifier import MogrifierLSTMCell
from charlm.cells.mut_cells import MUT1Cell, MUT2Cell, MUT3Cell
from charlm.cells.norm_lstm import LayerNormLSTMCell
from charlm.cells.registry import cell_names, get_cell
from charlm.cells.rnn import ElmanCell, LinearCell
from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM, count_parameters
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.tools.export.onnx import NOT_EXPORTABLE
from charlm.tools.export.staging import check_out_file
from charlm.util.atomic import atomic_write_text
from charlm.util.errors import CharlmError

PAGE_FORMAT = "charlm-web"
PAGE_VERSION = 1
WEIGHTS = ("float16", "float32")  # --weights
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "/": "\\/"}


# The cells a page refuses, each with why: those a one-step export cannot hold, and those ``model.js`` has no
# step for (the cells of 2024 keep other state than h and c; their steps are not written in JavaScript yet).
NOT_ON_PAGE = {
    **NOT_EXPORTABLE,
    **{name: "model.js has no step for it" for name in ("mingru", "minlstm", "slstm")},
}


def web_cells() -> list[str]:
    """The cells a page can run: every cell but those in :data:`NOT_ON_PAGE`."""
    return [name for name in cell_names() if name not in NOT_ON_PAGE]


def check_web_exportable(cell: str) -> None:
    """Refuse, in one sentence naming the cells a page runs, a cell whose step the page cannot hold."""
    if cell in NOT_ON_PAGE:
        raise CharlmError(f"cell {cell} cannot be exported to a web page: {NOT_ON_PAGE[cell]}; the page runs "
                          f"{', '.join(web_cells())}")


@dataclass
class LayerPage:
    """One layer as the page runs it: its kind of step and options, its input projection, its tensors."""

    kind: str
    options: dict[str, Any]
    project: str  # "affine" (W x + b), "mut1", "ln" (lstm-ln) or "identity" (mogrifier); layer 0: its table
    tensors: dict[str, Tensor] = field(default_factory=dict)


def layer_spec(layer: RecurrentLayer) -> LayerPage:
    """The page's description of ``layer`` (its weights in float64, eval mode): which step of ``model.js`` runs
    it and the tensors that step and the input projection read, by the names ``model.js`` uses."""
    cell, q = layer.cell, layer.cell.prepare(layer._raw())
    h = cell.hidden_size
    kind = type(cell)
    affine = {"proj_weight": q["weight_ih"]}  # W x + b_ih + b_hh, as Cell.project (where the two biases match)
    if q["bias_ih"].shape == q["bias_hh"].shape:
        affine["proj_bias"] = q["bias_ih"] + q["bias_hh"]
    if kind is GatedLSTMCell or (kind is MogrifierLSTMCell and not cell.rounds):
        c = cell.config
        page = LayerPage("gated", {"blocks": "".join(c.blocks), "peep": "".join(c.peep_blocks), "coupled": c.coupled,
                                   "g_tanh": c.g_tanh, "out_tanh": c.out_tanh}, "affine", affine)
        if c.peephole:
            page.tensors["peephole"] = q["peephole"]
    elif kind is GateRecurrentLSTMCell:
        page = LayerPage("fgr", {}, "affine", {**affine, "peephole": q["peephole"], "weight_gg": q["weight_gg"]})
    elif kind is MogrifierLSTMCell:
        rounds = [q[f"half_{name}"] for name, _ in cell._round_shapes()]
        page = LayerPage("mogrifier", {"rounds": len(rounds)}, "identity",
                         {"weight_ih": q["weight_ih"], "bias": q["bias"], **{f"round{i}": m for i, m in
                                                                             enumerate(rounds, 1)}})
    elif kind is GRUCell:
        b_hh = q["bias_hh"]
        folded = b_hh if cell.reset_inside else torch.cat([b_hh[: 2 * h], b_hh.new_zeros(h)])
        page = LayerPage("gru", {"reset_inside": cell.reset_inside}, "affine",
                         {"proj_weight": q["weight_ih"], "proj_bias": q["bias_ih"] + folded})
        if not cell.reset_inside:
            page.tensors["bias_hn"] = b_hh[2 * h :]
    elif kind is ElmanCell:
        page = LayerPage("elman", {"relu": cell.relu}, "affine", affine)
    elif kind is LinearCell:
        page = LayerPage("linear", {}, "affine", affine)
    elif kind is MUT1Cell:
        page = LayerPage("mut1", {}, "mut1", {"proj_weight": q["weight_ih"], "proj_bias": q["bias_ih"],
                                               "post_bias": q["bias_hh"]})
    elif kind in (MUT2Cell, MUT3Cell):
        page = LayerPage(layer.cell_name, {}, "affine", affine)
    elif kind is LayerNormLSTMCell:
        page = LayerPage("lstm-ln", {}, "ln", {"proj_weight": q["weight_ih"], "ln_ih_weight": q["ln_ih_weight"],
                                               "proj_bias": q["bias_ih"] + q["bias_hh"],
                                               "ln_hh_weight": q["ln_hh_weight"], "ln_c_weight": q["ln_c_weight"],
                                               "ln_c_bias": q["ln_c_bias"]})
    else:
        raise CharlmError(f"cell {layer.cell_name} cannot be exported to a web page: the page has no step for it; "
                          f"it runs {', '.join(web_cells())}")
    page.tensors["weight_hh"] = q["weight_hh"]
    return page


@torch.no_grad()
def page_tensors(model: CharLM) -> tuple[list[LayerPage], dict[str, Tensor]]:
    """Every layer's :class:`LayerPage` and all the page's tensors by name (float64), layer 0's input projection
    made into its table."""
    m = copy.deepcopy(model).double().eval()
    layers = [layer_spec(layer) for layer in m.layers]
    first = m.layers[0].cell
    table = first.project(m.encoder.weight.unsqueeze(0), first.prepare(m.layers[0]._raw()), 0)[0]  # (V, K)
    for name in ("proj_weight", "proj_bias", "post_bias", "ln_ih_weight"):
        layers[0].tensors.pop(name, None)
    layers[0].tensors["table"] = table
    tensors: dict[str, Tensor] = {}
    for i, (page, norm) in enumerate(zip(layers, m.norms, strict=True)):
        tensors.update({f"layers.{i}.{name}": t for name, t in page.tensors.items()})
        if isinstance(norm, torch.nn.LayerNorm):
            tensors[f"layers.{i}.norm_weight"], tensors[f"layers.{i}.norm_bias"] = norm.weight, norm.bias
    tensors["decoder.weight"], tensors["decoder.bias"] = m.decoder.weight, m.decoder.bias
    return layers, tensors


def encode_values(tensors: dict[str, Tensor], weights: str) -> tuple[list[dict[str, Any]], int, str]:
    """(each tensor's name, shape and offset in values; the number of values; the blob: every value in
    ``weights``' precision, split into byte planes, deflated, base64)."""
    index, parts, offset = [], [], 0
    for name, t in tensors.items():
        index.append({"name": name, "shape": list(t.shape), "offset": offset})
        parts.append(t.detach().reshape(-1).numpy())
        offset += t.numel()
    values = np.concatenate(parts).astype(np.float16 if weights == "float16" else np.float32)
    if not np.isfinite(values).all():
        raise CharlmError("the model has weights beyond float16's range (65,504), so a float16 page cannot hold "
                          "them; export with --weights float32")
    planes = values.view(np.uint8).reshape(values.size, values.itemsize).T  # little-endian: the low byte first
    blob = zlib.compress(np.ascontiguousarray(planes).tobytes(), 9)
    return index, int(values.size), base64.b64encode(blob).decode("ascii")


def page_meta(model: CharLM, vocab: Vocab, config: Config, layers: list[LayerPage], index: list[dict[str, Any]],
              count: int, weights: str, title: str) -> dict[str, Any]:
    """The JSON the page reads: the model, its layers, where each tensor lies in the blob, the sampling defaults."""
    m = config.model
    return {
        "format": PAGE_FORMAT, "format_version": PAGE_VERSION, "charlm_version": __version__, "title": title,
        "cell": m.cell, "summary": get_cell(m.cell).summary, "num_layers": m.num_layers,
        "hidden_size": m.hidden_size, "embedding_size": m.embedding_size, "layer_norm": m.layer_norm,
        "tie_weights": m.tie_weights, "parameters": count_parameters(model), "vocab": list(vocab.chars),
        "sampling": {"temperature": config.sample.temperature, "prime": config.sample.prime,
                     "length": config.sample.length},
        "layers": [{"kind": page.kind, "options": page.options, "project": page.project,
                    "input": layer.input_size, "hidden": layer.hidden_size, "states": list(layer.cell.state_sizes()),
                    "tensors": sorted(page.tensors)} for page, layer in zip(layers, model.layers, strict=True)],
        "weights": {"dtype": weights, "planes": 2 if weights == "float16" else 4, "codec": "deflate",
                    "values": count, "tensors": index},
    }


def _asset(name: str) -> str:
    return resources.files("charlm.tools.export").joinpath("assets", name).read_text(encoding="utf-8")


def _embed_json(data: dict[str, Any]) -> str:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def render_page(model: CharLM, vocab: Vocab, config: Config, *, weights: str = "float16",
                title: str = "charlm") -> str:
    """The whole page as one string."""
    if weights not in WEIGHTS:
        raise CharlmError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    check_web_exportable(config.model.cell)
    layers, tensors = page_tensors(model)
    index, count, blob = encode_values(tensors, weights)
    meta = page_meta(model, vocab, config, layers, index, count, weights, title)
    parts = {"title": html.escape(title), "css": _asset("page.css"), "model_js": _asset("model.js"),
             "page_js": _asset("page.js"), "meta": _embed_json(meta), "weights": blob}
    # one pass over the template: no part is searched for placeholders in turn
    return re.sub(r"\{\{(\w+)\}\}", lambda match: parts[match[1]], _asset("page.html"))


def export_page(model: CharLM, vocab: Vocab, config: Config, out: str | Path, *, weights: str = "float16",
                title: str = "charlm", force: bool = False) -> Path:
    """Write the page to the file ``out`` (refused if it exists, unless ``force``), atomically: the page is made
    in memory, written beside ``out`` and renamed over it."""
    out = Path(out)
    check_out_file(out, force)
    atomic_write_text(out, render_page(model, vocab, config, weights=weights, title=title))
    return out
