"""Where the fused sampling route runs: how many threads sampling takes on a busy or idle machine, and a CPU
whose build of the route is not vectorised (PyTorch's capability DEFAULT), which leaves sampling to the ATen op."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from charlm.util import threads as threads_module


@pytest.mark.parametrize(("cpus", "load", "threads"), [(2, 0.2, 2), (2, 1.1, 1), (2, 3.0, 1), (8, 0.0, 2), (1, 0.0, 1),
                                                       (2, None, 1)])
def test_sampling_threads_use_the_idle_cpus(monkeypatch: pytest.MonkeyPatch, cpus: int, load: float | None,
                                            threads: int) -> None:
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda _: set(range(cpus)), raising=False)

    def loadavg() -> tuple[float, float, float]:
        if load is None:
            raise OSError("no load average here")
        return (load, load, load)

    monkeypatch.setattr(threads_module.os, "getloadavg", loadavg)
    assert threads_module.sampling_threads() == threads


PLAIN_BUILD = """
import warnings, torch
from charlm.config import ModelConfig
from charlm.model import fast_step, fused_step
from charlm.model.char_lm import CharLM
from charlm.native.build import cpp_off
torch.manual_seed(0)
model = CharLM(23, ModelConfig(cell="lstm", embedding_size=13, hidden_size=21)).eval()
x = torch.tensor([3, 5, 7])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(torch.backends.cpu.get_cpu_capability(), fast_step.available(), fused_step.build())
    chosen = fast_step.cpp_step(model, x, None)  # the route generation takes here
    print(fused_step.packed(model, fast_step.available) is None, chosen is not None)
    fast_step.cpp_step(model, x, None)
print(len([w for w in caught if "fused sampling route" in str(w.message)]))
pack = fused_step.make_pack(model)  # the plain build's own arithmetic, taken by hand
logits, states = fused_step.step(x, None, pack)
with cpp_off():
    ref, ref_states = model.step(x)
print(float((logits - ref).abs().max()), float((states[1][1] - ref_states[1][1]).abs().max()))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="on Arm the plain build has NEON's fused multiply-adds")
def test_a_plain_build_is_right_and_leaves_sampling_to_the_aten_op(tmp_path: Path) -> None:
    """Built for PyTorch's capability DEFAULT (no AVX2: plain SSE2 multiplies and adds), the fused arithmetic
    still equals PyTorch's step to 1e-5, and generation takes the ATen op instead (whose products pick their own
    instructions), saying so once (benchmarks/sampling.py measures the two: docs/results.md)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "CHARLM_NATIVE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", PLAIN_BUILD], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    assert lines[0] == "DEFAULT True (64, False)"
    assert lines[1] == "True True"  # no fused pack; the ATen op stepped it
    assert lines[2] == "1"  # said once
    worst_logit, worst_cell = map(float, lines[3].split())
    assert worst_logit < 1e-5 and worst_cell < 1e-5
