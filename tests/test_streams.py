"""Stream layout: rows side by side, windows that continue each other, exact coverage, DDP shards."""

from __future__ import annotations

import itertools

import pytest
import torch

from charlm.data.bptt import window_schedule
from charlm.data.datamodule import split_ids
from charlm.data.streams import Batch, ResumableLoader, StreamDataset, StreamLayout, Window, WindowSampler


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


def test_layout_refuses_too_few_characters_and_has_a_tail_only_when_asked_and_left_over() -> None:
    """Rows of at least one input; a tail only on request, and only where characters are left over."""
    with pytest.raises(ValueError, match=r"^8 characters cannot fill 8 streams of at least 2$"):
        StreamLayout(torch.arange(8), batch_size=4, world_size=2)
    exact = StreamLayout(torch.arange(41), batch_size=4, keep_tail=True)  # 40 inputs: 4 rows of 10, none left
    assert exact.tail_inputs is None and exact.tail_targets is None
    untold = StreamLayout(torch.arange(47), batch_size=4)  # 46 inputs: 6 left, no tail asked for
    assert untold.tail_inputs is None and untold.tail_targets is None
    told = StreamLayout(torch.arange(47), batch_size=4, keep_tail=True)
    assert told.tail_inputs is not None and told.tail_targets is not None
    assert told.tail_inputs.tolist() == [[44, 45]]  # 4 rows of 11
    assert told.tail_targets.tolist() == [[45, 46]]


def _loader(seed: int = 3) -> tuple[StreamLayout, WindowSampler, ResumableLoader]:
    """8 rows of 200 inputs and a tail of 6, variable-length windows around 20 (Merity et al. 2017)."""
    layout = StreamLayout(torch.arange(1607), batch_size=8, keep_tail=True)
    sampler = WindowSampler(layout, 20, variable=True, seed=seed)
    return layout, sampler, ResumableLoader(StreamDataset(layout), sampler)


def _expected(layout: StreamLayout, seed: int, epoch: int) -> list[Window]:
    """The windows of an epoch by hand: the rows' schedule, then the tail in windows of bptt = 20."""
    cuts = window_schedule(layout.row_length, 20, variable=True, seed=seed, epoch=epoch)
    return [Window(start, length) for start, length in cuts] + [Window(0, 6, tail=True)]


def test_sampler_cuts_its_seeds_and_epochs_windows() -> None:
    """The windows are the schedule of the sampler's seed and epoch (0 until set), then the tail's."""
    layout, sampler, _ = _loader()
    assert sampler.windows() == _expected(layout, 3, 0) != _expected(layout, 3, 1)
    sampler.set_epoch(2)
    assert sampler.windows() == list(sampler) == _expected(layout, 3, 2)
    assert WindowSampler(layout, 20, variable=True).windows() == _expected(layout, 0, 0) != _expected(layout, 3, 0)
    short = StreamLayout(torch.arange(407), batch_size=8, keep_tail=True)  # 8 rows of 50, a tail of 6
    assert WindowSampler(short, 4).windows()[-3:] == [Window(48, 2), Window(0, 4, tail=True), Window(4, 2, tail=True)]


def test_loader_counts_what_it_serves_and_resumes_after_it() -> None:
    """``served`` counts the batches handed out; a loader loaded with that state serves the rest of that epoch,
    then whole epochs; one saved after an epoch's last batch goes on with the next epoch."""
    layout, sampler, loader = _loader()
    assert loader.pin_memory is False
    assert loader.state_dict() == {"epoch": 0, "served": 0}
    epoch0 = _expected(layout, 3, 0)
    state = torch.get_rng_state()
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    assert loader.state_dict() == {"epoch": 0, "served": 5}
    assert [b.x.tolist() for b in first] == [layout.batch(w).x.tolist() for w in epoch0[:5]]
    rest = list(it)
    assert len(first) + len(rest) == len(loader) == len(epoch0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG neither read nor moved
    assert list(sampler) == epoch0  # the sampler on its own still starts at the first window

    _, _, resumed = _loader()
    resumed.load_state_dict({"epoch": 0, "served": 5})
    assert resumed.state_dict() == {"epoch": 0, "served": 5}
    again = list(resumed)
    assert [(b.x.tolist(), b.tail) for b in again] == [(b.x.tolist(), b.tail) for b in rest]
    assert resumed.state_dict() == {"epoch": 0, "served": len(epoch0)}
    resumed.windows.set_epoch(1)
    assert [b.x.tolist() for b in resumed] == [layout.batch(w).x.tolist() for w in _expected(layout, 3, 1)]

    _, _, done = _loader()
    done.load_state_dict({"epoch": 0, "served": len(epoch0)})
    assert done.state_dict() == {"epoch": 1, "served": 0}
    assert [b.x.tolist() for b in done] == [layout.batch(w).x.tolist() for w in _expected(layout, 3, 1)]
    assert ResumableLoader(StreamDataset(layout), sampler, pin_memory=True).pin_memory is True


class _Pinnable:
    """Stands for a tensor in a batch: pinning one needs an accelerator, which the tests do not."""

    def __init__(self, name: str) -> None:
        self.name = name

    def pin_memory(self) -> str:
        return f"{self.name} pinned"


def test_pinning_a_batch_pins_inputs_and_targets_and_keeps_the_tail() -> None:
    """What the DataLoader calls with ``pin_memory=True``: both tensors pinned, ``tail`` as it was."""
    for tail in (False, True):
        pinned = Batch(_Pinnable("x"), _Pinnable("y"), tail).pin_memory()  # type: ignore[arg-type]
        assert (pinned.x, pinned.y, pinned.tail) == ("x pinned", "y pinned", tail)
