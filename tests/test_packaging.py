"""What a regular (non-editable) install holds: the wheel built from this checkout, as pip builds it.

The suite itself runs on a source tree or an editable install, which read the repository's folders in place;
the wheel must carry the same files inside the package: the named configs (the top-level ``configs/``, mapped
into ``charlm/configs/`` by setup.py), every C++ source and header, the serve page, the viz assets and the export
assets (the web page's files, the model card's template).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout (no build isolation: setuptools from this environment, no network), built from
    a copy of its sources: setuptools keeps a build/ folder beside them, which must neither hold an earlier
    build's files nor be left in the checkout."""
    source = tmp_path_factory.mktemp("source") / "charlm"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", "runs", "checkpoints"))
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, env=env, cwd=source, capture_output=True, timeout=300)
    (found,) = out.glob("charlm-*.whl")
    return found


def test_the_wheel_carries_every_file_the_package_reads(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"charlm/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    expected |= {f"charlm/native/csrc/{p.name}" for p in (REPO / "charlm" / "native" / "csrc").iterdir()}
    expected |= {"charlm/tools/serve/static/index.html"}
    expected |= {f"charlm/tools/viz/assets/{p.name}" for p in (REPO / "charlm" / "tools" / "viz" / "assets").iterdir()}
    expected |= {f"charlm/tools/export/assets/{p.name}"
                 for p in (REPO / "charlm" / "tools" / "export" / "assets").iterdir()}
    assert {"charlm/tools/export/assets/model.js", "charlm/tools/export/assets/model_card.md"} <= expected
    assert {"charlm/configs/default.yaml", "charlm/configs/smoke.yaml", "charlm/configs/awd-lstm.yaml"} <= expected
    assert expected <= names, sorted(expected - names)
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "charlm").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names  # every subpackage, none forgotten


def test_a_regular_install_finds_its_named_configs_from_any_folder(wheel: Path, tmp_path: Path) -> None:
    """Unpacked as pip installs it, outside the checkout: ``--config smoke`` is the copy inside the package."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import charlm.config as c; p = c.resolve_config_path('smoke'); "
            "print(p); print(c.load_config('smoke').model.cell)")
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    path, cell = run.stdout.split()
    assert Path(path) == site / "charlm" / "configs" / "smoke.yaml" and cell == "lstm"
