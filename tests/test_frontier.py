"""The frontier's runs: every system at every budget, every candidate with --tune, the best one kept."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.frontier import (
    CELL_SYSTEMS,
    CHARLM_SIZES,
    NO_DROPOUT,
    ONCE,
    PLAIN_SIZES,
    SYSTEMS,
    TRANSFORMER_SIZES,
    PlainConfig,
    best_per_system,
    candidates_of,
    sized,
    task_key,
    tasks_for,
)


def test_without_tune_each_system_runs_once_per_budget_with_its_pick() -> None:
    tasks = tasks_for(["charlm", "plain", "transformer"], [2, 15], tune=False)
    assert tasks == [(s, m, None) for m in (2, 15) for s in ("charlm", "plain", "transformer")]


def test_tune_runs_every_candidate_of_every_system_three_each() -> None:
    """The plain nn.LSTM is tuned like charlm and the transformer (size and learning rate), and the cells, the new
    ones among them, run charlm's candidates with their cell: the same number of tries for every system."""
    assert set(CELL_SYSTEMS) == {"mogrifier", "mingru", "minlstm", "slstm"} and set(CELL_SYSTEMS) < set(SYSTEMS)
    for minutes in (2, 5, 15):
        tasks = tasks_for(list(SYSTEMS), [minutes], tune=True)
        specs = {system: [spec for s, _, spec in tasks if s == system] for system in SYSTEMS}
        assert specs["plain"] == sized(PLAIN_SIZES, minutes)
        assert specs["transformer"] == sized(TRANSFORMER_SIZES, minutes)
        for system in ("charlm", *CELL_SYSTEMS):
            assert specs[system] == sized(CHARLM_SIZES, minutes), system
        assert {len(v) for v in specs.values()} == {3}
        plain = sized(PLAIN_SIZES, minutes)
        assert plain[0] == PlainConfig(layers=2, hidden=256, lr=2e-3)  # the untuned baseline stays the pick
        assert len({(p.hidden, p.lr) for p in plain}) == 3  # size and rate both tried


def test_the_best_candidate_is_the_figure_and_the_others_are_kept() -> None:
    runs = [{"system": "charlm", "minutes": 2, "val_bpc": 2.3}, {"system": "charlm", "minutes": 2, "val_bpc": 2.2},
            {"system": "plain", "minutes": 2, "val_bpc": 2.4}, {"system": "charlm", "minutes": 5, "val_bpc": 2.5}]
    rows, others = best_per_system(runs)
    assert [r["val_bpc"] for r in rows] == [2.2, 2.4, 2.5]
    assert others == [runs[0]]


def test_a_plain_candidate_trains_at_its_own_size_and_rate(corpus_file: Path) -> None:
    from benchmarks.frontier import run_system
    from charlm.config import load_config
    from charlm.data.datamodule import CharDataModule

    cfg = load_config("default", [f"data.path={json.dumps(str(corpus_file))}"])
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    result = run_system("plain", 0.002, data, [], PlainConfig(layers=2, hidden=16, lr=1e-2))
    assert result is not None and result["size"] == "nn.LSTM 2x16, lr 0.01"
    v = len(data.vocab)
    assert result["parameters"] == v * 16 + 2 * (4 * 16 * 16 * 2 + 8 * 16) + 16 * v + v  # embedding, LSTM, decoder
    assert result["steps"] >= 1 and math.isfinite(result["val_bpc"])


def test_a_diverged_candidate_is_a_row_that_any_finite_one_beats(corpus_file: Path) -> None:
    """A learning rate of 1e6 makes charlm's gradients non-finite within a few steps: the run stops (charlm's
    ``train.on_nan=stop``), and the frontier records it instead of ending."""
    from benchmarks.frontier import _run_task, bpc, bpc_text, steps_text

    base = [f"data.path={json.dumps(str(corpus_file))}", "train.threads=1"]
    spec = ["model.hidden_size=16", "model.embedding_size=16", "optim.lr=1e6", "optim.clip=0", *NO_DROPOUT, ONCE]
    row = _run_task(("mingru", 0.05, spec), base)
    assert row is not None and row["val_bpc"] is None and row["steps"] is None
    assert row["diverged"].startswith("training stopped: the ") and "became non-finite at step" in row["diverged"]
    assert row["size"] == "mingru 2x16, lr 1e+06, no dropout" and bpc(row) == math.inf and bpc_text(row) == "diverged"
    assert steps_text(row) == "" and steps_text({"steps": 12}) == "12"  # the tables print no "None"
    finite = {"system": "mingru", "minutes": 0.05, "val_bpc": 4.1}
    rows, others = best_per_system([row, finite])
    assert rows == [finite] and others == [row]
    alone, _ = best_per_system([row])
    assert alone == [row]  # every candidate diverged: the row says so


def test_resume_names_a_run_as_frontier_json_does() -> None:
    """--resume skips a task whose (system, minutes, spec) is recorded: the spec as repr writes it, read back."""
    tasks = tasks_for(list(SYSTEMS), [2], tune=True)
    rows = json.loads(json.dumps([{"system": s, "minutes": m, "spec": repr(spec)} for s, m, spec in tasks]))
    assert {task_key(r["system"], r["minutes"], r["spec"]) for r in rows} == {task_key(*t) for t in tasks}
    assert len({task_key(*t) for t in tasks}) == len(tasks) == 3 * len(SYSTEMS)


