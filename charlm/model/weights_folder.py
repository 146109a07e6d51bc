"""A model folder in the Hugging Face Hub's layout, read without unpickling anything.

``charlm export --format safetensors`` (:mod:`charlm.tools.export.hub`) writes the folder; this module is its
one reader, and :func:`charlm.model.checkpoint.load_model` hands it every path that is a folder, so each
command that takes ``--checkpoint`` takes such a folder too. The folder holds:

- ``model.safetensors``: the weights, float32, under the model's own ``state_dict`` names (:func:`folder_tensors`;
  ``docs/export.md`` lists them): ``encoder.weight`` (V, E), per layer ``layers.<i>.<param>_l0`` in nn.LSTM's
  layout (buffers such as ``lstm-bn``'s running statistics likewise), ``norms.<i>.weight`` / ``.bias`` with
  ``model.layer_norm``, ``decoder.weight`` (left out when tied: it is ``encoder.weight``), ``decoder.bias``.
- ``config.json``: ``format`` / ``format_version``, the whole charlm config (``config``: model, data, ...), the
  vocabulary as a list of characters in id order (``vocab``), the sampling defaults (``sampling``), and what
  the run recorded (``run``: ``global_step``, ``elapsed_s``, ``world_size``, and the card's figures).
- ``README.md``: the model card (not read here).

safetensors is a flat header of names, dtypes and shapes followed by raw bytes: reading it builds tensors and
runs no code, unlike a pickle. The ``safetensors`` package is the ``export`` extra.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from charlm.model.char_lm import CharLM
from charlm.util.errors import CharlmError

WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
FOLDER_FORMAT = "charlm-safetensors"
FOLDER_VERSION = 1
INSTALL_HINT = 'reading a safetensors model folder needs the safetensors package: pip install "charlm[export]"'
TIED_NAME = "decoder.weight"  # left out of the file when the decoder shares the embedding's matrix


@dataclass(frozen=True)
class FolderContents:
    """What a model folder holds, checked for type but not yet built into a model."""

    config: dict[str, Any]  # the charlm config as nested dicts (``Config.to_dict()``)
    vocab: str  # the characters in id order
    tensors: dict[str, Tensor]  # as in the file: ``decoder.weight`` absent when tied
    run: dict[str, Any]  # config.json's ``run`` section


def folder_tensors(model: CharLM) -> dict[str, Tensor]:
    """The tensors a folder stores, by name: the model's ``state_dict`` (float32, contiguous, on the CPU),
    less the decoder's matrix when it is the embedding's (safetensors stores every tensor once)."""
    state = model.state_dict()
    if model.config.tie_weights:
        state.pop(TIED_NAME)
    return {name: t.detach().float().cpu().contiguous() for name, t in state.items()}


def with_tied_decoder(tensors: dict[str, Tensor], tie_weights: bool) -> dict[str, Tensor]:
    """The ``state_dict`` to load from stored tensors: the decoder's matrix put back where it is tied and was
    left out (a folder's); anything else as it is."""
    if tie_weights and "encoder.weight" in tensors and TIED_NAME not in tensors:
        return {**tensors, TIED_NAME: tensors["encoder.weight"]}
    return tensors


def read_folder(path: Path) -> FolderContents:
    """The checked contents of the model folder ``path``; every way it can be wrong gets one sentence."""
    weights, config_file = path / WEIGHTS_FILE, path / CONFIG_FILE
    if not weights.is_file() and not config_file.is_file():  # not a model folder at all (a run's folder, say)
        inside = [path / name for name in ("best.ckpt", "last.ckpt") if (path / name).is_file()]
        raise CharlmError(f"checkpoint {path} is a folder, not a checkpoint file; give a .ckpt file"
                          + (f", such as {inside[0]}" if inside else "")
                          + ", or a folder written by `charlm export --format safetensors`")
    if not weights.is_file():
        raise CharlmError(f"checkpoint folder {path} has no {WEIGHTS_FILE}; give a folder written by `charlm export "
                          "--format safetensors`, or a .ckpt file")
    if not config_file.is_file():
        raise CharlmError(f"checkpoint folder {path} has no {CONFIG_FILE}; give a folder written by `charlm export "
                          "--format safetensors`, or a .ckpt file")
    meta = _read_config(config_file)
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CharlmError(INSTALL_HINT) from None
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CharlmError(f"{weights} is not a readable safetensors file (truncated, corrupt, or another format): "
                          f"{' '.join(str(exc).split())[:200]}") from None
    return FolderContents(meta["config"], "".join(meta["vocab"]), tensors, meta.get("run") or {})


def _read_config(path: Path) -> dict[str, Any]:
    """config.json, checked: the format and version, a config mapping, a vocabulary of single characters."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CharlmError(f"{path} is not UTF-8 text; it must be the JSON `charlm export` wrote") from None
    except json.JSONDecodeError as exc:
        raise CharlmError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                          "it must be the JSON `charlm export` wrote") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise CharlmError(f"{path} is not a charlm model folder's config (its \"format\" is not "
                          f"\"{FOLDER_FORMAT}\"); give a folder written by `charlm export --format safetensors`")
    if meta.get("format_version") != FOLDER_VERSION:
        raise CharlmError(f"{path} was written by an incompatible charlm (folder format {meta.get('format_version')}, "
                          f"this charlm reads format {FOLDER_VERSION}); export it again")
    if not isinstance(meta.get("config"), dict):
        raise CharlmError(f"{path} has no \"config\" mapping (the charlm config); export the folder again")
    vocab = meta.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
        raise CharlmError(f"{path} has no valid \"vocab\" (a list of single characters in id order); export the "
                          "folder again")
    run = meta.get("run")
    if run is not None and not isinstance(run, dict):
        raise CharlmError(f"{path} has a \"run\" that is not a mapping; export the folder again")
    return meta


def checkpoint_view(contents: FolderContents, format_version: int) -> dict[str, Any]:
    """The folder's record in a Lightning checkpoint's keys (``hyper_parameters``, ``global_step``, ``elapsed_s``,
    ``resume_state.world_size``), so what reads a checkpoint's record (``charlm eval``'s stream count, the
    serve page) reads a folder's alike; it holds no weights."""
    run = contents.run
    world = run.get("world_size")
    view: dict[str, Any] = {
        "hyper_parameters": {"config": contents.config, "vocab": contents.vocab, "format_version": format_version},
        "resume_state": {"world_size": world if isinstance(world, int) and world >= 1 else 1},
    }
    if isinstance(run.get("global_step"), int):
        view["global_step"] = run["global_step"]
    elapsed = run.get("elapsed_s")
    if isinstance(elapsed, (int, float)) and math.isfinite(elapsed):
        view["elapsed_s"] = float(elapsed)
    return view
