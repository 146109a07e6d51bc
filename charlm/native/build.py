"""Building and loading charlm's C++ libraries (``csrc/``): one builder for every library, the cache folder,
the lock, and one switch to turn them all off.

A library is built once per machine by PyTorch's extension builder (a C++ compiler and ninja) into
``$XDG_CACHE_HOME/charlm/native`` (or ``$CHARLM_NATIVE_DIR``), one folder per PyTorch version, Python
version, instruction set and hash of the sources, the headers beside them and the compiler flags (so two
checkouts with different sources keep one build each), from a copy of the sources kept in that folder (so
checkouts with the same sources share it), and loaded as ``torch.ops.charlm`` ops (a plain shared library: no
Python module, nothing runs at load but the ops' registration). ``charlm train`` builds what a run needs
before training starts, so the build does not count against ``--max-time``.

Builds and loads hold an OS lock on the folder (``filelock``; the kernel releases it when its holder
dies): a second process waits for the first, saying so, and a lock file of PyTorch's builder found
while holding it was left by a killed build and is removed (PyTorch's builder would wait on it for ever).

Where a library cannot be built (no compiler, a failed build) its users run their Python code instead,
after one warning that says why; ``CHARLM_NATIVE=0`` turns every library off without trying to build it,
and :func:`cpp_off` inside a block. (The environment variables and the cache folder keep their first names,
``NATIVE``, which users may have set.)

The libraries: ``norm_lstm.cpp`` (the time loops of ``lstm-ln`` / ``lstm-bn``,
:mod:`charlm.cells.norm_lstm_cpp`), ``model_step.cpp`` + ``fused_step.cpp`` (``CharLM``'s step for sampling,
:mod:`charlm.model.fast_step`); ``fast_math.h`` is shared by them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from charlm.native.cache import cache_root
from charlm.util.switch import Switch

CSRC = Path(__file__).with_name("csrc")  # every library's sources and the headers they share

# The loops are auto-vectorised for the instruction set PyTorch itself dispatches to on this CPU.
ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

# Ours, held while building or loading; PyTorch's builder takes the other one, its own "lock" file, and
# waits without end while one exists (a build killed half-way leaves it behind).
LOCK_NAME = "charlm-build.lock"
TORCH_LOCK_NAME = "lock"

_loaded: dict[str, bool] = {}  # library name -> loaded; not there: not tried in this process yet
_enabled = Switch()


Sources = Path | Sequence[Path]  # a library's source file, or its several (one folder)


def _paths(sources: Sources) -> list[Path]:
    return [sources] if isinstance(sources, Path) else list(sources)


def build_directory(source: Sources) -> Path:
    """Where a library is built and cached: a folder per PyTorch, Python, instruction set, sources and flags."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    arch = f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}".lower()
    cflags, ldflags = compile_flags()
    paths = _paths(source)
    key = hashlib.sha256(paths[0].read_bytes())
    for extra in [*paths[1:], *headers(paths[0].parent)]:
        key.update(extra.name.encode() + b"\0" + extra.read_bytes())
    key.update("\0".join(["cflags", *cflags, "ldflags", *ldflags]).encode())
    return cache_root() / f"torch{torch.__version__.replace('+', '_')}-{py}-{arch}-{key.hexdigest()[:12]}"


