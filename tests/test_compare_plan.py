"""``charlm compare``'s plan, before any training: cell lists and presets, budgets, parameter matching, and the
config each preset trains with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import invoke

import charlm.tools.compare.run as compare_run
from charlm.cells.registry import cell_names
from charlm.config import ModelConfig, load_config
from charlm.tools.compare.plan import (
    PRESETS,
    budget_overrides,
    match_hidden_size,
    matched_hidden_sizes,
    parameter_count,
    resolve_entries,
)
from charlm.util.errors import CharlmError


def test_unknown_cells_and_presets_list_the_valid_ones() -> None:
    code, output = invoke("compare", "--cells", "lstm,lstmx,foo")
    assert code == 2 and "Traceback" not in output
    assert "unknown cells 'lstmx', 'foo' in --cells; valid cells:" in output
    for name in cell_names():
        assert name in output
    code, output = invoke("compare", "--preset", "odyssey")
    assert code == 2 and "unknown preset 'odyssey'; presets: jozefowicz" in output and "greff" in output
    code, output = invoke("compare")
    assert code == 2 and "say which cells to compare" in output
    code, output = invoke("compare", "--cells", "lstm", "--preset", "greff")
    assert code == 2 and "not both" in output


def test_presets_use_the_papers_row_names() -> None:
    joz = resolve_entries(None, "jozefowicz")
    assert [e.name for e in joz] == ["LSTM", "Tanh", "LSTM-f", "LSTM-i", "LSTM-o", "LSTM-b", "GRU",
                                     "MUT1", "MUT2", "MUT3"]
    greff = resolve_entries(None, "Greff")
    assert [(e.cell, e.name) for e in greff][:2] == [("peephole", "V"), ("nig", "NIG")]
    assert [e.name for e in greff][2:] == ["NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR"]
    assert all(cell in cell_names() for preset in PRESETS.values() for cell in preset)
    assert [e.cell for e in resolve_entries(" LSTM, gru,lstm ", None)] == ["lstm", "gru"]


def test_budget_flags_give_every_cell_the_same_budget() -> None:
    assert budget_overrides(100, None) == ["train.max_steps=100", "train.max_time=null", "train.max_epochs=-1"]
    assert budget_overrides(None, 60.0) == ["train.max_time=60.0", "train.max_steps=-1", "train.max_epochs=-1"]
    assert budget_overrides(100, 60.0) == ["train.max_steps=100", "train.max_time=60.0"]
    assert budget_overrides(None, None) == []
    cfg = load_config("default", budget_overrides(50, None))
    assert cfg.train.max_steps == 50 and cfg.train.max_time is None
    with pytest.raises(CharlmError, match="--max-steps must be at least 1"):
        budget_overrides(0, None)


def test_match_hidden_size_finds_the_nearest_count() -> None:
    cfg = load_config("smoke")

    def quadratic(model: Any, vocab: int) -> int:
        return 3 * model.hidden_size ** 2 + 10

    assert match_hidden_size(cfg.model, 65, 3 * 40 ** 2 + 10, quadratic) == 40
    assert match_hidden_size(cfg.model, 65, 3 * 40 ** 2 + 10 + 100, quadratic) == 40  # 40 is nearer than 41
    assert match_hidden_size(cfg.model, 65, 3 * 41 ** 2 + 10 - 100, quadratic) == 41
    assert match_hidden_size(cfg.model, 65, 10**6, lambda m, v: 7) is None  # the size changes nothing

    entries = resolve_entries("lstm,gru,rnn,fgr", None)
    sizes = matched_hidden_sizes(cfg, entries, 65)
    assert sizes["lstm"] == cfg.model.hidden_size
    assert sizes["rnn"] > sizes["gru"] > sizes["lstm"] > sizes["fgr"]
    target = parameter_count(cfg.model, 65)
    for entry in entries[1:]:
        gap = abs(parameter_count(_with(cfg.model, entry.cell, sizes[entry.cell]), 65) - target)
        assert gap < 0.02 * target
        for neighbour in (sizes[entry.cell] - 1, sizes[entry.cell] + 1):
            assert gap <= abs(parameter_count(_with(cfg.model, entry.cell, neighbour), 65) - target)


def _with(model: ModelConfig, cell: str, hidden: int) -> ModelConfig:
    return dataclasses.replace(model, cell=cell, hidden_size=hidden)


def compared_config(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Any:
    """The config ``charlm compare ARGS`` would train with (the comparison itself is not run)."""
    seen: list[Any] = []

    def record(base: Any, entries: Any, **kwargs: Any) -> Any:
        seen.append(base)
        raise CharlmError("recorded")

    monkeypatch.setattr(compare_run, "run_comparison", record)
    code, output = invoke("compare", *args)
    assert code == 2 and "recorded" in output, output
    return seen[0]


def test_jozefowicz_preset_separates_lstm_from_lstm_b(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charlm.model.char_lm import CharLM

    config_file = tmp_path / "bias1.yaml"  # a config whose LSTMs start as LSTM-b
    config_file.write_text("model:\n  forget_bias: 1.0\n  hidden_size: 16\n", encoding="utf-8")
    assert compared_config(monkeypatch, ["--cells", "lstm", "--config", str(config_file)]).model.forget_bias == 1.0
    cfg = compared_config(monkeypatch, ["--preset", "jozefowicz", "--config", str(config_file)])
    assert cfg.model.forget_bias == 0.0  # the preset's rows, whatever the config file says
    h = cfg.model.hidden_size
    forget = {}
    for cell in ("lstm", "lstm-b"):
        layer = CharLM(65, _with(cfg.model, cell, h)).layers[0]
        forget[cell] = dict(layer.named_parameters())["bias_ih_l0"][h:2 * h]  # gate order i, f, g, o
    assert bool((forget["lstm"] == 0).all()) and bool((forget["lstm-b"] == 1).all())
    cfg = compared_config(monkeypatch, ["--preset", "jozefowicz", "--config", str(config_file),
                                        "--set", "model.forget_bias=0.5"])
    assert cfg.model.forget_bias == 0.5  # the user's --set comes after the preset
