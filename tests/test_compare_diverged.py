"""Diverged runs in ``charlm compare``: reported, not averaged (summary, tables, t-test, the papers' claims),
``--rebuild`` (the tables written again from the run records, the committed Greff table among them), and the
``modern`` preset."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import invoke

from charlm.tools.compare.plan import PRESET_SEEDS, Entry, resolve_entries
from charlm.tools.compare.records import RunResult
from charlm.tools.compare.significance import difference, significance_rows, verdict
from charlm.tools.compare.summary import CellSummary, best_cell
from charlm.tools.compare.tables import markdown_table, run_rows, table_cells

GREFF = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compare-greff"
V = 65




def run(cell: str, seed: int, val_loss: float, *, vocab_size: int | None = V) -> RunResult:
    bpc = val_loss / math.log(2)
    return RunResult(cell=cell, name=cell.upper(), seed=seed, run_dir=f"{cell}-seed{seed}", hidden_size=32,
                     parameters=1000, val_loss=val_loss, val_bpc=bpc, val_ppl=math.exp(min(val_loss, 700)),
                     test_loss=val_loss + 0.05, test_bpc=bpc + 0.05 / math.log(2),
                     test_ppl=math.exp(min(val_loss + 0.05, 700)), train_seconds=10.0, train_chars_per_s=100.0,
                     best_step=5, steps=5, vocab_size=vocab_size)


def cell(name: str, losses: list[float], **kw: object) -> CellSummary:
    runs = [run(name.lower(), i + 1, loss, **kw) for i, loss in enumerate(losses)]  # type: ignore[arg-type]
    return CellSummary(Entry(name.lower(), name), 32, [1, 2, 3], runs)


def test_a_run_diverged_when_its_best_val_loss_is_not_finite_or_worse_than_uniform() -> None:
    ln_v = math.log(V)
    assert not run("a", 1, ln_v - 1e-6).diverged()
    assert run("a", 1, ln_v + 1e-6).diverged()
    assert run("a", 1, float("nan")).diverged() and run("a", 1, float("inf")).diverged()
    old = run("a", 1, ln_v + 1, vocab_size=None)  # a record made before charlm kept V
    assert not old.diverged() and old.diverged(V)


def test_diverged_runs_are_counted_and_left_out_of_every_figure() -> None:
    noaf = cell("NOAF", [1.91, 81.65, 3.80])
    assert noaf.diverged_text() == "1/3" and [r.seed for r in noaf.diverged] == [2]
    assert noaf.stat("val_loss")["mean"] == pytest.approx((1.91 + 3.80) / 2)
    assert noaf.stat("val_loss")["max"] == pytest.approx(3.80)
    values = table_cells(noaf, multi_seed=True, show_hidden=False)
    assert values[-2:] == ["3/3", "1/3"]
    assert "e+" not in " ".join(values) and max(len(v) for v in values) < 20  # no 43-digit perplexity
    ppl = (math.exp(1.96), math.exp(3.85))  # the test perplexities of the two seeds kept
    assert values[6] == f"{sum(ppl) / 2:.3f} ± {abs(ppl[0] - ppl[1]) / 2 ** 0.5:.3f}"
    row = noaf.row(best=False)
    assert row["diverged"] == 1 and row["runs"] == 3
    every = cell("X", [float("nan"), 90.0, 100.0])
    assert every.stat("val_bpc")["mean"] is None and table_cells(every, multi_seed=True, show_hidden=False)[2] == "—"
    single = CellSummary(Entry("x", "X"), 32, [1], [run("x", 1, 90.0)])
    assert table_cells(single, multi_seed=False, show_hidden=False)[0] == "X (x) (diverged)"


def test_runs_csv_keeps_every_score_but_a_diverged_runs_perplexity() -> None:
    noaf = cell("NOAF", [1.91, 81.65, 3.80])
    rows = run_rows([noaf], noaf.runs)
    assert [r["diverged"] for r in rows] == [False, True, False]
    assert rows[1]["val_loss"] == 81.65 and rows[1]["val_ppl"] is None and rows[1]["test_ppl"] is None
    assert rows[0]["val_ppl"] == pytest.approx(math.exp(1.91))


def test_the_best_row_is_never_one_with_a_diverged_run() -> None:
    summaries = [cell("V", [1.80, 1.81, 1.82]), cell("NOAF", [1.50, 81.0, 1.51]), cell("NP", [1.79, 1.80, 1.81])]
    assert best_cell(summaries) == "np"  # NOAF's surviving seeds score lower, but one diverged
    assert "★ **NP (np)**" in markdown_table(summaries)


def test_divergence_is_worse_for_the_papers_claims_and_left_out_of_the_t_test() -> None:
    v, noaf = cell("V", [1.80, 1.81, 1.82]), cell("NOAF", [1.79, 81.0, 1.80])
    d = difference(noaf, v, "test_bpc")
    assert d.diff == pytest.approx((1.79 + 1.80) / 2 / math.log(2) - 1.81 / math.log(2))  # the survivors only
    assert d.text().endswith("; 1/3 diverged (reference 0/3)")
    # its surviving seeds are no worse than V's, yet the row is worse: it diverged where V never did
    assert verdict("worse", noaf, v, [v, noaf]) == ("1/3 seeds diverged (reference 0/3): worse", "yes")
    assert verdict("not worse", noaf, v, [v, noaf])[1] == "no"
    assert verdict("same", noaf, v, [v, noaf])[1] == "no"
    assert verdict("not better", noaf, v, [v, noaf])[1] == "yes"
    better = cell("NP", [1.79, 1.80, 1.81])
    wild_v = cell("V", [1.80, 90.0, 1.82])
    assert verdict("not worse", better, wild_v, [wild_v, better]) == ("0/3 seeds diverged (reference 1/3): better",
                                                                      "yes")
    both = cell("NOAF", [1.80, 90.0, 1.82])  # the same share on both sides: the survivors decide
    seen, agree = verdict("worse", both, wild_v, [wild_v, both])
    assert seen == "no significant difference (1/3 diverged (reference 1/3): the others compared)" and agree == "no"
    rows = significance_rows([v, noaf], "greff")
    assert rows[0][0] == "NOAF" and rows[0][-2:] == ["1/3 seeds diverged (reference 0/3): worse", "yes"]


# ---------------------------------------------------------------------------------------------------- --rebuild
def test_rebuild_of_the_committed_greff_table_reports_noaf_as_diverged(tmp_path: Path) -> None:
    """The committed tables are what --rebuild makes of the committed records (the written time apart), and NOAF's
    row is 1/3 diverged, its figures over the two other seeds, its verdict "worse", agreeing with the paper."""
    folder = tmp_path / "greff"
    shutil.copytree(GREFF, folder)
    (folder / "curves.png").unlink()
    document = json.loads((folder / "results.json").read_text())
    for record in document["runs"]:  # as the records were first written, before charlm kept V
        del record["vocab_size"]
    (folder / "results.json").write_text(json.dumps(document), encoding="utf-8")
    code, output = invoke("compare", "--rebuild", "--out", str(folder))
    assert code == 0, output
    for name in ("results.csv", "runs.csv", "results.md"):
        assert (folder / name).read_text(encoding="utf-8") == (GREFF / name).read_text(encoding="utf-8"), name
    rebuilt, committed = (json.loads((f / "results.json").read_text()) for f in (folder, GREFF))
    rebuilt.pop("written"), committed.pop("written")
    assert rebuilt == committed
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")
    with (folder / "results.csv").open() as fh:
        noaf = next(r for r in csv.DictReader(fh) if r["cell"] == "noaf")
    with (folder / "runs.csv").open() as fh:
        runs = [r for r in csv.DictReader(fh) if r["cell"] == "noaf"]
    assert noaf["diverged"] == "1" and noaf["runs"] == "3"
    assert [r["diverged"] for r in runs] == ["True", "False", "False"] and {r["vocab_size"] for r in runs} == {"65"}
    kept = [float(r["val_bpc"]) for r in runs if r["diverged"] == "False"]
    assert float(noaf["val_bpc"]) == pytest.approx(sum(kept) / 2, abs=1e-6)
    md = (folder / "results.md").read_text(encoding="utf-8")
    assert "| NOAF (noaf) | 128 | 149,185 | 2.8537 ± 1.3346 | 4.1171 ± 1.9255 |" in md and "| 3/3 | 1/3 |" in md
    assert ("| no output activation hurts significantly | 1/3 seeds diverged (reference 0/3): worse | yes |" in md)


def test_rebuild_takes_v_from_the_parameter_count_only_where_it_fits(tmp_path: Path) -> None:
    folder = tmp_path / "greff"
    folder.mkdir()
    document = json.loads((GREFF / "results.json").read_text())
    for record in document["runs"]:
        del record["vocab_size"]
    document["runs"][4]["parameters"] += 1
    (folder / "results.json").write_text(json.dumps(document), encoding="utf-8")
    code, output = invoke("compare", "--rebuild", "--out", str(folder))
    assert code == 2 and ("the record of run niaf-seed1 (149,186 parameters) fits no vocabulary size for niaf at "
                          "hidden size 128; its settings do not match its scores") in output


def test_rebuild_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    code, output = invoke("compare", "--rebuild")
    assert code == 2 and "--rebuild needs --out: the folder of the comparison whose tables to write again" in output
    code, output = invoke("compare", "--rebuild", "--out", str(tmp_path), "--cells", "lstm")
    assert code == 2 and "--rebuild trains nothing and keeps the comparison's own settings; leave out --cells" in output
    code, output = invoke("compare", "--rebuild", "--out", str(tmp_path), "--set", "model.hidden_size=3")
    assert code == 2 and "leave out --set" in output
    code, output = invoke("compare", "--rebuild", "--out", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'results.json'} does not exist; --rebuild needs the folder of a comparison" \
        in output
    (tmp_path / "results.json").write_text('{"settings": {"cells": []}}', encoding="utf-8")
    code, output = invoke("compare", "--rebuild", "--out", str(tmp_path))
    assert code == 2 and "is not a charlm compare results file (it has no settings.seeds, settings.hidden_sizes, " \
        "settings.config_values)" in output and "Traceback" not in output


# ------------------------------------------------------------------------------------------------ the modern preset
def test_the_modern_preset_names_its_rows_and_settles_seeds_and_matched_parameters() -> None:
    entries = resolve_entries(None, "modern")
    assert [(e.cell, e.name) for e in entries] == [("lstm", "LSTM"), ("gru", "GRU"), ("mingru", "minGRU"),
                                                   ("minlstm", "minLSTM"), ("slstm", "sLSTM"),
                                                   ("mogrifier", "Mogrifier")]
    assert PRESET_SEEDS["modern"] == "1,2,3"


def test_compare_preset_modern_finishes_with_diverged_column_and_p_values(corpus_file: Path, tmp_path: Path) -> None:
    """Every row trains (two seeds here for time; the preset's own are three), at matched parameter counts, and the
    table has the diverged column and a p-value against LSTM for every other row."""
    out = tmp_path / "modern"
    code, output = invoke("compare", "--preset", "modern", "--config", "smoke", "--data", str(corpus_file),
                          "--out", str(out), "--max-steps", "3", "--seeds", "1,2", "--set", "model.hidden_size=24",
                          "--set", "model.mogrifier_rounds=2", "--set", "train.val_every_steps=3")
    assert code == 0, output
    assert "matched parameters to LSTM" in output
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["match_params"] is True and document["settings"]["seeds"] == [1, 2]
    assert len(document["runs"]) == 12 and {r["vocab_size"] for r in document["runs"]} == {len(set(
        corpus_file.read_text(encoding="utf-8")))}
    hidden = document["settings"]["hidden_sizes"]
    assert hidden["lstm"] == 24 and hidden["mingru"] > hidden["lstm"] > hidden["mogrifier"]
    md = (out / "results.md").read_text()
    assert "| seeds done | diverged |" in md
    against = [line for line in md.splitlines() if line.startswith("| ") and "(p=" in line]
    assert [line.split(" | ")[0][2:] for line in against] == ["GRU", "minGRU", "minLSTM", "sLSTM", "Mogrifier"]
