"""benchmarks/cells.py's normalisations: the hidden size at nn.LSTM's parameter count, and training FLOPs per
character (every row is then compared per FLOP)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.cells import REFERENCE, build, matched_hidden, parameter_count, train_flops_per_char

ARGS = argparse.Namespace(hidden=24, layers=2, vocab=11, batch=4)


def test_train_flops_count_every_matrix_but_the_embedding_three_times_two() -> None:
    h, v = ARGS.hidden, ARGS.vocab
    lstm, _ = build(REFERENCE, ARGS)
    assert train_flops_per_char(lstm) == 6 * (2 * (4 * h * h + 4 * h * h) + v * h)
    mingru, path = build("mingru", ARGS)  # z and g blocks of weight_ih only
    assert path == "scan" and train_flops_per_char(mingru) == 6 * (2 * (2 * h * h) + v * h)


@pytest.mark.parametrize("row", ["mingru", "minlstm", "slstm", "gru", "mogrifier"])
def test_matched_hidden_is_the_size_nearest_the_lstms_parameter_count(row: str) -> None:
    target = parameter_count(build(REFERENCE, ARGS)[0])
    h = matched_hidden(row, ARGS, target)
    counts = {size: parameter_count(build(row, ARGS, size)[0]) for size in (h - 1, h, h + 1)}
    assert abs(counts[h] - target) <= abs(counts[h - 1] - target)
    assert abs(counts[h] - target) < abs(counts[h + 1] - target)
    assert h == {"slstm": 24}.get(row, h)  # slstm has nn.LSTM's matrices: the same size


@pytest.mark.parametrize(("row", "path"), [("lstm", "torch"), ("gru", "kernel"), ("gru[aten]", "torch"),
                                          ("gru[autograd]", "autograd"), ("lstm[custom]", "kernel"),
                                          ("gru-cho", "kernel"), ("mut2[autograd]", "autograd")])
def test_the_path_column_names_what_the_layers_run(row: str, path: str) -> None:
    assert build(row, ARGS)[1] == path
