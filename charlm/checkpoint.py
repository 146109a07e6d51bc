"""Checkpoints: written atomically, read without running code, found by run.

A checkpoint is Lightning's ``.ckpt`` dictionary. Its ``hyper_parameters`` hold only primitives (the
config as nested dicts and the vocabulary as a string), so ``torch.load(..., weights_only=True)``
reads it: unpickling can build tensors and plain containers, never call arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from charlm import __version__
from charlm.errors import CharlmError

FORMAT_VERSION = 1  # bump when a checkpoint of the previous layout can no longer be read


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a torn one; a full disk
    raises here and leaves the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def safe_load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; every way it can be wrong gets one clear message."""
    path = Path(path)
    if not path.is_file():
        raise CharlmError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CharlmError(
            f"refused to load {path}: it holds objects that would run code when unpickled "
            f"({str(exc).splitlines()[0][:200]}). Only load checkpoints you trust, made by charlm.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CharlmError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                          f"{str(exc).splitlines()[0][:200]}") from None
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that saves atomically and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        safe_load(path)  # clear errors first
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def newest_run_checkpoint(out_dir: str | Path = "checkpoints", name: str = "best.ckpt") -> Path:
    """``<out>/<run>/<name>`` of the run written most recently."""
    out = Path(out_dir)
    found = [p for p in out.glob(f"*/{name}") if p.is_file()]
    if not found:
        raise CharlmError(f"no checkpoint found under {out}/ (looked for {out}/<run>/{name}); "
                          "train one with `charlm train` or pass --checkpoint FILE")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_model(path: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model in eval mode, vocab, config, raw checkpoint) from a checkpoint, without Lightning."""
    from charlm.config import from_dict
    from charlm.model import CharLM
    from charlm.vocab import Vocab

    ckpt = safe_load(path)
    hp = ckpt["hyper_parameters"]
    try:
        config = from_dict(hp["config"])
        vocab = Vocab(hp["vocab"])
        model = CharLM(len(vocab), config.model)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
    except (CharlmError, RuntimeError, KeyError, TypeError) as exc:
        raise CharlmError(f"{path} does not match this version of charlm: {str(exc).splitlines()[0][:300]}"
                          ) from None
    model.eval()
    return model, vocab, config, ckpt
