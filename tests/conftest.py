"""Shared fixtures: a small corpus on disk (real Shakespeare, shipped in ``tests/data/``), one smoke-trained
checkpoint per session, and an environment with no corpus configured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-excerpt.txt"


def shakespeare_text(n_chars: int | None = None) -> str:
    """The first ``n_chars`` (default: all) of the tiny-Shakespeare excerpt shipped in ``tests/data/``.

    Always this file, never ``$CHARLM_DATA_DIR`` or a downloaded corpus: the tests' numbers do not
    depend on where they run."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    if n_chars is not None and n_chars > len(text):
        raise ValueError(f"{SHAKESPEARE.name} has {len(text)} characters, not {n_chars}")
    return text[:n_chars]


@pytest.fixture(autouse=True, scope="session")
def _no_corpus_configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No ``$CHARLM_DATA_DIR`` and an empty cache folder of our own, in this process and in the ones it
    starts: a test that wants a corpus configured sets one itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CHARLM_DATA_DIR", raising=False)
        mp.setenv("CHARLM_CACHE_DIR", str(tmp_path_factory.mktemp("charlm-cache")))
        yield


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
