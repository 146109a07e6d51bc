"""The comparison's differences to the reference row: Welch's t-test and the papers' claims."""

from __future__ import annotations

import math
import statistics

import pytest

from charlm.tools.compare.plan import Entry
from charlm.tools.compare.records import RunResult
from charlm.tools.compare.significance import difference, significance_markdown, significance_rows, welch_p
from charlm.tools.compare.summary import CellSummary


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t and its Welch-Satterthwaite degrees of freedom, from the textbook formulas."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df


def summary(name: str, test_bpc: list[float], cell: str | None = None) -> CellSummary:
    cell = cell or name.lower()
    runs = [RunResult(cell=cell, name=name, seed=i, run_dir=f"{cell}-{i}", hidden_size=32, parameters=1000,
                      val_loss=v * math.log(2), val_bpc=v, val_ppl=2**v, test_loss=v * math.log(2), test_bpc=v,
                      test_ppl=2**v, train_seconds=1.0, train_chars_per_s=1.0, best_step=5, steps=5)
            for i, v in enumerate(test_bpc)]
    return CellSummary(Entry(cell, name), 32, list(range(len(test_bpc))), runs)


def test_welch_p_matches_the_t_distribution_of_welchs_statistic() -> None:
    from scipy.stats import t as student_t

    a, b = [1.0, 2.0, 3.5], [4.0, 5.0, 6.5, 6.0]
    t, df = welch_by_hand(a, b)
    assert welch_p(a, b) == pytest.approx(2 * student_t.sf(abs(t), df), rel=1e-9)
    assert welch_p(a, b) == pytest.approx(welch_p(b, a), rel=1e-12)  # two-sided


def test_no_p_value_without_two_seeds_a_side() -> None:
    assert welch_p([1.0], [2.0, 3.0]) is None
    d = difference(summary("NFG", [2.0]), summary("V", [1.0, 1.1]), "test_bpc")
    assert d.diff == pytest.approx(2.0 - 1.05) and d.p is None and d.text() == "+0.9500"


def test_papers_claims_are_judged_on_the_test_split() -> None:
    rows = [summary("V", [1.50, 1.51, 1.52], "peephole"),
            summary("NFG", [1.70, 1.72, 1.71], "nfg"),  # clearly worse: agrees with Greff
            summary("CIFG", [1.70, 1.72, 1.71], "cifg"),  # clearly worse: Greff says no significant loss
            summary("NP", [1.40, 1.41, 1.42], "np"),  # clearly better: no loss, agrees
            summary("FGR", [1.40, 1.41, 1.42], "fgr"),  # clearly better: Greff says it does not help
            summary("NIG", [1.52, 1.50, 1.51], "nig"),  # no claim
            summary("NOAF", [1.505, 1.515, 1.50], "noaf")]  # the same: Greff says it hurts
    table = {r[0]: r for r in significance_rows(rows, "greff")}
    assert table["NFG"][4:] == ["significantly worse", "yes"]
    assert table["CIFG"][4:] == ["significantly worse", "no"]
    assert table["NP"][4:] == ["significantly better", "yes"]
    assert table["FGR"][4:] == ["significantly better", "no"]
    assert table["NIG"][3:] == ["—", "—", "—"]
    assert table["NOAF"][4:] == ["no significant difference", "no"]
    assert table["NFG"][2].startswith("+0.2000 (p=") and table["NFG"][2].endswith(" *")
    assert not table["NIG"][2].endswith("*")
    md = "\n".join(significance_markdown(rows, "greff"))
    assert "## Against the reference row (V)" in md and "| NFG |" in md and "Welch's t-test" in md


def test_lstm_b_closing_the_gap_to_gru() -> None:
    rows = [summary("LSTM", [1.60, 1.61]), summary("LSTM-b", [1.52, 1.53]), summary("GRU", [1.50, 1.51])]
    table = {r[0]: r for r in significance_rows(rows, "jozefowicz")}
    assert table["LSTM-b"][5] == "yes" and "LSTM-GRU gap +0.1000" in table["LSTM-b"][4]
    rows[1] = summary("LSTM-b", [1.59, 1.60])
    assert {r[0]: r for r in significance_rows(rows, "jozefowicz")}["LSTM-b"][5] == "no"


def test_mut1_matching_lstm_is_a_claim_of_no_difference() -> None:
    rows = [summary("LSTM", [1.60, 1.61, 1.62]), summary("MUT1", [1.605, 1.615, 1.61])]
    assert {r[0]: r for r in significance_rows(rows, "jozefowicz")}["MUT1"][4:] == ["no significant difference",
                                                                                     "yes"]
    rows[1] = summary("MUT1", [1.50, 1.51, 1.52])  # better is not "matches"
    assert {r[0]: r for r in significance_rows(rows, "jozefowicz")}["MUT1"][4:] == ["significantly better", "no"]
