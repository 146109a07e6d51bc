"""Truncated-BPTT streams: a split laid out as B contiguous rows, read window by window.

``batchify`` (as in pytorch/examples word_language_model) cuts the ids into B equal streams laid side
by side; window k of every row continues window k-1, so the hidden state is carried across batches::

    ids:      a b c d e f g h i j k l m n o p q r s t u v w x y z
    B = 3:    row 0: a b c d e f g h      inputs  = rows[:, s : s + T]
              row 1: i j k l m n o p      targets = the same block shifted by one char
              row 2: q r s t u v w x      (training never reads y z; evaluation reads them as a tail)

    windows (T = 3): | a b c | d e f | g h |   -> batches [B, 3], [B, 3], [B, 2]

Under DDP the split is cut into world_size * B rows and rank r owns rows [r B, (r + 1) B), so every
rank reads the same number of windows at the same positions (same variable-length cuts).

For evaluation every character must count exactly once: the positions left over after the last full
row are read as a one-row *tail* that continues the last row (and its hidden state), so the loss is
over the whole split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from charlm.data.bptt import window_schedule


@dataclass(frozen=True)
class Window:
    """Where one batch lies: columns [start, start + length) of the rows, or of the tail."""

    start: int
    length: int
    tail: bool = False


@dataclass
class Batch:
    """One window: inputs and targets [B, T]; ``tail`` says it continues only the last row."""

    x: Tensor
    y: Tensor
    tail: bool = False

    def pin_memory(self) -> Batch:
        """Called by the DataLoader when ``pin_memory=True`` (faster host-to-GPU copies)."""
        return Batch(self.x.pin_memory(), self.y.pin_memory(), self.tail)


class StreamLayout:
    """A split's ids cut into ``world_size * batch_size`` rows; this rank's rows and (last rank) tail.

    ``inputs``/``targets`` are [B, L]; ``tail_inputs``/``tail_targets`` are [1, R] with R < rows (only
    on the last rank, only when ``keep_tail``).
    """

    def __init__(self, ids: Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 keep_tail: bool = False) -> None:
        n_inputs = ids.numel() - 1  # the last char is only a target
        n_rows = batch_size * world_size
        self.row_length = n_inputs // n_rows
        if self.row_length < 1:
            raise ValueError(f"{ids.numel()} characters cannot fill {n_rows} streams of at least 2")
        used = self.row_length * n_rows
        rows_x = ids[:used].view(n_rows, self.row_length)
        rows_y = ids[1:used + 1].view(n_rows, self.row_length)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.inputs, self.targets = rows_x[mine], rows_y[mine]
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        has_tail = keep_tail and rank == world_size - 1 and used < n_inputs
        self.tail_inputs = ids[used:n_inputs].view(1, -1) if has_tail else None
        self.tail_targets = ids[used + 1:n_inputs + 1].view(1, -1) if has_tail else None

    @property
    def chars(self) -> int:
        """Targets this rank scores in one pass (rows plus tail)."""
        tail = 0 if self.tail_inputs is None else self.tail_inputs.numel()
        return self.inputs.numel() + tail

    def batch(self, window: Window) -> Batch:
        cols = slice(window.start, window.start + window.length)
        if window.tail:
            assert self.tail_inputs is not None and self.tail_targets is not None
            return Batch(self.tail_inputs[:, cols], self.tail_targets[:, cols], tail=True)
        return Batch(self.inputs[:, cols], self.targets[:, cols])


class WindowSampler(Sampler[Window]):
    """Yields the windows of one epoch; Lightning calls ``set_epoch`` so variable cuts change per epoch."""

    def __init__(self, layout: StreamLayout, bptt: int, *, variable: bool = False, seed: int = 0) -> None:
        self.layout, self.bptt, self.variable, self.seed = layout, bptt, variable, seed
        self.epoch = 0
        self.start = 0  # first window the next iteration yields (a resumed epoch skips the ones done)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self) -> list[Window]:
        cuts = window_schedule(self.layout.row_length, self.bptt, variable=self.variable,
                               seed=self.seed, epoch=self.epoch)
        out = [Window(start, length) for start, length in cuts]
        if self.layout.tail_inputs is not None:
            tail_len = self.layout.tail_inputs.size(1)
            out += [Window(s, min(self.bptt, tail_len - s), tail=True) for s in range(0, tail_len, self.bptt)]
        return out

    def __iter__(self) -> Iterator[Window]:
        return iter(self.windows()[self.start:])

    def __len__(self) -> int:  # always the whole epoch: Lightning counts a resumed epoch's batches from it
        return len(self.windows())


class StreamDataset(Dataset[Batch]):
    """Map-style view of a :class:`StreamLayout`, indexed by :class:`Window` (batching is already done)."""

    def __init__(self, layout: StreamLayout) -> None:
        self.layout = layout

    def __getitem__(self, window: Window) -> Batch:  # type: ignore[override]
        return self.layout.batch(window)

    def __len__(self) -> int:
        return self.layout.row_length


def collate_batch(batch: Batch) -> Batch:
    """Identity collate: windows arrive batched already."""
    return batch


class ResumableLoader(DataLoader[Batch]):
    """The training loader: remembers how far into the epoch it is, so a resumed run goes on from there.

    Lightning 2.x restarts an epoch's loader from its first batch on a mid-epoch resume unless the
    loader has ``state_dict`` / ``load_state_dict``: then its ``FitLoop`` saves the state in every
    checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it back before it creates the
    epoch's iterator. The state is the epoch (whose variable-length windows to cut) and the windows
    already handed out; the next iterator starts after them, and later ones start from the beginning.
    ``len()`` stays the whole epoch, which is what Lightning counts the resumed batches against.

    The count is exact at every place a checkpoint is written (batch end, validation end, epoch end):
    with ``batch_size=None`` and no workers nothing is fetched ahead, and Lightning does not prefetch
    from a loader whose length it knows.
    """

    def __init__(self, dataset: StreamDataset, sampler: WindowSampler, *, pin_memory: bool = False) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=None, collate_fn=collate_batch,
                         pin_memory=pin_memory, generator=torch.Generator())  # never draws from the global RNG
        self.windows = sampler
        self.served = 0  # windows handed out by the current iterator, counted from the epoch's first
        self._resume_at = 0

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        start, self._resume_at = self._resume_at, 0
        self.windows.start = start
        try:
            batches = super().__iter__()  # the sampler's window list (from ``start``) is fixed here
        finally:
            self.windows.start = 0
        self.served = start
        return self._count(batches)

    def _count(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.windows.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = int(state["epoch"]), int(state["served"])
        # every epoch has the same number of windows (variable-length cuts included, see
        # charlm.data.bptt.variable_window_count), the number Lightning took from len() before this call
        self.windows.set_epoch(epoch)
        if served >= len(self):  # saved after the epoch's last batch: start the next
            self.windows.set_epoch(epoch + 1)
            served = 0
        self._resume_at = self.served = served
