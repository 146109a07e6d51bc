"""Tests for the variable-length BPTT window schedule (Merity et al. 2017)."""

from __future__ import annotations

import hashlib
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
    """Nonsense sizes raise, saying which and what was given (Merity et al. 2017)."""
    with pytest.raises(ValueError, match=r"^bptt must be >= 1, got 0$"):
        window_schedule(10, 0)
    with pytest.raises(ValueError, match=r"^n_inputs must be >= 0, got -1$"):
        window_schedule(-1, 10)
    assert window_schedule(0, 10) == []


def _awd_draws(bptt: int, count: int, seed: int, epoch: int) -> list[int]:
    """The AWD-LSTM lengths drawn by hand: ``count`` float64 uniforms then ``count`` float64 normals from a CPU
    generator seeded with the 32-bit little-endian BLAKE2b digest of ``charlm-bptt:{seed}:{epoch}``; each
    length is ``max(5, round(N(T, 5)))`` with T = bptt below a uniform of 0.95, else bptt / 2
    (Merity et al. 2017)."""
    key = hashlib.blake2b(f"charlm-bptt:{seed}:{epoch}".encode(), digest_size=4).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    uniforms = torch.rand(count, generator=gen, dtype=torch.float64).tolist()
    normals = torch.randn(count, generator=gen, dtype=torch.float64).tolist()
    return [max(MIN_SEQ_LEN, round((bptt if u < 0.95 else bptt / 2) + 5.0 * z))
            for u, z in zip(uniforms, normals, strict=True)]


@pytest.mark.parametrize(("bptt", "count", "seed", "epoch"), [(70, 100, 4, 0), (6, 2, 21, 0)],
                         ids=["bptt70", "one-extra"])
def test_a_stream_as_long_as_the_draws_is_cut_into_the_draws(bptt: int, count: int, seed: int, epoch: int) -> None:
    """Where the stream is exactly as long as the lengths drawn, the windows are those lengths, one by one, in
    the order drawn (Merity et al. 2017). The cases: 100 windows of bptt 70 with half-length ones among them,
    and two windows drawn 6 and 5, where the one extra position is the first window's."""
    draws = _awd_draws(bptt, count, seed, epoch)
    n_inputs = sum(draws)
    assert variable_window_count(n_inputs, bptt) == count
    if bptt == 70:
        assert any(length < 50 for length in draws)  # half-length windows drawn
    else:
        assert draws == [6, 5]
    windows = window_schedule(n_inputs, bptt, variable=True, seed=seed, epoch=epoch)
    assert [seq_len for _, seq_len in windows] == draws


def test_the_schedule_of_seed_0_epoch_0() -> None:
    """The windows a seed cuts are part of a run: a run resumed by another release must cut the same ones, so
    one schedule is written out here (Merity et al. 2017). It is also the default: variable, seed 0, epoch 0."""
    lengths = [64, 69, 74, 63, 66, 64, 57, 67, 68, 74, 72, 68, 62, 64, 68]
    expected = [(sum(lengths[:k]), length) for k, length in enumerate(lengths)]
    assert window_schedule(1000, 70, variable=True, seed=0, epoch=0) == expected
    assert window_schedule(1000, 70) == expected
    assert window_schedule(1000, 70, seed=1) != expected
    assert window_schedule(1000, 70, epoch=1) != expected
