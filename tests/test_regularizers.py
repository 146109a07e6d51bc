"""Tests for the AWD-LSTM regularizers (Merity et al. 2017; Gal & Ghahramani 2016)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from charlm.config import load_config
from charlm.model.regularizers import (
    LockedDropout,
    ar_penalty,
    drop_weight,
    embedding_dropout,
    locked_dropout,
    tar_penalty,
)
from charlm.util.errors import CharlmError


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed the global RNG so every statistical check is reproducible (Gal & Ghahramani 2016)."""
    torch.manual_seed(1234)


# ---------------------------------------------------------------- locked dropout


def test_locked_mask_same_over_time_and_differs_across_sequences() -> None:
    """One (B, 1, F) mask reused at every step, drawn per sequence (Gal & Ghahramani 2016)."""
    x = torch.ones(8, 20, 64)
    out = LockedDropout(0.5).train()(x)
    assert out.shape == x.shape
    assert torch.equal(out, out[:, :1].expand_as(out))  # identical across time
    masks = (out[:, 0] != 0).float()
    assert not all(torch.equal(masks[0], masks[b]) for b in range(1, 8))  # differs across sequences
    assert 0 < masks.sum() < masks.numel()


def test_locked_scale_and_unbiased() -> None:
    """Kept elements are scaled by exactly 1/(1-p) and E[out] = in (Gal & Ghahramani 2016)."""
    p = 0.3
    x = torch.rand(64, 10, 256) + 0.5
    out = locked_dropout(x, p, training=True)
    kept = out != 0
    ratio = out[kept] / x[kept]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / (1 - p)))
    # the mean of out/x is the kept fraction times 1/(1-p): ~1 over 64 * 256 independent draws
    assert (out / x).mean().item() == pytest.approx(1.0, abs=0.02)
    assert (1 - kept[:, 0].float().mean()).item() == pytest.approx(p, abs=0.02)


def test_locked_expectation_is_input() -> None:
    """Averaged over many sequences, locked dropout returns the input on average (Gal & Ghahramani 2016)."""
    v = torch.randn(16)
    x = v.expand(20000, 2, 16)
    out = LockedDropout(0.5).train()(x)
    assert torch.allclose(out.mean(dim=0), x[0], atol=0.06)


def test_locked_identity_in_eval_and_p0() -> None:
    """Eval mode and p = 0 return the input untouched (Gal & Ghahramani 2016)."""
    x = torch.randn(3, 5, 7)
    assert LockedDropout(0.5).eval()(x) is x
    assert LockedDropout(0.0).train()(x) is x
    assert locked_dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("key", ["dropout", "dropouth", "dropouti", "dropoute", "weight_drop"])
def test_a_rate_outside_0_1_is_refused_by_the_config(key: str) -> None:
    """The one place that checks a dropout rate is the config's validation (Gal & Ghahramani 2016)."""
    for bad in ("1.0", "-0.1"):
        with pytest.raises(CharlmError, match=rf"^config key 'model\.{key}' must be in \[0, 1\), got {bad}$"):
            load_config("smoke", [f"model.{key}={bad}"])


def test_locked_rejects_bad_input() -> None:
    """A non-sequence input is an error, not garbage (Gal & Ghahramani 2016)."""
    with pytest.raises(ValueError, match=r"expects batch-first \(B, T, F\) input, got shape \(4, 5\)"):
        locked_dropout(torch.ones(4, 5), 0.5)


def test_locked_gradient_uses_mask() -> None:
    """The gradient through locked dropout is the mask itself (Gal & Ghahramani 2016)."""
    x = torch.ones(2, 4, 6, requires_grad=True)
    out = locked_dropout(x, 0.5)
    out.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, out.detach())


# ---------------------------------------------------------------- weight drop


@pytest.mark.parametrize("variational", [False, True], ids=["elementwise", "variational"])
def test_drop_weight_drops_a_fraction_p_scales_the_rest_and_redraws_each_call(variational: bool) -> None:
    """About p of the weights (rows when variational) are zeroed, the others are the raw ones times
    1/(1-p), and each call draws a new mask (Merity et al. 2017). That one call's matrix serves every
    step of a forward is checked against nn.LSTM in test_engine.py."""
    p = 0.3
    w = torch.rand(10000, 20) + 0.5  # no zero weight: a zero in the output is a dropped one
    a = drop_weight(w, p, variational=variational)
    kept = a != 0
    torch.testing.assert_close(a[kept], w[kept] / (1 - p), rtol=1e-6, atol=0)
    units = kept.all(dim=1) if variational else kept
    if variational:
        assert torch.equal(units, kept.any(dim=1))  # rows all kept or all dropped
    assert (1 - units.float().mean()).item() == pytest.approx(p, abs=0.02)
    b = drop_weight(w, p, variational=variational)
    assert not torch.equal(kept, b != 0)


def test_drop_weight_element_vs_variational() -> None:
    """Element mode zeroes single entries, variational mode zeroes whole rows (Merity et al. 2017)."""
    w = torch.rand(50, 20) + 0.1
    elem = drop_weight(w, 0.5, variational=False)
    zero_rows = (elem == 0).all(dim=1)
    assert (elem == 0).any() and not zero_rows.all()
    assert ((elem == 0).sum(dim=1) < 20).any()  # some rows only partly dropped
    var = drop_weight(w, 0.5, variational=True)
    row_zero = (var == 0).all(dim=1)
    row_kept = (var != 0).all(dim=1)
    assert torch.equal(row_zero | row_kept, torch.ones(50, dtype=torch.bool))  # each row all or nothing
    assert row_zero.any() and row_kept.any()
    assert torch.allclose(var[row_kept], w[row_kept] * 2.0)


