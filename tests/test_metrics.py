"""The figures of a split from summed NLLs (charlm.evaluation.metrics): exact, and finite where a diverged
model's perplexity overflows."""

from __future__ import annotations

import math

import pytest
import torch

from charlm.evaluation.metrics import LN2, BitsPerChar, CharCount, CharNLL, Perplexity, split_metrics, summarize


def test_summarize_by_hand() -> None:
    assert summarize(6.0, 4) == {"loss": 1.5, "bpc": 1.5 / math.log(2), "perplexity": math.exp(1.5), "chars": 4}
    assert math.log(2) == LN2
    assert summarize(0.0, 0) == {"loss": 0.0, "bpc": 0.0, "perplexity": 1.0, "chars": 0}  # nothing scored
    assert summarize(1400.0, 2)["perplexity"] == math.exp(700)
    assert summarize(1600.0, 2)["perplexity"] == math.exp(700)  # saturated: math.exp overflows past 709.78
    assert summarize(699.0 * 2, 2)["perplexity"] == math.exp(699)
    assert summarize(3.0, 1)["loss"] == 3.0


@pytest.mark.parametrize("loss", [0.75, 80.0, 88.0])
def test_each_figure_in_float32_from_float64_sums(loss: float) -> None:
    metrics = split_metrics("val")
    metrics.update(torch.tensor(loss * 3), 3)
    metrics.update(torch.tensor(loss, dtype=torch.float64), 1)
    got = metrics.compute()
    expected = {"val_loss": loss, "val_bpc": loss / LN2, "val_ppl": math.exp(loss), "val_chars": 4.0}
    assert {k: (v.dtype, v.item()) for k, v in got.items()} == {
        k: (torch.float32, torch.tensor(v, dtype=torch.float64).float().item()) for k, v in expected.items()}
    assert list(metrics.compute_groups.values()) == [["loss", "bpc", "ppl", "chars"]]  # one pair of sums


def test_a_diverged_runs_perplexity_is_saturated_not_inf() -> None:
    """exp(100) does not fit a float32: the logged perplexity is float32's largest number, finite; NaN stays NaN."""
    ppl = Perplexity()
    ppl.update(torch.tensor(300.0), 3)
    assert ppl.compute().item() == torch.finfo(torch.float32).max
    ppl.update(torch.tensor(float("nan")), 1)
    assert math.isnan(ppl.compute().item())


def test_the_sums_add_up_and_reset() -> None:
    nll, bpc, count = CharNLL(), BitsPerChar(), CharCount()
    for metric in (nll, bpc, count):
        metric.update(torch.tensor(2.0, dtype=torch.float64), 5)
        metric.update(torch.tensor(1.0), 3)
    assert nll.nll_sum.dtype == torch.float64 and nll.nll_sum.item() == 3.0 and nll.chars.item() == 8
    assert nll.mean_nll().item() == 3.0 / 8 and nll.mean_nll().dtype == torch.float64
    assert nll.compute().item() == torch.tensor(3.0 / 8).item() and bpc.compute().item() == torch.tensor(
        3.0 / 8 / LN2).item()
    assert count.compute().item() == 8.0 and count.higher_is_better is None and nll.higher_is_better is False
    nll.reset()
    assert nll.mean_nll().item() == 0.0  # no characters: 0 / max(0, 1)
    nll.update(torch.tensor(2.5), 1)
    assert nll.mean_nll().item() == 2.5


def test_both_sums_are_added_over_processes() -> None:
    """Under DDP torchmetrics gathers each state from every process and reduces it: by a sum, for both sums
    (here two processes' states, handed over as the gather would), so every figure is the whole split's."""
    metric = CharNLL()
    metric.update(torch.tensor(3.0), 4)
    metric.sync(dist_sync_fn=lambda state, group=None: [state, state * 3], distributed_available=lambda: True)
    assert (metric.nll_sum.shape, metric.nll_sum.item()) == ((), 12.0)
    assert (metric.chars.shape, metric.chars.item()) == ((), 16)
    assert metric.mean_nll().item() == 0.75
