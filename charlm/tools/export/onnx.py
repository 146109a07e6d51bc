"""ONNX export: one step of a trained model as an ONNX graph, and a JSON that says how to drive it.

The graph is :class:`OnnxStep`: token ids (N,) and every layer's state in, logits (N, V) and the new
state out, N (the streams stepped side by side) left dynamic. It is written with plain tensor ops from
each cell's own ``project`` + ``step`` (the path ``CharLM.step`` takes for custom cells), never from a
fused kernel: the torch RNN ops behind ``lstm`` / ``gru`` / ``rnn`` / ``irnn``, the hand-written
backward-through-time kernels and the C++ loops of ``lstm-ln`` are all training paths, and each of those
cells' ``step`` computes the same function (``tests/test_cells_exact.py``). ``lstm-bn`` is refused: its
batch-norm statistics are kept per time step, so its step depends on the position in the window.

Beside ``model.onnx`` the export writes ``model.json``: the vocabulary (characters in id order), the
cell, each input and output by name and shape, the state layout (per layer: names and shapes; it starts
at zeros) and the sampling defaults of the checkpoint's ``sample`` section. Both files are written in a
temporary folder beside the target and moved in only when complete, so a failed export leaves nothing.

The exporter is PyTorch's TorchScript-based one (``dynamo=False``): the graph is a fixed, branch-free
step, which tracing captures exactly, and tracing is far quicker than ``torch.export`` (``dynamo=True``,
which also works) for the test that exports every cell. Checked with torch 2.13, where it is deprecated
but present; ``tests/test_export.py`` fails if it stops producing a graph that matches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from charlm import __version__
from charlm.cells.onednn_matmul import onednn_off
from charlm.config import Config
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM
from charlm.util.atomic import FOLDER_MODE, atomic_write_text, check_output_folder, fsync_folder, rename_into_place
from charlm.util.errors import CharlmError

FORMATS = ("onnx",)
ONNX_FILE, META_FILE = "model.onnx", "model.json"
META_FORMAT = "charlm-onnx-step"
META_VERSION = 1
OPSET = 17
INSTALL_HINT = 'ONNX export needs the onnx and onnxruntime packages: pip install "charlm[export]"'

# cells whose step an ONNX graph cannot hold, and why (one sentence each, for the error message)
NOT_EXPORTABLE = {
    "lstm-bn": "its batch-norm statistics are kept per time step, so one step depends on its position in the "
               "window, which a one-step graph does not carry",
}
_STATE_NAMES = {1: ("h",), 2: ("h", "c"), 3: ("h", "c", "gates")}  # fgr's third state: the previous i, f, o


def require_onnx() -> None:
    """Raise the one-sentence install hint when the export extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CharlmError(INSTALL_HINT) from None


def check_exportable(cell: str) -> None:
    """Refuse, in one sentence, a cell whose step cannot be an ONNX graph."""
    if cell in NOT_EXPORTABLE:
        raise CharlmError(f"cell {cell} cannot be exported to ONNX: {NOT_EXPORTABLE[cell]}")


@dataclass(frozen=True)
class StateSlot:
    """One state tensor of one layer: graph input ``name``, output ``name + '_next'``, shape (N, size)."""

    layer: int
    kind: str  # "h", "c" or "gates"
    size: int

    @property
    def name(self) -> str:
        return f"l{self.layer}_{self.kind}"

    @property
    def next_name(self) -> str:
        return f"{self.name}_next"


def state_slots(model: CharLM) -> list[StateSlot]:
    """Every state tensor of the model, layer by layer, in the order the graph takes and returns them."""
    return [StateSlot(i, kind, size) for i, layer in enumerate(model.layers)
            for kind, size in zip(_STATE_NAMES[layer.num_states], layer.cell.state_sizes(), strict=True)]


