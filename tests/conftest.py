"""Shared fixtures: a small corpus on disk (real Shakespeare, shipped in ``tests/data/``), one smoke-trained
checkpoint per session, and an environment with no corpus configured."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare-excerpt.txt"
REPO = Path(__file__).resolve().parents[1]


def launch_env() -> dict[str, str]:
    """This environment for a process that starts a distributed run: no launcher's or cluster's variables
    (rank, world size, master address, SLURM's, torchrun's, Lightning's) from outside, one thread, wide output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                        "LOCAL_WORLD_SIZE")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", COLUMNS="250", PYTHONPATH=str(REPO))
    return env


def require_cpp_build(available: Callable[[], bool], what: str) -> None:
    """Build a C++ library (``available`` builds and loads it); where the build finds a compiler and ninja
    (looking where it looks: :func:`charlm.native.build.missing_build_tools`) a failed build is a test
    failure, elsewhere the test is skipped."""
    from charlm.native.build import missing_build_tools

    if available():
        return
    missing = missing_build_tools()
    if not missing:
        pytest.fail(f"a C++ compiler and ninja are installed, but {what} did not build")
    pytest.skip(f"no {' or '.join(missing)}: {what} cannot be built here")


def invoke(*args: str, fold: bool = True) -> tuple[int, str]:
    """``charlm ARGS`` run in-process: its exit code and output, which never holds a traceback. With ``fold``
    (the default) line breaks and runs of spaces become one space, so a message Rich wrapped reads whole."""
    from typer.testing import CliRunner

    from charlm.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split()) if fold else result.output


def invoke_as_printed(*args: str) -> tuple[int, str]:
    """:func:`invoke` with the output line for line, as printed (for tests that read its lines)."""
    return invoke(*args, fold=False)


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
    # float32 on every CPU (train.precision: auto is bf16-mixed on some): the tests that share this run compare
    # its logged losses with float32 evaluations of its checkpoints
    result = CliRunner().invoke(app, smoke_args(corpus_file, out, "smoke", "--precision", "32-true"))
    assert result.exit_code == 0, result.output
    return out / "smoke"


def write_model_checkpoint(path: Path, text: str, *, scale: float = 1.0, seed: int = 0, **model: object) -> Path:
    """An untrained model (the ``smoke`` config with ``model`` keys overridden, its weights times ``scale``)
    saved as ``charlm sample`` / ``eval`` read a checkpoint, with the vocabulary of ``text``: a large scale
    makes every next character depend strongly on the state, which tests of state keeping need."""
    from charlm.config import load_config
    from charlm.data.vocab import Vocab
    from charlm.model.char_lm import CharLM
    from charlm.model.checkpoint import FORMAT_VERSION

    cfg = load_config("smoke", [f"model.{k}={v}" for k, v in model.items()])
    vocab = Vocab.from_text(text)
    torch.manual_seed(seed)
    net = CharLM(len(vocab), cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    torch.save({"hyper_parameters": {"config": cfg.to_dict(), "vocab": vocab.chars, "format_version": FORMAT_VERSION},
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="session")
def sharp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained model whose next character depends strongly on everything before it; its vocabulary
    is the excerpt's plus one non-ASCII character, ``é``."""
    return write_model_checkpoint(tmp_path_factory.mktemp("sharp") / "sharp.ckpt", shakespeare_text() + "é",
                                  scale=4.0, hidden_size=32, embedding_size=16)


# The real-browser tests (tests/test_serve_browser.py, tests/test_export_web.py): Debian's chromium and its
# chromedriver, headless, with no network or profile of their own.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_OPTIONS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1280,900"]


@pytest.fixture(scope="session")
def browser() -> tuple[str, str]:
    """Chromium and its driver; checked before anything is trained, exported or started."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"the browser test needs {CHROMIUM} and {CHROMEDRIVER}: under CI they must be installed "
                        "(apt-get install chromium chromium-driver; .ci/run does)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    return CHROMIUM, CHROMEDRIVER