def headers(folder: Path) -> list[Path]:
    """The headers beside a library's source, which it includes by name (``#include "fast_math.h"``)."""
    return sorted(folder.glob("*.h"))


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags): optimised, vectorised for this CPU, OpenMP threads on Linux.

    ``-fno-trapping-math`` (no floating-point traps are used) lets the compiler vectorise branch-free
    selects such as the exp polynomial's clamp; without it only AVX-512's masked moves manage."""
    cflags = ["-O3", "-fno-trapping-math", *ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    if sys.platform.startswith("linux"):  # the same libgomp as PyTorch's, already loaded
        return [*cflags, "-fopenmp"], ["-fopenmp"]
    return cflags, []


@contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """Hold the build folder's lock (an OS lock, released by the kernel if this process dies), saying so
    when another process holds it."""
    lock = FileLock(directory / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"charlm: waiting for another process building or loading the C++ kernel in {directory}",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build_and_load(sources: Sources, name: str, what: str) -> None:
    from torch.utils import cpp_extension

    paths = _paths(sources)
    directory = build_directory(paths)
    directory.mkdir(parents=True, exist_ok=True)
    with _folder_lock(directory):
        # with our lock held no other build runs here: a lock file of PyTorch's was left by a killed one
        torch_lock = directory / TORCH_LOCK_NAME
        if torch_lock.exists():
            print(f"charlm: removing {torch_lock}, left by a build that did not finish", file=sys.stderr)
            torch_lock.unlink(missing_ok=True)
        # built from a copy kept here (the source and the headers it may include from its folder): the
        # build does not depend on the checkout's path
        for original in [*headers(paths[0].parent), *paths]:
            copy = directory / original.name
            if not copy.is_file() or copy.read_bytes() != original.read_bytes():
                partial = copy.with_suffix(".partial")
                partial.write_bytes(original.read_bytes())
                partial.replace(copy)
        if not any(directory.glob(f"{name}.*")):
            print(f"charlm: building the C++ kernel of {what} (once) in {directory}", file=sys.stderr)
        cflags, ldflags = compile_flags()
        saved_path = os.environ.get("PATH", "")
        os.environ["PATH"] = tool_path()
        try:
            cpp_extension.load(
                name=name, sources=[str(directory / p.name) for p in paths], extra_cflags=cflags, extra_ldflags=ldflags,
                build_directory=str(directory), is_python_module=False, verbose=False,
            )
        finally:
            os.environ["PATH"] = saved_path


def tool_path() -> str:
    """The ``PATH`` the build runs with: this Python's folder first (ninja from pip lives beside it, and a venv
    need not be activated to be used), then ``$PATH``."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def missing_build_tools() -> list[str]:
    """The build's tools (PyTorch's C++ compiler, ``$CXX`` or ``c++``, and ninja) not found where the build
    looks for them (:func:`tool_path`)."""
    return [tool for tool in (os.environ.get("CXX", "c++"), "ninja") if shutil.which(tool, path=tool_path()) is None]


def build_error(err: Exception) -> str:
    """The telling line of a failed build: the compiler's first error (or the shell's word on a missing
    compiler), else the message's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    words = ("error", "not found", "no such file")
    telling = [line for line in lines if any(w in line.lower() for w in words)]
    telling = [line for line in telling if not line.startswith("Error building extension")]
    return (telling or lines or [type(err).__name__])[0 if telling else -1]


def load_library(source: Sources, name: str, op: str, what: str, instead: str) -> bool:
    """Whether the C++ library built from ``source`` (one file or several) is on and loaded (its op
    ``torch.ops.charlm.<op>`` is there), building and loading it on the first call; where it cannot be
    built, one warning says why and that ``instead`` runs (``what`` names the library's users in the
    messages)."""
    if not _enabled or os.environ.get("CHARLM_NATIVE", "1") == "0":
        return False
    if name not in _loaded:
        try:
            _build_and_load(source, name, what)
            _loaded[name] = hasattr(torch.ops.charlm, op)
        except Exception as err:  # no compiler, no ninja, a failed build: the Python code runs instead
            _loaded[name] = False
            why = build_error(err)
            warnings.warn(
                f"charlm: could not build the C++ kernel of {what} ({why}); {instead}. Install a C++ compiler "
                "and ninja, or set CHARLM_NATIVE=0 to skip the build.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[name]


def cpp_off() -> AbstractContextManager[None]:
    """Inside the block no C++ library is used: the normalised LSTMs run their Python time loops and
    :mod:`charlm.model.fast_step` the Python step (for side-by-side checks)."""
    return _enabled.off()
