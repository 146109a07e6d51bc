"""Shared fixtures: a small corpus on disk and one smoke-trained checkpoint per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from charlm.corpus import CORPUS_NAME

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / CORPUS_NAME


def shakespeare_text(n_chars: int = 120_000) -> str:
    """The first ``n_chars`` of tiny Shakespeare when a copy is around, else a repetitive stand-in."""
    for candidate in (Path(os.environ.get("CHARLM_DATA_DIR", "/nonexistent")) / CORPUS_NAME, SHARED):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")[:n_chars]
    line = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    return (line * (n_chars // len(line) + 1))[:n_chars]


@pytest.fixture(autouse=True, scope="session")
def _native_build_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The C++ kernel of lstm-ln / lstm-bn is built once per test session in a temporary folder (the
    subprocesses of the tests inherit it), never in the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARLM_NATIVE_DIR", str(tmp_path_factory.mktemp("native")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """One thread per test process: the suite's models are tiny, and CI machines are shared."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare_text(), encoding="utf-8")
    return path


def smoke_args(corpus: Path, out: Path, name: str = "smoke", *extra: str) -> list[str]:
    return ["train", "--config", "smoke", "--data", str(corpus), "--out", str(out), "--name", name, *extra]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """One smoke-config run (through the CLI), shared by the tests that need a checkpoint."""
    from typer.testing import CliRunner

    from charlm.cli import app

    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, smoke_args(corpus_file, out))
    assert result.exit_code == 0, result.output
    return out / "smoke"
