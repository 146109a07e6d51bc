"""The frontier's runs: every system at every budget, every candidate with --tune, the best one kept."""

from __future__ import annotations

from benchmarks.frontier import CHARLM_SIZES, TRANSFORMER_SIZES, best_per_system, sized, tasks_for


def test_without_tune_each_system_runs_once_per_budget_with_its_pick() -> None:
    tasks = tasks_for(["charlm", "plain", "transformer"], [2, 15], tune=False)
    assert tasks == [(s, m, None) for m in (2, 15) for s in ("charlm", "plain", "transformer")]


def test_tune_runs_every_candidate_of_charlm_and_the_transformer() -> None:
    tasks = tasks_for(["charlm", "mogrifier", "plain", "transformer"], [5], tune=True)
    assert [spec for system, _, spec in tasks if system == "charlm"] == sized(CHARLM_SIZES, 5)
    assert [spec for system, _, spec in tasks if system == "transformer"] == sized(TRANSFORMER_SIZES, 5)
    assert [spec for system, _, spec in tasks if system in ("mogrifier", "plain")] == [None, None]


def test_the_best_candidate_is_the_figure_and_the_others_are_kept() -> None:
    runs = [{"system": "charlm", "minutes": 2, "val_bpc": 2.3}, {"system": "charlm", "minutes": 2, "val_bpc": 2.2},
            {"system": "plain", "minutes": 2, "val_bpc": 2.4}, {"system": "charlm", "minutes": 5, "val_bpc": 2.5}]
    rows, others = best_per_system(runs)
    assert [r["val_bpc"] for r in rows] == [2.2, 2.4, 2.5]
    assert others == [runs[0]]
