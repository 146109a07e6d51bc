"""``charlm env``: the facts of a bug report, as a table and as JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import lightning
import pytest
import torch
from typer.testing import CliRunner

from charlm import __version__
from charlm.cli import app
from charlm.native.cache import cache_root
from charlm.tools.env import driver_gpus, native, torch_facts
from charlm.util.cpu_features import parse_cpuinfo

runner = CliRunner()

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_json_has_every_section_with_the_versions_of_this_process() -> None:
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert set(facts) == {"charlm", "python", "platform", "packages", "optional", "cpu", "gpus", "native"}
    assert facts["charlm"]["version"] == __version__
    assert facts["python"]["version"] == platform.python_version()
    assert facts["packages"]["torch"] == torch.__version__ and facts["packages"]["lightning"] == lightning.__version__
    assert all(isinstance(v, str) for v in facts["packages"].values())  # the dependencies are all installed
    assert all(v is None or isinstance(v, str) for v in facts["optional"].values())
    cpu = facts["cpu"]
    assert cpu["logical_cpus"] == os.cpu_count()
    for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx"):
        assert cpu[flag] is None or isinstance(cpu[flag], bool)
    if Path("/proc/cpuinfo").is_file():
        assert isinstance(cpu["avx2"], bool) and isinstance(cpu["model"], str)
    assert isinstance(facts["gpus"]["nvidia_driver"], list)
    assert facts["native"]["cache"] == str(cache_root())


def test_torch_adds_what_torch_reports() -> None:
    result = runner.invoke(app, ["env", "--json", "--torch"])
    assert result.exit_code == 0, result.output
    seen = json.loads(result.output)["torch"]
    assert seen["version"] == torch.__version__ and seen["capability"] == torch.backends.cpu.get_cpu_capability()
    assert seen["threads"] == torch.get_num_threads()
    assert seen["cuda"] == torch.version.cuda and seen["cuda_available"] == torch.cuda.is_available()
    assert len(seen["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert isinstance(seen["mps_available"], bool) and seen["onednn_available"] == torch.backends.mkldnn.is_available()
    assert set(seen["cpp_kernels"]) == {"norm_lstm", "model_step"}
    assert all(isinstance(k["built"], bool) for k in seen["cpp_kernels"].values())


def test_the_table_shows_the_same_facts() -> None:
    result = runner.invoke(app, ["env", "--torch"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
            if line.count("│") == 3}
    assert rows["packages.torch"] == torch.__version__
    assert rows["charlm.version"] == __version__
    assert rows["torch.threads"] == str(torch.get_num_threads())


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    model, flags = parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == {"avx2": True, "fma": True, "avx512f": True, "avx512_bf16": True, "amx": True}
    model, flags = parse_cpuinfo("model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert model == "AMD EPYC 7B13"
    assert flags == {"avx2": True, "fma": True, "avx512f": False, "avx512_bf16": False, "amx": False}


def test_the_cpp_kernels_are_looked_for_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is only read (nothing is built or even made); a library built there is listed, and ``--torch``
    says whether it is the one this install uses."""
    from charlm.cells import norm_lstm_cpp
    from charlm.native import build

    monkeypatch.setenv("CHARLM_NATIVE_DIR", str(tmp_path / "native"))
    assert native()["builds"] == {}
    kernels = torch_facts()["cpp_kernels"]
    assert kernels["norm_lstm"] == {"built": False, "folder": str(build.build_directory(norm_lstm_cpp.SOURCE))}
    assert not (tmp_path / "native").exists()  # nothing was built or even made
    folder = tmp_path / "native" / "torch-x"
    folder.mkdir(parents=True)
    (folder / "charlm_norm_lstm.so").write_bytes(b"")
    (folder / "charlm_norm_lstm.o").write_bytes(b"")
    assert native()["builds"] == {"torch-x": ["charlm_norm_lstm"]}
    # once built (here, in the session's own build folder), it is found
    monkeypatch.undo()
    if norm_lstm_cpp.available():
        assert torch_facts()["cpp_kernels"]["norm_lstm"]["built"] is True


def test_the_driver_lists_nvidia_gpus(tmp_path: Path) -> None:
    for number, model in (("0000:01:00.0", "NVIDIA H100 80GB HBM3"), ("0000:02:00.0", "NVIDIA L4")):
        (tmp_path / number).mkdir()
        (tmp_path / number / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t 42\n")
    assert driver_gpus(tmp_path) == ["NVIDIA H100 80GB HBM3", "NVIDIA L4"]
    assert driver_gpus(tmp_path / "absent") == []
