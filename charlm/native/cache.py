"""Where charlm keeps its built C++ libraries, found without importing torch (``charlm env`` looks there)."""

from __future__ import annotations

import os
from pathlib import Path

LIBRARY_SUFFIXES = (".so", ".pyd", ".dylib")


def cache_root() -> Path:
    """``$CHARLM_NATIVE_DIR``, else ``$XDG_CACHE_HOME/charlm/native``, else ``~/.cache/charlm/native``."""
    root = os.environ.get("CHARLM_NATIVE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charlm" / "native"


def built_libraries(folder: Path) -> list[str]:
    """The names of the libraries built in ``folder`` (``charlm_norm_lstm``, ...), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("charlm_*") if p.suffix in LIBRARY_SUFFIXES)
