"""The C++ kernel of lstm-ln / lstm-bn against the Python kernel it replaces, its selection and its fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import require_cpp_build
from filelock import FileLock
from torch import Tensor

from charlm.cells import norm_lstm_cpp
from charlm.cells.norm_lstm_cpp import CPP_LOOP
from charlm.cells.norm_lstm_kernel import PYTHON_LOOP, NormLSTMKernel, StepNorm, TimeLoop
from charlm.config import load_config
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.native import build
from charlm.training.fit import train

# odd sizes: H = 37 leaves a vector tail in every loop, B = 5 splits unevenly between two threads
T, B, H, STEPS_KEPT = 9, 5, 37, 12


@pytest.fixture(scope="module")
def built() -> None:
    """The kernel is built here: see :func:`conftest.require_cpp_build`."""
    require_cpp_build(norm_lstm_cpp.available, "the C++ kernel")


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The suite runs on one thread; the kernel splits rows and columns between threads, so check with two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def inputs(kind: str, dtype: torch.dtype) -> tuple[list[Tensor], tuple[Tensor, ...] | None]:
    """NormLSTMKernel's arguments with non-trivial values; the batch norm's W x batch-major underneath."""
    g = torch.Generator().manual_seed(7)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    K = 4 * H
    args = [2 * r(T, B, K), 1 + 0.3 * r(K), 0.2 * r(K), r(B, H), r(B, H), 0.3 * r(K, H), 1 + 0.3 * r(K),
            1 + 0.3 * r(H), 0.2 * r(H)]
    args = [a.to(dtype) for a in args]
    running = None
    if kind == "batch":
        args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # as the Python kernel wants it
        running = tuple((torch.rand(STEPS_KEPT, n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
                        for n in (K, K, K, K, H, H))
    return [a.requires_grad_() for a in args], running


def run(loop: TimeLoop, kind: str, dtype: torch.dtype) -> list[Tensor]:
    """Outputs, the gradients of every input and the running statistics after one call, as float64."""
    args, running = inputs(kind, dtype)
    hs, h, c = NormLSTMKernel.apply(*args, StepNorm(kind, 1e-5, running, 0.1), loop)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (hs, h, c)]
    loss = sum((t.double() * w).sum() for t, w in zip((hs, h, c), weights, strict=True))
    grads = torch.autograd.grad(loss, args)
    return [t.detach().double() for t in (hs, h, c, *grads, *(running or ()))]


@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_float64_equals_the_python_kernel(built: None, two_threads: None, kind: str) -> None:
    for got, want in zip(run(CPP_LOOP, kind, torch.float64), run(PYTHON_LOOP, kind, torch.float64),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["layer", "batch"])
def test_float32_is_as_close_to_float64_as_the_python_kernel(built: None, two_threads: None, kind: str) -> None:
    """The float32 exp / tanh polynomials cost no accuracy that matters: error relative to each tensor's
    largest value, against the float64 result, within 5x the Python kernel's (ATen's functions)."""
    exact = run(PYTHON_LOOP, kind, torch.float64)
    cpp, python = run(CPP_LOOP, kind, torch.float32), run(PYTHON_LOOP, kind, torch.float32)
    for got, py, want in zip(cpp, python, exact, strict=True):
        scale = want.abs().max()
        err, err_py = (got - want).abs().max() / scale, (py - want).abs().max() / scale
        assert err < 1e-4 and err <= 5 * err_py + 1e-6, (err.item(), err_py.item())


def kernels(out: Tensor) -> set[str]:
    """The time loops (their names) of the kernels in the autograd graph behind ``out``."""
    seen, todo, names = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "NormLSTMKernelBackward":
            names.add(fn.loop.name)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("cell", ["lstm-ln", "lstm-bn"])
def test_layers_run_the_cpp_kernel_unless_it_is_off(built: None, cell: str) -> None:
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 3, 8).train()
    x = torch.randn(4, 20, 3)
    out, _ = layer(x)
    assert kernels(out) == {"c++"}
    with build.cpp_off():
        ref, _ = layer(x)
    assert kernels(ref) == {"python"}
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # float32, 20 steps


def in_fresh_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter: a process loads the library once (PyTorch's builder would try a
    second build under a new name, whose ops could not register again)."""
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def test_a_failed_build_warns_once_and_the_python_kernel_runs(tmp_path: Path) -> None:
    code = """
import warnings
import torch
from charlm.cells import norm_lstm_cpp
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.native import build
from charlm.training.fit import train
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = norm_lstm_cpp.available(), norm_lstm_cpp.available()
out, _ = RecurrentLayer("lstm-ln", 3, 8)(torch.randn(2, 5, 3))
kernel = out.grad_fn.next_functions[0][0]
print(first, second, len(caught), type(kernel).__name__, kernel.loop.name)
print(caught[0].message)
"""
    run = in_fresh_python(code, CHARLM_NATIVE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    assert run.returncode == 0, run.stderr
    decided, message = run.stdout.splitlines()[:2]
    # decided once per process (one build, one warning); the layer runs the Python kernel
    assert decided.split() == ["False", "False", "1", "NormLSTMKernelBackward", "python"]
    assert message.startswith("charlm: could not build the C++ kernel of lstm-ln / lstm-bn (")
    assert "no-such-compiler" in message  # the shell's word on the missing compiler, not ninja's last line
    assert message.endswith("or set CHARLM_NATIVE=0 to skip the build.")


def test_the_suite_builds_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    assert build.build_directory(norm_lstm_cpp.SOURCE).is_relative_to(tmp_path_factory.getbasetemp())


def test_the_build_folder_is_keyed_by_the_source_and_the_flags(
        built: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Checkouts with different sources (or headers beside them) keep a build each; with the same ones they
    share one, built from the folder's copies (a build from the checkout's path would be redone for every
    checkout)."""
    here = build.build_directory(norm_lstm_cpp.SOURCE)
    headers = build.headers(norm_lstm_cpp.SOURCE.parent)
    assert [h.name for h in headers] == ["cell_updates.h", "fast_math.h", "fused_products.h"]
    for original in [norm_lstm_cpp.SOURCE, *headers]:
        assert (here / original.name).read_bytes() == original.read_bytes()
    assert str(norm_lstm_cpp.SOURCE) not in (here / "build.ninja").read_text()
    other = tmp_path / norm_lstm_cpp.SOURCE.name
    for original in [norm_lstm_cpp.SOURCE, *headers]:
        (tmp_path / original.name).write_bytes((here / original.name).read_bytes())
    assert build.build_directory(other) == here  # another checkout, the same source and headers
    header = tmp_path / headers[0].name
    header.write_text(header.read_text() + "// changed\n")
    changed_header = build.build_directory(other)
    assert changed_header != here
    other.write_text(other.read_text() + "// changed\n")
    changed = build.build_directory(other)
    assert changed not in (here, changed_header) and changed.parent == here.parent
    cflags, ldflags = build.compile_flags()
    monkeypatch.setattr(build, "compile_flags", lambda: ([*cflags, "-DCHANGED"], ldflags))
    assert build.build_directory(other) not in (here, changed)


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next(built: None) -> None:
    """PyTorch's builder waits for its lock file to go away; one found while we hold our lock is stale,
    however recent (a build killed a moment ago)."""
    lock = build.build_directory(norm_lstm_cpp.SOURCE) / build.TORCH_LOCK_NAME
    lock.touch()
    run = in_fresh_python("from charlm.cells import norm_lstm_cpp; print(norm_lstm_cpp.available())", timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["True"], run.stderr
    assert not lock.exists() and "left by a build that did not finish" in run.stderr


def test_a_second_process_waits_for_a_build_in_progress_and_says_so(built: None) -> None:
    """While a build holds the folder's lock, another process waits, says so in one line, and leaves the
    build's files alone, however long it takes; it loads the library once the build is done."""
    directory = build.build_directory(norm_lstm_cpp.SOURCE)
    torch_lock = directory / build.TORCH_LOCK_NAME
    with FileLock(directory / build.LOCK_NAME):  # a build in progress, slower than any age limit
        torch_lock.touch()
        old = torch_lock.stat().st_mtime - 3600
        os.utime(torch_lock, (old, old))
        code = "from charlm.cells import norm_lstm_cpp; print(norm_lstm_cpp.available())"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, proc.kill)  # a process that never says it waits is not waited for
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stderr is not None
            waiting = next((line for line in iter(proc.stderr.readline, "") if "waiting" in line), "")
            assert waiting == f"charlm: waiting for another process building or loading the C++ kernel in {directory}\n"
            assert torch_lock.exists() and proc.poll() is None
            torch_lock.unlink()  # the build finishes
        except BaseException:
            proc.kill()
            raise
        finally:
            watchdog.cancel()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.split() == ["True"], err
    assert "left by a build" not in err