class OnnxStep(nn.Module):
    """One step of ``model`` (eval mode) in plain tensor ops: (ids (N,), *states (N, S)) -> (logits (N, V),
    *new states). The same function as :meth:`charlm.model.char_lm.CharLM.step`, with the states flattened and
    without their leading layer axis."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        h = m.encoder(ids)  # (N, E)
        new_states: list[Tensor] = []
        k = 0
        for layer, norm in zip(m.layers, m.norms, strict=True):
            n = layer.num_states
            q = layer.cell.prepare(layer._raw())  # the raw weights: no weight drop in eval
            xw = layer.cell.project(h.unsqueeze(0), q, 0)[0]  # (N, K)
            state = layer.cell.step(xw, tuple(states[k : k + n]), q, 0)  # the plain step, never compiled
            k += n
            h = norm(state[0])
            new_states.extend(state)
        return (m.decoder(h), *new_states)


def _zero_states(model: CharLM, n: int) -> list[Tensor]:
    return [torch.zeros(n, slot.size) for slot in state_slots(model)]


def write_onnx(model: CharLM, path: Path) -> None:
    """Trace :class:`OnnxStep` of ``model`` into the ONNX file ``path`` (N dynamic)."""
    slots = state_slots(model)
    inputs = ["ids"] + [s.name for s in slots]
    outputs = ["logits"] + [s.next_name for s in slots]
    was_training = model.training
    step = OnnxStep(model).eval()  # the exporter restores the mode it found: eval, so nothing changes
    example = (torch.zeros(2, dtype=torch.long), *_zero_states(model, 2))
    try:
        with onednn_off(), warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter's deprecation notice, and its tracer's notes on Python-side checks of
            # shapes (constant for a given model), are not the user's concern
            warnings.simplefilter("ignore")
            torch.onnx.export(step, example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes={name: {0: "N"} for name in inputs + outputs}, opset_version=OPSET)
    finally:
        model.train(was_training)


def metadata(model: CharLM, vocab: Vocab, config: Config) -> dict[str, Any]:
    """The JSON written beside the graph: how to feed it, what its outputs mean, how to sample."""
    slots = state_slots(model)
    layers = []
    for i in range(len(model.layers)):
        mine = [s for s in slots if s.layer == i]
        layers.append({"layer": i, "names": [s.kind for s in mine], "inputs": [s.name for s in mine],
                       "outputs": [s.next_name for s in mine], "shapes": [["N", s.size] for s in mine]})
    return {
        "format": META_FORMAT, "format_version": META_VERSION, "charlm_version": __version__,
        "onnx_file": ONNX_FILE, "opset": OPSET, "cell": config.model.cell,
        "vocab": vocab.chars, "vocab_size": len(vocab),
        "inputs": {"ids": {"shape": ["N"], "dtype": "int64"},
                   **{s.name: {"shape": ["N", s.size], "dtype": "float32"} for s in slots}},
        "outputs": {"logits": {"shape": ["N", len(vocab)], "dtype": "float32"},
                    **{s.next_name: {"shape": ["N", s.size], "dtype": "float32"} for s in slots}},
        "state": {"initial": "zeros", "layers": layers},
        "sampling": {"temperature": config.sample.temperature, "top_k": getattr(config.sample, "top_k", None),
                     "prime": config.sample.prime},
    }


def verify(model: CharLM, path: Path, steps: int = 4, n: int = 3) -> float:
    """Run the graph in onnxruntime next to ``CharLM.step`` for a few steps; the largest logit difference."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    slots = state_slots(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.decoder.out_features, (steps, n), generator=gen)
    feed_states = [np.zeros((n, s.size), np.float32) for s in slots]
    states = None
    worst = 0.0
    with torch.no_grad():
        for t in range(steps):
            logits, states = model.step(ids[t], states)
            got = session.run(None, {"ids": ids[t].numpy(), **{s.name: v for s, v in zip(slots, feed_states,
                                                                                          strict=True)}})
            feed_states = got[1:]
            worst = max(worst, float(np.abs(got[0] - logits.numpy()).max()))
    return worst


def export_model(model: CharLM, vocab: Vocab, config: Config, out: str | Path, *, force: bool = False) -> list[Path]:
    """Write ``model.onnx`` and ``model.json`` into the folder ``out``; returns the two paths.

    ``out`` may be missing or empty; a folder holding files is refused unless ``force``, which replaces
    these two files (each by one rename) and leaves anything else in it alone. Nothing is half-written:
    both files are made in a temporary folder beside ``out`` first."""
    require_onnx()
    check_exportable(config.model.cell)
    out = check_output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CharlmError(f"--out {out} already holds files; choose a new or empty folder, or add --force to "
                          f"replace its {ONNX_FILE} and {META_FILE}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_onnx(model, staging / ONNX_FILE)
        _check_graph(model, staging / ONNX_FILE)
        atomic_write_text(staging / META_FILE, json.dumps(metadata(model, vocab, config), indent=2) + "\n")
        _move_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / ONNX_FILE, out / META_FILE]


def _check_graph(model: CharLM, path: Path) -> None:
    """The ONNX checker, then the graph against ``CharLM.step``: a wrong graph is never handed out."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise CharlmError(f"the exported graph is not valid ONNX ({' '.join(str(exc).split())[:200]})") from None
    worst = verify(model, path)
    if not worst <= 1e-3:  # float rounding of the same ops stays far below this
        raise CharlmError(f"the exported graph's logits differ from charlm's by {worst:.3g}, so it was not written; "
                          "please report this with `charlm cells` and the checkpoint's cell")


def _move_in(staging: Path, out: Path) -> None:
    """Put the finished files in place: the whole folder in one rename where ``out`` is missing or empty,
    else (``--force``) each file by its own rename."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.chmod(staging, FOLDER_MODE)
        rename_into_place(staging, out)  # the caller's cleanup then finds nothing left to remove
    else:
        for name in (ONNX_FILE, META_FILE):
            rename_into_place(staging / name, out / name)
    fsync_folder(out)
