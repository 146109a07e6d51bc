"""The checkpoints a server offers: listed at start, each loaded on first use, a few kept in memory.

A checkpoint is loaded only through :func:`charlm.model.checkpoint.load_model` (``weights_only=True``; a model
folder of ``charlm export --format safetensors`` is read without unpickling at all): what a page asks for never
makes the server run code from a file.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charlm.data.vocab import Vocab
from charlm.evaluation.metrics import LN2
from charlm.evaluation.scoring import nonfinite_parameters
from charlm.model.char_lm import CharLM, count_parameters
from charlm.model.checkpoint import load_model
from charlm.util.errors import CharlmError


@dataclass(frozen=True)
class Entry:
    """One checkpoint on offer: ``id`` is what a request names, ``label`` what the page shows."""

    id: str
    label: str
    path: Path


@dataclass(frozen=True)
class Loaded:
    """A loaded checkpoint: its model (eval mode, CPU), vocabulary, and what the page says about it."""

    model: CharLM
    vocab: Vocab
    summary: dict[str, Any]

    def private_model(self) -> CharLM:
        """A copy of the model for one generation: a layer's ``step`` keeps a time index (``lstm-bn`` reads
        its per-step statistics by it), so two generations never step the same module."""
        return copy.deepcopy(self.model)


def stored_val_loss(ckpt: dict[str, Any]) -> float | None:
    """The best validation loss (nats/char) the checkpoint callback recorded in the file, if any.

    Lightning keeps it in the ``ModelCheckpoint`` state under ``callbacks`` (``best_model_score``, with
    ``monitor`` = ``val_loss``); a checkpoint saved without that callback has none."""
    callbacks = ckpt.get("callbacks")
    if not isinstance(callbacks, dict):
        return None
    for state in callbacks.values():
        if isinstance(state, dict) and state.get("monitor") == "val_loss":
            score = state.get("best_model_score")
            try:
                return float(score) if score is not None else None
            except (TypeError, ValueError, RuntimeError):
                return None
    return None


def summarize(entry: Entry, model: CharLM, vocab: Vocab, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the page shows about a checkpoint: cell, size, vocabulary, stored validation bpc."""
    m = model.config
    loss = stored_val_loss(ckpt)
    return {"id": entry.id, "label": entry.label, "cell": m.cell, "num_layers": m.num_layers,
            "hidden_size": m.hidden_size, "embedding_size": m.embedding_size,
            "parameters": count_parameters(model), "vocab_size": len(vocab),
            "val_bpc": None if loss is None else loss / LN2, "global_step": ckpt.get("global_step")}


def _unique_labels(paths: list[Path]) -> list[str]:
    """``run/best.ckpt`` for each path (the run's folder and the file), the whole path where that repeats."""
    short = [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths, strict=True)]


class Registry:
    """The checkpoints on offer (ids ``0``, ``1``, ...) and a least-recently-used cache of loaded models."""

    def __init__(self, paths: list[Path], cache_size: int = 2) -> None:
        if not paths:
            raise CharlmError("no checkpoint to serve: pass --checkpoint FILE (repeatable) or --runs FOLDER")
        if cache_size < 1:
            raise CharlmError(f"--cache must be at least 1 (models kept in memory), got {cache_size}")
        missing = [p for p in paths if not (p.is_file() or p.is_dir())]  # a file, or a model folder
        if missing:
            raise CharlmError(f"checkpoint {missing[0]} does not exist" +
                              (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        labels = _unique_labels(paths)
        self.entries = {str(i): Entry(str(i), labels[i], p) for i, p in enumerate(paths)}
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()  # held while a checkpoint loads: two requests never load one twice

    @classmethod
    def from_runs(cls, runs: Path, name: str = "best.ckpt", cache_size: int = 2) -> Registry:
        """Every ``<runs>/<run>/best.ckpt``, by run name."""
        if not runs.is_dir():
            raise CharlmError(f"--runs {runs} is not a folder")
        found = sorted(p for p in runs.glob(f"*/{name}") if p.is_file())
        if not found:
            raise CharlmError(f"no checkpoint under {runs}/ (looked for {runs}/<run>/{name}); "
                              "train one with `charlm train` or pass --checkpoint FILE")
        return cls(found, cache_size)

    def listing(self) -> list[dict[str, Any]]:
        """The checkpoints, in order, with whatever is known of each without loading it."""
        return [{"id": e.id, "label": e.label, "loaded": e.id in self._cache} for e in self.entries.values()]

    def entry(self, checkpoint_id: object) -> Entry:
        entry = self.entries.get(checkpoint_id) if isinstance(checkpoint_id, str) else None
        if entry is None:
            known = ", ".join(self.entries)
            raise CharlmError(f"there is no checkpoint {checkpoint_id!r} on this server; it offers {known}")
        return entry

    def get(self, checkpoint_id: object) -> Loaded:
        """The loaded checkpoint (from the cache, else read now; the least recently used one leaves)."""
        entry = self.entry(checkpoint_id)
        with self._lock:
            if entry.id in self._cache:
                self._cache.move_to_end(entry.id)
                return self._cache[entry.id]
            model, vocab, _, ckpt = load_model(entry.path)
            bad = nonfinite_parameters(model)
            if bad:
                raise CharlmError(f"checkpoint {entry.label} has weights that are NaN or inf ({len(bad)} tensor(s), "
                                  f"e.g. {bad[0]}), so it cannot generate text; choose another checkpoint")
            loaded = Loaded(model, vocab, summarize(entry, model, vocab, ckpt))
            self._cache[entry.id] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return loaded