def test_training_builds_the_kernel_before_the_trainer_starts(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build is no part of the first step, nor of the run's time budget (Lightning's clock starts with fit)."""
    events: list[str] = []

    class FitStart(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            events.append("fit")

    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_build_and_load", lambda *library: events.append("build"))
    config = load_config("smoke", [f"data.path={corpus_file}", "model.cell=lstm-ln", "train.accelerator=cpu",
                                   "train.max_steps=1", "train.val_every_steps=1", "sample.enabled=false"])
    train(config, run_dir=tmp_path / "run", callbacks=[FitStart()])
    assert events == ["build", "fit"]


def test_charlm_native_0_skips_the_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("CHARLM_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CHARLM_NATIVE", "0")
    assert not norm_lstm_cpp.available()
    assert build._loaded == {} and not any(tmp_path.iterdir())


def _stub(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\nexit 0\n")
    (folder / name).chmod(0o755)


@pytest.mark.parametrize("ninja_beside_python", [True, False])
def test_a_failed_build_fails_where_the_build_finds_its_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             ninja_beside_python: bool) -> None:
    """A compiler on PATH and ninja only beside this Python (pip's, in a venv not activated): the build finds
    both, so a library that did not build is a failure, not a skip; with no ninja anywhere, a skip."""
    _stub(tmp_path / "path", "c++")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    if ninja_beside_python:
        _stub(tmp_path / "venv" / "bin", "ninja")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    expected = pytest.fail.Exception if ninja_beside_python else pytest.skip.Exception
    with pytest.raises(expected) as caught:
        require_cpp_build(lambda: False, "the test's library")
    assert str(caught.value) == ("a C++ compiler and ninja are installed, but the test's library did not build"
                                 if ninja_beside_python else "no ninja: the test's library cannot be built here")
