"""bf16-mixed on every CPU: where oneDNN has no bfloat16 LSTM (CPUs without AVX-512) the layers that run a torch
RNN kernel run in float32; the bf16 tests of the suite pass with oneDNN limited to AVX2 as well."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import charlm.model.recurrent_layer as engine
from charlm.cli import app
from charlm.model.recurrent_layer import RecurrentLayer

REPO = Path(__file__).resolve().parents[1]
# oneDNN (and PyTorch's own kernels) then behave as on a CPU with AVX2 and no AVX-512, e.g. an AMD EPYC Zen 2/3
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
BF16_TESTS = [
    "tests/test_ddp.py::test_bf16_mixed_trains_on_cpu_and_validates_in_float32",
    "tests/test_ddp.py::test_eval_under_autocast_scores_in_float32",
    "tests/test_bf16_cpu.py::test_the_awd_lstm_recipe_trains_in_bf16_mixed",
    "tests/test_bf16_cpu.py::test_lstm_bn_trains_and_evaluates_under_autocast",
]
FALLBACK_WARNING = (
    "charlm: this CPU has no bfloat16 LSTM kernel, so under mixed precision the LSTM layers run in float32 "
    "(the rest of the model in bfloat16)."
)


def test_the_awd_lstm_recipe_trains_in_bf16_mixed(corpus_file: Path, tmp_path: Path) -> None:
    """The recipe's own settings (bf16-mixed, 3 layers, weight drop), at a size that trains in seconds."""
    result = CliRunner().invoke(app, [
        "train", "--config", "awd-lstm", "--data", str(corpus_file), "--out", str(tmp_path), "--name", "awd",
        "--accelerator", "cpu", "--max-steps", "2", "--set", "model.hidden_size=32", "--set",
        "model.embedding_size=16", "--set", "data.batch_size=4", "--set", "data.bptt=20", "--set",
        "data.eval_batch_size=4", "--set", "train.val_every_steps=2", "--set", "sample.length=20"])
    assert result.exit_code == 0, result.output
    assert "precision bf16-mixed" in result.output
    rows = list(csv.DictReader((tmp_path / "awd" / "metrics.csv").open()))
    assert [math.isfinite(float(r["val_loss"])) for r in rows if r.get("val_loss")] == [True]


def test_lstm_bn_trains_and_evaluates_under_autocast() -> None:
    """The batch statistics come in bfloat16 and move the float32 running buffers."""
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm-bn", 3, 8)
    x = torch.randn(4, 6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
        out.float().sum().backward()
        layer.eval()
        with torch.no_grad():
            evaluated, _ = layer(x)
    assert layer.bn_hh_mean_l0.dtype == torch.float32 and layer.bn_hh_mean_l0.abs().sum() > 0
    assert torch.isfinite(evaluated).all() and layer.weight_hh_l0.grad is not None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_torch_rnn_layers_without_a_low_precision_kernel_run_in_float32(
        cell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the probe says no, the op runs in float32 under autocast: exactly the float32 result."""
    monkeypatch.setattr(engine, "cpu_autocast_runs", lambda kind, dtype: False)
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 3, 8).eval()
    layer.kernel_first_on_cpu = False  # the op in float32 (gru's kernel would take float32 outside autocast)
    x, state = torch.randn(4, 6, 3), layer.initial_state(4)
    want, _ = layer(x, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 state, as a custom cell's under autocast
        got, got_state = layer(x, tuple(s.bfloat16() for s in state))
    assert got.dtype == torch.float32 and all(s.dtype == torch.float32 for s in got_state)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

def fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def avx2_only_cpu() -> None:
    """Skips where limiting oneDNN to AVX2 leaves its bfloat16 LSTM in place (a CPU the variable does not bind)."""
    run = fresh_python("""
import torch
try:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.LSTM(2, 2)(torch.ones(1, 1, 2))
    print("bf16")
except RuntimeError:
    print("none")
""")
    assert run.returncode == 0, run.stderr
    if run.stdout.split() != ["none"]:
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 does not take oneDNN's bfloat16 LSTM away on this CPU")


def test_the_probe_finds_no_bf16_lstm_and_warns_once(avx2_only_cpu: None) -> None:
    run = fresh_python("""
import warnings
import torch
from charlm.model.recurrent_layer import RecurrentLayer, cpu_autocast_runs
layer = RecurrentLayer("lstm", 3, 8, weight_drop=0.5)
x = torch.randn(2, 5, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
        out.sum().backward()
        with torch.inference_mode():
            layer.eval()(x)
            step, _ = layer.step(x[:, 0])
print(cpu_autocast_runs("LSTM", torch.bfloat16), cpu_autocast_runs("RNN_TANH", torch.bfloat16), out.dtype,
      step.dtype, len(caught))
print(caught[0].message)
""")
    assert run.returncode == 0, run.stderr
    decided, message = run.stdout.splitlines()
    assert decided.split() == ["False", "True", "torch.float32", "torch.float32", "1"]
    assert message == FALLBACK_WARNING


def test_the_bf16_tests_pass_on_a_cpu_without_bf16_kernels(avx2_only_cpu: None, tmp_path: Path) -> None:
    """The suite's bf16 tests again, in a pytest run whose oneDNN and ATen stop at AVX2."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "nested"),
         "-W", "always::RuntimeWarning", *BF16_TESTS],
        cwd=REPO, env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(f"PASSED {test}" in run.stdout for test in BF16_TESTS), run.stdout[-3000:]
    assert FALLBACK_WARNING in " ".join(run.stdout.split())  # the no-bf16 path really ran
