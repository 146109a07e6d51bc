"""``train.precision: auto``: bf16-mixed for the LSTM on a CPU with native bfloat16, float32 everywhere else; said
once at the start; ``--precision`` overrides it; comparisons and searches train every run in float32."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

import charlm.tools.tune.objective as objective
import charlm.training.precision as precision
import charlm.util.cpu_features as cpu_features
from charlm.cli import app
from charlm.config import Config, load_config
from charlm.tools.compare.plan import plan_runs, resolve_entries
from charlm.tools.tune.objective import TrialFailed
from charlm.tools.tune.space import parse_space
from charlm.training.fit import build_trainer
from charlm.training.precision import for_comparison, resolve_precision
from charlm.util.errors import CharlmError

NOTE = ("auto chose bf16-mixed: this CPU has native bfloat16 (avx512_bf16), where it trains the LSTM faster to the "
        "same loss; --precision 32-true trains in float32")
TINY = ["--max-steps", "2", "--set", "model.hidden_size=16", "--set", "model.embedding_size=16", "--set",
        "data.batch_size=4", "--set", "data.bptt=16", "--set", "data.eval_batch_size=4", "--set",
        "train.val_every_steps=2", "--no-samples"]


def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str) -> None:
    """Make this process read a /proc/cpuinfo whose flags are ``flags``."""
    fake = tmp_path / "cpuinfo"
    fake.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n", encoding="utf-8")
    monkeypatch.setattr(cpu_features, "CPUINFO", fake)
    monkeypatch.setattr(sys, "platform", "linux")


@pytest.mark.parametrize(("flags", "feature"), [("avx2 fma", None), ("avx2 avx512f avx512_bf16", "avx512_bf16"),
                                                ("avx2 avx512f amx_tile amx_bf16", "amx"), ("", None)])
def test_native_bf16_reads_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str,
                                         feature: str | None) -> None:
    cpuinfo(tmp_path, monkeypatch, flags)
    assert cpu_features.native_bf16() == feature


@pytest.fixture
def bf16_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo(tmp_path, monkeypatch, "avx2 fma avx512f avx512_bf16")


@pytest.mark.usefixtures("bf16_cpu")
def test_auto_is_bf16_for_the_lstm_on_a_bf16_cpu_only() -> None:
    config = load_config(None, ["train.accelerator=cpu"])
    assert config.train.precision == "auto"
    resolved, note = resolve_precision(config)
    assert (resolved.train.precision, note) == ("bf16-mixed", NOTE)
    assert config.train.precision == "auto"  # the caller's config is left as it was
    for override in ("model.cell=peephole", "model.cell=gru", "model.torch_rnn=false", "model.compile=true",
                     "train.precision=32-true", "train.accelerator=gpu"):
        resolved, note = resolve_precision(load_config(None, ["train.accelerator=cpu", override]))
        assert (resolved.train.precision, note) == ("32-true", None), override


def test_auto_is_float32_on_a_cpu_without_native_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo(tmp_path, monkeypatch, "avx2 fma avx512f")
    assert resolve_precision(load_config(None, ["train.accelerator=cpu"]))[0].train.precision == "32-true"


def test_auto_on_the_auto_accelerator_is_bf16_only_without_a_gpu(bf16_cpu: None, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    assert resolve_precision(load_config(None, []))[0].train.precision == "32-true"
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision.torch.backends.mps, "is_available", lambda: False)
    assert resolve_precision(load_config(None, []))[0].train.precision == "bf16-mixed"


def test_a_named_precision_is_kept_and_comparisons_use_float32(bf16_cpu: None) -> None:
    config = load_config(None, ["train.precision=bf16-mixed", "model.cell=peephole"])
    assert resolve_precision(config) == (config, None)
    assert for_comparison(load_config(None, [])).train.precision == "32-true"
    assert for_comparison(config).train.precision == "bf16-mixed"


@pytest.mark.usefixtures("bf16_cpu")
def test_train_says_it_once_and_records_it(corpus_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(corpus_file), "--out", str(tmp_path), "--name", "auto",
                                 "--accelerator", "cpu", *TINY])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count(NOTE) == 1 and "precision bf16-mixed" in text
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["precision"] == "bf16-mixed"  # a resumed run keeps it, wherever it resumes
    opted_out = runner.invoke(app, ["train", "--data", str(corpus_file), "--out", str(tmp_path), "--name", "fp32",
                                    "--accelerator", "cpu", "--precision", "32-true", *TINY])
    assert opted_out.exit_code == 0, opted_out.output
    assert "native bfloat16" not in opted_out.output and "precision 32-true" in opted_out.output


@pytest.mark.usefixtures("bf16_cpu")
def test_a_comparison_and_a_search_train_every_run_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    base = load_config(None, ["train.accelerator=cpu"])
    entries = resolve_entries("lstm,peephole", None)
    plans = plan_runs(base, entries, [1], {e.cell: 16 for e in entries}, tmp_path)
    assert [p.config.train.precision for p in plans] == ["32-true", "32-true"]  # not bf16 for the LSTM alone

    trained: list[str] = []

    def record(config: Config, **kwargs: object) -> None:
        trained.append(config.train.precision)
        raise CharlmError("recorded")

    monkeypatch.setattr(objective, "train", record)
    trial = optuna.create_study().ask()
    with pytest.raises(TrialFailed, match="recorded"):
        objective.Objective(base, parse_space({"model.cell": ["lstm"]}), tmp_path)(trial)
    assert trained == ["32-true"]


@pytest.mark.usefixtures("bf16_cpu")
def test_a_trainer_built_from_an_auto_config_gets_what_auto_means(tmp_path: Path) -> None:
    """``build_trainer`` (which the benchmarks call without ``train``) never hands Lightning the word auto."""
    lstm = build_trainer(load_config(None, ["train.accelerator=cpu"]), tmp_path)[0]
    gru = build_trainer(load_config(None, ["train.accelerator=cpu", "model.cell=gru"]), tmp_path)[0]
    assert (lstm.precision, gru.precision) == ("bf16-mixed", "32-true")