def test_a_pick_run_without_tune_counts_as_that_candidate_when_tuning_later() -> None:
    """A row an earlier version recorded without --tune has spec None: it ran the budget's first candidate, so
    --tune --resume skips that candidate and runs only the other two of each system."""
    picks = [{"system": s, "minutes": 15.0, "spec": "None"} for s in SYSTEMS]
    have = {task_key(r["system"], r["minutes"], r["spec"]) for r in picks}
    left = [t for t in tasks_for(list(SYSTEMS), [15], tune=True) if task_key(*t) not in have]
    assert len(left) == 2 * len(SYSTEMS)
    assert all(spec != sized(candidates_of(system), 15)[0] for system, _, spec in left)


def run_plain(monkeypatch: pytest.MonkeyPatch, corpus_file: Path, out: Path, *args: str) -> dict[str, Any]:
    """``python -m benchmarks.frontier --systems plain`` on ``corpus_file`` into ``out``: its frontier.json."""
    from benchmarks import frontier

    argv = ["frontier", "--systems", "plain", "--data", str(corpus_file), "--out", str(out), *args]
    monkeypatch.setattr(sys, "argv", argv)
    frontier.main()
    return dict(json.loads((out / "frontier.json").read_text()))


def test_resume_runs_only_what_frontier_json_lacks_and_keeps_the_rest(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import frontier

    def run(*args: str) -> list[tuple[str, float]]:
        document = run_plain(monkeypatch, corpus_file, tmp_path, *args)
        return sorted((r["system"], r["minutes"]) for r in document["rows"] + document["other_candidates"])

    assert run("--budgets", "0.002") == [("plain", 0.002)]
    recorded = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    assert [r["spec"] for r in recorded] == [repr(PlainConfig())]  # the pick, by name: --tune would keep it
    calls: list[object] = []
    real = frontier._run_task
    monkeypatch.setattr(frontier, "_run_task", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert run("--budgets", "0.002,0.003", "--resume") == [("plain", 0.002), ("plain", 0.003)]
    assert calls == [("plain", 0.003, None)]  # the 0.002 run was recorded already
    assert run("--budgets", "0.003", "--resume") == [("plain", 0.002), ("plain", 0.003)]  # nothing lost
    assert len(calls) == 1


def test_carry_gives_each_system_its_winner_at_the_shorter_budget() -> None:
    """--carry 5: every system once at 15 minutes, with the candidate that won its 5-minute runs (a diverged one
    never wins); a system without a finite run to carry is refused in one sentence."""
    from benchmarks.frontier import carried_tasks

    five = {s: sized(candidates_of(s), 5) for s in ("charlm", "plain", "transformer")}
    recorded = [{"system": s, "minutes": 5.0, "spec": repr(spec), "val_bpc": bpc}
                for s in five for spec, bpc in zip(five[s], (2.3, 2.1, None), strict=True)]
    recorded.append({"system": "plain", "minutes": 2.0, "spec": repr(five["plain"][0]), "val_bpc": 1.0})
    tasks = carried_tasks(["charlm", "plain", "transformer"], [15], recorded, 5)
    assert tasks == [(s, 15, five[s][1]) for s in ("charlm", "plain", "transformer")]
    assert isinstance(tasks[1][2], PlainConfig)  # the spec itself, read back from its repr
    runners_up = carried_tasks(["charlm", "plain"], [15, 30], recorded, 5, place=2)
    assert runners_up == [(s, m, five[s][0]) for m in (15, 30) for s in ("charlm", "plain")]
    with pytest.raises(ValueError, match=r"^no finite run at 5 minutes in place 1 to carry for slstm: run --budgets 5 "
                                         r"--tune first$"):
        carried_tasks(["charlm", "slstm"], [15], recorded, 5)
    with pytest.raises(ValueError, match=r"in place 3 to carry for charlm, plain"):  # the third diverged
        carried_tasks(["charlm", "plain"], [15], recorded, 5, place=3)


def test_a_carried_run_is_recorded_beside_the_tuned_ones(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import frontier

    def run(*args: str) -> dict[str, Any]:
        return run_plain(monkeypatch, corpus_file, tmp_path, *args)

    small = [PlainConfig(hidden=8, lr=1e-2), PlainConfig(hidden=16, lr=1e-2), PlainConfig(hidden=24, lr=3e-3)]
    monkeypatch.setattr(frontier, "PLAIN_SIZES", [(float("inf"), small)])
    tuned = run("--budgets", "0.002", "--tune")
    winner = next(r for r in tuned["rows"] if r["minutes"] == 0.002)
    carried = run("--budgets", "0.003", "--carry", "0.002")
    assert carried["tune"] is True  # the 0.002 runs were tuned
    runs = carried["rows"] + carried["other_candidates"]
    assert len(runs) == 4
    new = [r for r in runs if r["minutes"] == 0.003]
    assert [(r["spec"], r["carried_from"]) for r in new] == [(winner["spec"], 0.002)]
    assert not [r for r in runs if r["minutes"] == 0.002 and "carried_from" in r]


@pytest.mark.parametrize("args", [["--carry", "5", "--carry-place", "0"], ["--carry-place", "2"]])
def test_a_carry_place_needs_a_place_from_1_and_carry(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import frontier

    monkeypatch.setattr(sys, "argv", ["frontier", "--out", str(tmp_path), *args])
    with pytest.raises(SystemExit) as stop:
        frontier.main()
    assert stop.value.code == 2
    place = args[args.index("--carry-place") + 1]
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: --carry-place takes a place from 1 (the winner) and goes with --carry, got {place}")
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_carry_with_nothing_recorded_is_refused_before_the_folder_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import frontier

    out = tmp_path / "new"
    monkeypatch.setattr(sys, "argv", ["frontier", "--systems", "plain", "--budgets", "15", "--carry", "5",
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        frontier.main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: no finite run at 5 minutes in place 1 to carry for plain: run --budgets 5 --tune first")
    assert not out.exists()
