"""Scoring a text exactly (charlm.evaluation.scoring), against plain references on tiny untrained models: every
character once, the state carried across windows and into the tail, in text order, whatever the layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from charlm.config import ModelConfig
from charlm.data.streams import Batch
from charlm.evaluation.scoring import (
    char_nlls,
    evaluate_ids,
    finite_or_null,
    nonfinite_parameters,
    score_batch,
    validation_streams,
)
from charlm.model.char_lm import CharLM

V = 11


def tiny_model(cell: str = "lstm") -> CharLM:
    torch.manual_seed(0)
    model = CharLM(V, ModelConfig(cell=cell, embedding_size=6, hidden_size=7, num_layers=2, tie_weights=False))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # scores that depend strongly on the state: a lost state shows
    return model.eval()


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def stream_nlls(model: CharLM, ids: torch.Tensor) -> torch.Tensor:
    """Each character's NLL (but the first's) with the text read in one pass as one stream: the reference."""
    logits = model(ids[:-1].view(1, -1)).logits[0]
    return F.cross_entropy(logits.double(), ids[1:], reduction="none")


def test_one_stream_in_windows_is_one_pass() -> None:
    model, ids = tiny_model(), ids_of(103)
    expected = stream_nlls(model, ids)
    nll = char_nlls(model, ids, batch_size=1, bptt=10)
    assert nll.dtype == torch.float64 and nll.shape == (102,)
    torch.testing.assert_close(nll, expected, rtol=0, atol=1e-5)
    result = evaluate_ids(model, ids, batch_size=1, bptt=10)
    assert result["chars"] == 102 and result["loss"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2)) and result["seconds"] >= 0
    assert result["chars_per_s"] == pytest.approx(102 / max(result["seconds"], 1e-9))


@pytest.mark.parametrize(("n", "streams", "bptt"), [(103, 4, 7), (50, 3, 5), (12, 5, 4), (9, 20, 3)])
def test_streams_and_their_tail_score_each_character_once_in_text_order(n: int, streams: int, bptt: int) -> None:
    """B streams of L characters, then the left-over tail continuing the last one: each character's NLL is
    that of reading its own stream (the tail joined to the last) from its start, in one pass."""
    model, ids = tiny_model(), ids_of(n)
    rows = max(1, min(streams, n - 1))
    length = (n - 1) // rows
    expected = []
    for r in range(rows):
        end = (r + 1) * length + 1 if r < rows - 1 else n  # the last stream takes the tail too
        expected.append(stream_nlls(model, ids[r * length : end]))
    nll = char_nlls(model, ids, batch_size=streams, bptt=bptt)
    torch.testing.assert_close(nll, torch.cat(expected), rtol=0, atol=1e-5)
    result = evaluate_ids(model, ids, batch_size=streams, bptt=bptt)
    assert result["chars"] == n - 1 and result["loss"] == pytest.approx(float(nll.mean()), abs=1e-6)


def test_score_batch_sums_or_lists_and_carries_the_state() -> None:
    model, ids = tiny_model(), ids_of(41)
    x, y = ids[:-1].view(2, 20), ids[1:].view(2, 20)
    first_sum, states = score_batch(model, Batch(x[:, :10], y[:, :10]), None)
    per_char, _ = score_batch(model, Batch(x[:, :10], y[:, :10]), None, reduction="none")
    assert per_char.shape == (20,) and first_sum.item() == pytest.approx(per_char.sum().item(), rel=1e-6)
    second, _ = score_batch(model, Batch(x[:, 10:], y[:, 10:]), states, reduction="none")
    with torch.no_grad():
        whole = model(x).logits[:, 10:]
    expected = F.cross_entropy(whole.reshape(-1, V), y[:, 10:].reshape(-1), reduction="none")
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-5)  # row by row, state carried
    tail, _ = score_batch(model, Batch(x[1:, 10:13], y[1:, 10:13], tail=True), states, reduction="none")
    with torch.no_grad():
        continued = model(x[1:, 10:13], [tuple(t[:, 1:] for t in s) for s in states]).logits
    torch.testing.assert_close(tail, F.cross_entropy(continued[0], y[1, 10:13], reduction="none"), rtol=0, atol=1e-6)


def test_the_validation_layout_is_the_runs() -> None:
    """As many streams as the run's validation: data.eval_batch_size per process (fewer for a short split),
    times the processes it trained on."""
    assert validation_streams({"resume_state": {"world_size": 3}}, 1000, 16) == 48
    assert validation_streams({"resume_state": {"world_size": 3}}, 31, 16) == 30  # 10 per process
    assert validation_streams({"resume_state": {"world_size": 1}}, 1000, 16) == 16
    assert validation_streams({}, 1000, 4) == 4 and validation_streams({"resume_state": None}, 1000, 4) == 4
    assert validation_streams({"resume_state": {}}, 10, 16) == 9
    for bad in (0, -2, "2", None):  # a damaged record: one process
        assert validation_streams({"resume_state": {"world_size": bad}}, 1000, 4) == 4


def test_nonfinite_parameters_are_named() -> None:
    model = tiny_model()
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model.decoder.bias[2] = float("nan")
        model.layers[1].weight_hh_l0[0, 0] = float("-inf")
    assert nonfinite_parameters(model) == ["layers.1.weight_hh_l0", "decoder.bias"]


def test_finite_or_null() -> None:
    fine = {"loss": 1.5, "chars": 3, "source": "x"}
    assert finite_or_null(fine, "why") is fine
    one = finite_or_null({"loss": 1.5, "perplexity": math.inf, "chars": 3}, "it overflowed")
    assert one == {"loss": 1.5, "perplexity": None, "chars": 3,
                   "reason": "perplexity is not a finite number: it overflowed"}
    two = finite_or_null({"loss": math.nan, "bpc": math.nan, "chars": 3}, "NaN weights")
    assert two == {"loss": None, "bpc": None, "chars": 3, "reason": "loss, bpc are not a finite number: NaN weights"}
