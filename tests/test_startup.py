"""The command line answers at once where no model runs: ``charlm --help``, every command's ``--help``,
``charlm cells`` and ``charlm env`` import no torch (``python -X importtime`` lists every module imported)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMMANDS = ["train", "eval", "sample", "data", "cells", "compare", "serve", "env", "viz", "gradients", "export",
            "tune"]


def imported_modules(*args: str) -> set[str]:
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "charlm", *args], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS), ["cells"], ["env"],
                                  ["env", "--json"]], ids=" ".join)
def test_no_torch_is_imported(args: list[str]) -> None:
    modules = imported_modules(*args)
    assert "charlm.cli" in modules  # the listing is real: it saw charlm's own modules
    assert not {m for m in modules if m == "torch" or m.startswith(("torch.", "lightning"))}


def test_env_torch_does_import_torch() -> None:
    """The check above can fail: the same listing shows torch where it is imported."""
    assert "torch" in imported_modules("env", "--torch")
