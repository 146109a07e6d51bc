"""Tests for the variable-length BPTT window schedule (Merity et al. 2017)."""

from __future__ import annotations

import math

import pytest
import torch

from charlm.data.bptt import MIN_SEQ_LEN, variable_window_count, window_schedule


def _assert_tiles(windows: list[tuple[int, int]], n_inputs: int) -> None:
    """Windows are contiguous, in order, non-empty and cover [0, n_inputs) once (Merity et al. 2017)."""
    pos = 0
    for start, seq_len in windows:
        assert start == pos
        assert seq_len >= 1
        pos += seq_len
    assert pos == n_inputs


@pytest.mark.parametrize("n_inputs", [1, 4, 5, 69, 70, 71, 1000, 12345])
@pytest.mark.parametrize("bptt", [1, 8, 70])
def test_variable_windows_cover_stream_once(n_inputs: int, bptt: int) -> None:
    """Every input position is in exactly one window per epoch (Merity et al. 2017)."""
    for epoch in range(3):
        windows = window_schedule(n_inputs, bptt, variable=True, seed=7, epoch=epoch)
        _assert_tiles(windows, n_inputs)
        covered = torch.zeros(n_inputs, dtype=torch.long)
        for start, seq_len in windows:
            covered[start : start + seq_len] += 1
        assert torch.equal(covered, torch.ones_like(covered))
        assert all(seq_len >= min(MIN_SEQ_LEN, n_inputs) for _, seq_len in windows)
        assert len(windows) == variable_window_count(n_inputs, bptt)  # the same count every epoch


@pytest.mark.parametrize("n_inputs", [0, 1, 9, 10, 11, 100])
def test_fixed_windows(n_inputs: int) -> None:
    """Fixed mode cuts windows of exactly bptt, the last one shorter (Merity et al. 2017)."""
    windows = window_schedule(n_inputs, 10, variable=False, seed=3, epoch=5)
    _assert_tiles(windows, n_inputs)
    assert all(seq_len == 10 for _, seq_len in windows[:-1])
    assert len(windows) == math.ceil(n_inputs / 10)
    assert windows == window_schedule(n_inputs, 10, variable=False, seed=4, epoch=0)


def test_deterministic_per_seed_and_epoch() -> None:
    """Same (seed, epoch) gives the same windows; another epoch or seed gives others (Merity et al. 2017)."""
    a = window_schedule(5000, 70, variable=True, seed=11, epoch=2)
    assert a == window_schedule(5000, 70, variable=True, seed=11, epoch=2)
    assert a != window_schedule(5000, 70, variable=True, seed=11, epoch=3)
    assert a != window_schedule(5000, 70, variable=True, seed=12, epoch=2)
    # seeds that differ only above bit 32 must not collide (torch keeps 32 bits of a CPU seed)
    assert a != window_schedule(5000, 70, variable=True, seed=11 + (1 << 32), epoch=2)


def test_global_rng_untouched() -> None:
    """Cutting windows neither reads nor advances the global torch RNG (Merity et al. 2017)."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = window_schedule(3000, 70, variable=True, seed=1, epoch=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    torch.rand(10)
    assert window_schedule(3000, 70, variable=True, seed=1, epoch=0) == first


def test_length_statistics() -> None:
    """Mean length is near 0.975*bptt and about 5 % of windows are half length (Merity et al. 2017)."""
    bptt = 70
    lengths = [
        seq_len
        for epoch in range(5)
        for _, seq_len in window_schedule(200_000, bptt, variable=True, seed=0, epoch=epoch)[:-1]
    ]
    mean = sum(lengths) / len(lengths)
    assert mean == pytest.approx(0.975 * bptt, abs=0.5)
    short = sum(seq_len < 0.75 * bptt for seq_len in lengths) / len(lengths)
    assert short == pytest.approx(0.05, abs=0.01)
    assert min(lengths) >= MIN_SEQ_LEN


def test_small_bptt_respects_minimum() -> None:
    """With bptt below the minimum, sampled windows are still at least 5 long (Merity et al. 2017)."""
    windows = window_schedule(500, 2, variable=True, seed=0, epoch=0)
    assert all(seq_len >= MIN_SEQ_LEN for _, seq_len in windows[:-1])
    _assert_tiles(windows, 500)


def test_bad_arguments() -> None:
    """Nonsense sizes raise (Merity et al. 2017)."""
    with pytest.raises(ValueError):
        window_schedule(10, 0)
    with pytest.raises(ValueError):
        window_schedule(-1, 10)
    assert window_schedule(0, 10) == []
