"""Stream layout: rows side by side, windows that continue each other, exact coverage, DDP shards."""

from __future__ import annotations

import itertools

import torch

from charlm.data.datamodule import split_ids
from charlm.data.streams import StreamLayout, WindowSampler


def test_window_k_plus_one_continues_window_k() -> None:
    ids = torch.arange(1000)
    layout = StreamLayout(ids, batch_size=4)
    windows = list(WindowSampler(layout, bptt=16))
    batches = [layout.batch(w) for w in windows]
    for prev, nxt in itertools.pairwise(batches):
        # the first input of window k+1 is the char after the last input of window k, in every row
        assert torch.equal(nxt.x[:, 0], prev.x[:, -1] + 1)
    for b in batches:
        assert torch.equal(b.y, b.x + 1)  # targets are the inputs shifted by one char
    # rows are contiguous, consecutive slices of the stream
    assert torch.equal(layout.inputs[:, 0], torch.arange(4) * layout.row_length)


def test_evaluation_layout_scores_every_char_once() -> None:
    ids = torch.arange(1003)
    layout = StreamLayout(ids, batch_size=7, keep_tail=True)
    targets = torch.cat([layout.batch(w).y.reshape(-1) for w in WindowSampler(layout, bptt=10)])
    assert sorted(targets.tolist()) == list(range(1, 1003))
    assert layout.chars == 1002
    # the tail continues the last row
    assert layout.tail_inputs is not None and int(layout.tail_inputs[0, 0]) == int(layout.inputs[-1, -1]) + 1


def test_ddp_shards_are_disjoint_contiguous_and_cover_the_rows() -> None:
    ids = torch.arange(10_001)
    world, batch = 3, 4
    shards = [StreamLayout(ids, batch, rank=r, world_size=world, keep_tail=True) for r in range(world)]
    rows = torch.cat([s.inputs for s in shards])
    assert torch.equal(rows.reshape(-1), torch.arange(rows.numel()))  # rank r owns rows [rB, (r+1)B)
    assert all(s.row_length == shards[0].row_length for s in shards)  # same windows on every rank
    assert [s.tail_inputs is not None for s in shards] == [False, False, True]
    assert sum(s.chars for s in shards) == 10_000


def test_split_is_contiguous_90_5_5() -> None:
    ids = torch.arange(1000)
    s = split_ids(ids, 0.05, 0.05)
    assert (s.train.numel(), s.val.numel(), s.test.numel()) == (900, 50, 50)
    assert torch.equal(torch.cat([s.train, s.val, s.test]), ids)
