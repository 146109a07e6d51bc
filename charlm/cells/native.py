"""The compiled time loops of ``lstm-ln`` / ``lstm-bn`` (``csrc/norm_lstm.cpp``), built on first use.

The Python kernel of :mod:`charlm.cells.fused_norm` pays, every step, for a dozen ATen calls on
(B, 4H) rows, each a pass over memory with its own dispatch. The C++ loops do the same math in one
to five fused passes per step (the norm statistics, the gate nonlinearities, the cell update and the
cell norm), split between the threads, and call back into PyTorch only for the step's product.

The library is built once per machine by PyTorch's extension builder (a C++ compiler and ninja;
about 15 s) into ``$XDG_CACHE_HOME/charlm/native`` (or ``$CHARLM_NATIVE_DIR``), one folder per
PyTorch version, Python version and instruction set, and loaded as ``torch.ops.charlm`` ops (a plain
shared library: no Python module, nothing runs at load but the ops' registration).

Where it cannot be built (no compiler, a failed build) the Python kernel runs instead, after one
warning that says why; ``CHARLM_NATIVE=0`` turns the C++ kernel off without trying to build it.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "norm_lstm.cpp"
NAME = "charlm_norm_lstm"
# The loops are auto-vectorised for the instruction set PyTorch itself dispatches to on this CPU.
ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

# PyTorch's builder takes a lock file in the build folder and waits, without end, while one exists; a build
# killed half-way (Ctrl-C) leaves it behind. A build takes about 15 s, so a lock this old is stale.
STALE_LOCK_S = 600

_loaded: bool | None = None  # None: not tried in this process yet
_enabled = True


def build_directory() -> Path:
    """Where the library is built and cached."""
    root = os.environ.get("CHARLM_NATIVE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charlm" / "native")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    arch = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}".lower()
    return Path(root) / f"torch{torch.__version__.replace('+', '_')}-{py}-{arch}"


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags): optimised, vectorised for this CPU, OpenMP threads on Linux.

    ``-fno-trapping-math`` (no floating-point traps are used) lets the compiler vectorise branch-free
    selects such as the exp polynomial's clamp; without it only AVX-512's masked moves manage."""
    cflags = ["-O3", "-fno-trapping-math", *ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    if sys.platform.startswith("linux"):  # the same libgomp as PyTorch's, already loaded
        return [*cflags, "-fopenmp"], ["-fopenmp"]
    return cflags, []


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        print(f"charlm: removing {lock}, left by a build that did not finish", file=sys.stderr)
        lock.unlink(missing_ok=True)
    if not any(directory.glob(f"{NAME}.*")):
        print(f"charlm: building the C++ kernel of lstm-ln / lstm-bn (once) in {directory}", file=sys.stderr)
    cflags, ldflags = compile_flags()
    saved_path = os.environ.get("PATH", "")
    # ninja from pip lives beside this Python, which need not be on PATH (a venv used without activating it)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved_path])
    try:
        cpp_extension.load(
            name=NAME, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
            build_directory=str(directory), is_python_module=False, verbose=False,
        )
    finally:
        os.environ["PATH"] = saved_path


def build_error(err: Exception) -> str:
    """The telling line of a failed build: the compiler's first error (or the shell's word on a missing
    compiler), else the message's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    words = ("error", "not found", "no such file")
    telling = [line for line in lines if any(w in line.lower() for w in words)]
    telling = [line for line in telling if not line.startswith("Error building extension")]
    return (telling or lines or [type(err).__name__])[0 if telling else -1]


def available() -> bool:
    """Whether the C++ kernel is on and loaded, building and loading it on the first call."""
    global _loaded
    if not _enabled or os.environ.get("CHARLM_NATIVE", "1") == "0":
        return False
    if _loaded is None:
        try:
            _build_and_load()
            _loaded = hasattr(torch.ops.charlm, "norm_lstm_forward")
        except Exception as err:  # no compiler, no ninja, a failed build: the Python kernel runs instead
            _loaded = False
            why = build_error(err)
            warnings.warn(
                f"charlm: could not build the C++ kernel of lstm-ln / lstm-bn ({why}); "
                "they run the slower Python kernel. Install a C++ compiler and ninja, or set CHARLM_NATIVE=0 "
                "to skip the build.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loaded


@contextmanager
def native_off() -> Iterator[None]:
    """Inside the block the normalised LSTMs run the Python kernel (for side-by-side checks)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