def test_drop_weight_eval_and_p0_identity() -> None:
    """Eval and p = 0 give back the raw tensor object itself (Merity et al. 2017)."""
    w = nn.Parameter(torch.randn(6, 4))
    assert drop_weight(w, 0.5, training=False) is w
    assert drop_weight(w, 0.0) is w
    assert drop_weight(w, 0.0, variational=True) is w


@pytest.mark.parametrize("variational", [False, True])
def test_drop_weight_gradient_reaches_raw(variational: bool) -> None:
    """Gradients flow to the raw parameter, masked and scaled (Merity et al. 2017)."""
    w = nn.Parameter(torch.randn(10, 8))
    dropped = drop_weight(w, 0.4, variational=variational)
    dropped.sum().backward()
    assert w.grad is not None
    mask = (dropped != 0).float()
    assert torch.allclose(w.grad, mask / 0.6)


# ---------------------------------------------------------------- embedding dropout


def test_embedding_dropout_drops_whole_rows() -> None:
    """A dropped char is zero everywhere in the batch, kept ones scaled by 1/(1-p) (Merity et al. 2017)."""
    embed = nn.Embedding(30, 16)
    words = torch.arange(30).repeat(4, 3)[:, torch.randperm(90)]  # every char appears 12 times
    p = 0.4
    out = embedding_dropout(embed, words, p, training=True)
    ref = embed(words)
    dropped_chars: set[int] = set()
    kept_chars: set[int] = set()
    for c in range(30):
        vecs = out[words == c]
        if (vecs == 0).all():
            dropped_chars.add(c)
        else:
            kept_chars.add(c)
            assert torch.allclose(vecs, ref[words == c] / (1 - p))
    assert dropped_chars and kept_chars


def test_embedding_dropout_drops_a_fraction_p_of_the_characters() -> None:
    """Each character type is dropped with probability p, independently (Merity et al. 2017)."""
    p = 0.3
    embed = nn.Embedding(10000, 4)
    out = embedding_dropout(embed, torch.arange(10000)[None], p, training=True)[0]
    dropped = (out == 0).all(dim=1)
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.02)
    torch.testing.assert_close(out[~dropped], embed.weight[~dropped] / (1 - p), rtol=1e-6, atol=0)


def test_embedding_dropout_eval_identity_and_grad() -> None:
    """Eval is the plain lookup; gradients reach only kept rows (Merity et al. 2017)."""
    embed = nn.Embedding(12, 5)
    words = torch.randint(0, 12, (3, 7))
    assert torch.equal(embedding_dropout(embed, words, 0.5, training=False), embed(words))
    assert torch.equal(embedding_dropout(embed, words, 0.0, training=True), embed(words))
    out = embedding_dropout(embed, torch.arange(12)[None], 0.5, training=True)
    out.sum().backward()
    assert embed.weight.grad is not None
    row_dropped = (out[0] == 0).all(dim=1)
    assert torch.equal(embed.weight.grad.abs().sum(dim=1) == 0, row_dropped)


# ---------------------------------------------------------------- AR / TAR


def test_ar_penalty_matches_hand_computation() -> None:
    """AR is alpha times the mean squared activation (Merity et al. 2017)."""
    h = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (B=1, T=2, H=2)
    assert ar_penalty(h, 2.0).item() == pytest.approx(2.0 * (1 + 4 + 9 + 0) / 4)
    assert ar_penalty(h, 0.0).item() == 0.0
    h = torch.randn(3, 6, 4, dtype=torch.float64)
    expected = 0.7 * sum(float(v) ** 2 for v in h.flatten()) / h.numel()
    assert ar_penalty(h, 0.7).item() == pytest.approx(expected)


def test_tar_penalty_matches_hand_computation() -> None:
    """TAR is beta times the mean squared step-to-step change along time, dim 1 (Merity et al. 2017)."""
    h = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [3.0, -1.0]]])  # (B=1, T=3, H=2)
    # diffs: (1, 0), (2, -2) -> squares 1, 0, 4, 4 -> mean 9/4
    assert tar_penalty(h, 1.5).item() == pytest.approx(1.5 * 9 / 4)
    h = torch.randn(2, 5, 3, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for t in range(1, 5):
            for k in range(3):
                total += float(h[b, t, k] - h[b, t - 1, k]) ** 2
    assert tar_penalty(h, 0.3).item() == pytest.approx(0.3 * total / (2 * 4 * 3))


def test_penalties_zero_tensor_when_off() -> None:
    """A zero coefficient (or one step for TAR) gives a 0-dim zero on its device (Merity et al. 2017)."""
    h = torch.randn(2, 4, 3, requires_grad=True)
    for z in (ar_penalty(h, 0.0), tar_penalty(h, 0.0), tar_penalty(h[:, :1], 1.0)):
        assert isinstance(z, torch.Tensor) and z.dim() == 0 and z.item() == 0.0
        assert z.device == h.device
    loss = ar_penalty(h, 1.0) + tar_penalty(h, 1.0)
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_penalties_accumulate_half_precision_in_fp32() -> None:
    """bf16 activations give an fp32 penalty (Merity et al. 2017)."""
    h = torch.randn(2, 4, 3).bfloat16()
    assert ar_penalty(h, 1.0).dtype == torch.float32
    assert tar_penalty(h, 1.0).dtype == torch.float32
    assert ar_penalty(h, 0.0).dtype == torch.float32
