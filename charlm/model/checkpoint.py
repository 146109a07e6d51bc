"""Checkpoints read without running code, found by run, and the model they hold.

A checkpoint is Lightning's ``.ckpt`` dictionary. Its ``hyper_parameters`` hold only primitives (the
config as nested dicts and the vocabulary as a string), so ``torch.load(..., weights_only=True)``
reads it: unpickling can build tensors and plain containers, never call arbitrary code.

A checkpoint may also be a model folder (``model.safetensors`` + ``config.json``, as ``charlm export --format
safetensors`` writes it): :func:`load_model` reads a folder through :mod:`charlm.model.weights_folder`, which
never unpickles anything, and builds the model the same way.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from charlm import __version__
from charlm.config import Config, from_dict
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM
from charlm.model.weights_folder import CONFIG_FILE, WEIGHTS_FILE, checkpoint_view, read_folder, with_tied_decoder
from charlm.util.atomic import path_kind
from charlm.util.errors import CharlmError

FORMAT_VERSION = 1  # bump when a checkpoint of the previous layout can no longer be read

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: (.+)")


def _load_failure(path: Path, exc: BaseException) -> CharlmError:
    """One clear message for why ``torch.load(path, weights_only=True)`` failed.

    torch's own text starts by suggesting ``weights_only=False``, the one thing never to do with a file
    of unknown origin, so only the reason is kept.
    """
    text = " ".join(str(exc).split())
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return CharlmError(
            f"refused to load {path}: unpickling it would call {unsafe.group(1)}, which can run code. A charlm "
            "checkpoint holds only tensors and plain values; only load checkpoints you trust, made by charlm.")
    reason = _UNPICKLER_ERROR.search(text)
    detail = reason.group(1) if reason else f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return CharlmError(f"{path} is not a readable checkpoint (truncated, corrupt, or not a checkpoint); "
                       f"refused to load it: {detail[:200]}")


def safe_load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; every way it can be wrong gets one clear message."""
    path = Path(path)
    kind = path_kind(path)
    if kind is None:
        raise CharlmError(f"checkpoint {path} does not exist")
    if kind == "a folder":
        inside = [path / name for name in ("best.ckpt", "last.ckpt") if (path / name).is_file()]
        raise CharlmError(f"checkpoint {path} is a folder, not a checkpoint file; give a .ckpt file"
                          + (f", such as {inside[0]}" if inside else ""))
    if kind != "a regular file":
        raise CharlmError(f"checkpoint {path} is {kind}, not a checkpoint file; give a .ckpt file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CharlmError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # torch.load fails in many ways on a file it cannot read; all are answered here
        raise _load_failure(path, exc) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CharlmError(f"{path} is not a charlm checkpoint (no state_dict / hyper_parameters)")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) or "config" not in hp or "vocab" not in hp:
        raise CharlmError(f"{path} is not a charlm checkpoint (no config / vocabulary)")
    version = hp.get("format_version")
    if version != FORMAT_VERSION:
        raise CharlmError(f"{path} was written by an incompatible charlm (checkpoint format {version}, "
                          f"this is charlm {__version__} with format {FORMAT_VERSION}); retrain it")
    return ckpt


def newest_run_checkpoint(out_dir: str | Path = "checkpoints", name: str = "best.ckpt",
                          option: str = "--checkpoint") -> Path:
    """``<out>/<run>/<name>`` of the run written most recently (``option`` names the flag in the error)."""
    out = Path(out_dir)
    found = [p for p in out.glob(f"*/{name}") if p.is_file()]
    if not found:
        raise CharlmError(f"no checkpoint found under {out}/ (looked for {out}/<run>/{name}); "
                          f"train one with `charlm train` or pass {option} FILE")
    return max(found, key=lambda p: p.stat().st_mtime)


def _weights_mismatch(what: str, state: dict[str, Any], model: torch.nn.Module, vocab_size: int,
                      model_config: Any) -> str | None:
    """What does not fit between the weights ``what`` holds and the model its config and vocabulary describe
    (shapes of parameters only: a buffer such as lstm-bn's per-step statistics grows as it loads)."""
    expected, params = model.state_dict(), dict(model.named_parameters())
    rows = state.get("encoder.weight")
    if isinstance(rows, torch.Tensor) and rows.dim() == 2 and rows.shape[0] != vocab_size:
        return (f"{what} was trained with a vocabulary of {rows.shape[0]} characters, but the vocabulary "
                f"stored with it has {vocab_size}; the file was altered or damaged: use another checkpoint or retrain")
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in params.keys() & state.keys()
                      if not isinstance(state[k], torch.Tensor) or state[k].shape != params[k].shape)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        found = list(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {found} in the file, "
                     f"{list(params[k].shape)} in the model)")
    if not parts:
        return None
    m = model_config
    return (f"{what} holds weights that do not fit the model its config describes (cell {m.cell}, "
            f"{m.num_layers} layer(s) of {m.hidden_size}, embedding {m.embedding_size}): {'; '.join(parts)}; "
            f"the file was altered, or written by a charlm whose models differ from this one ({__version__})")


def load_model(path: str | Path) -> tuple[CharLM, Vocab, Config, dict[str, Any]]:
    """(model in eval mode, vocab, config, raw checkpoint) from a checkpoint file, or from a model folder (then
    the last item is the folder's record in a checkpoint's keys: :func:`charlm.model.weights_folder.checkpoint_view`),
    without Lightning."""
    path = Path(path)
    if path.is_dir():
        contents = read_folder(path)
        hp: dict[str, Any] = {"config": contents.config, "vocab": contents.vocab}
        what, ckpt = f"checkpoint folder {path}", checkpoint_view(contents, FORMAT_VERSION)
        weights_of, saved = f"{path / WEIGHTS_FILE} (with its {CONFIG_FILE})", contents.tensors
    else:
        ckpt = safe_load(path)
        hp = ckpt["hyper_parameters"]
        what = weights_of = f"checkpoint {path}"
        saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        config = from_dict(hp["config"])
    except (CharlmError, KeyError, TypeError, AttributeError) as exc:
        # a config key this version does not know: the one case a newer charlm is the likely cause
        raise CharlmError(f"{path} does not match this version of charlm: {' '.join(str(exc).split())}") from None
    try:
        vocab = Vocab(hp["vocab"], origin=what)
    except (CharlmError, TypeError) as exc:
        raise CharlmError(f"{what} holds a damaged vocabulary ({' '.join(str(exc).split())}); "
                          "use another checkpoint or retrain") from None
    try:
        model = CharLM(len(vocab), config.model)
    except (CharlmError, RuntimeError, ValueError, TypeError) as exc:
        raise CharlmError(f"{what} describes a model this charlm ({__version__}) cannot build: "
                          f"{' '.join(str(exc).split())}") from None
    state = with_tied_decoder(saved, config.model.tie_weights)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CharlmError(_weights_mismatch(weights_of, state, model, len(vocab), config.model) or
                          f"{what} holds weights this charlm ({__version__}) cannot load: "
                          f"{' '.join(str(exc).split())}") from None
    model.eval()
    return model, vocab, config, ckpt
