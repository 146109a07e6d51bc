"""Tests for the AWD-LSTM regularizers (Merity et al. 2017; Gal & Ghahramani 2016)."""

from __future__ import annotations

from typing import Any

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


# ---------------------------------------------------------------- defaults, options, dtypes and devices


def test_drop_weight_drops_single_elements_by_default() -> None:
    """Without ``variational`` the mask is per element, not per row (Merity et al. 2017)."""
    w = torch.rand(50, 20) + 0.1
    out = drop_weight(w, 0.5)
    dropped = out == 0
    assert dropped.any()
    assert (dropped.any(dim=1) & ~dropped.all(dim=1)).any()  # a row dropped only in part


def test_locked_dropout_rate_defaults_to_one_half() -> None:
    """``LockedDropout()`` drops half the features and doubles the rest (Gal & Ghahramani 2016)."""
    module = LockedDropout()
    assert module.p == 0.5
    assert repr(module) == "LockedDropout(p=0.5)"
    out = module.train()(torch.ones(4, 3, 1000))
    assert set(out.unique().tolist()) == {0.0, 2.0}


_EMBEDDING_OPTIONS: dict[str, dict[str, Any]] = {
    "padding_idx": {"padding_idx": 3},
    "max_norm": {"max_norm": 1.0},
    "norm_type": {"max_norm": 1.0, "norm_type": 1.0},
    "scale_grad_by_freq": {"scale_grad_by_freq": True},
    "sparse": {"sparse": True},
}


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["p0", "eval"])
@pytest.mark.parametrize("options", list(_EMBEDDING_OPTIONS.values()), ids=list(_EMBEDDING_OPTIONS))
def test_embedding_dropout_honours_the_embeddings_options(options: dict[str, Any], p: float) -> None:
    """Without dropping (p = 0, or p = 0.5 in eval) the lookup is nn.Embedding's own, option by option: the
    same vectors, the same gradient (none for ``padding_idx``, scaled by ``scale_grad_by_freq``, sparse for
    ``sparse``) and the same in-place renormalisation of the weight by ``max_norm`` in ``norm_type``
    (Merity et al. 2017)."""
    ref = nn.Embedding(12, 5, **options)
    with torch.no_grad():
        ref.weight.mul_(3.0)  # rows well above max_norm in either norm
    embed = nn.Embedding(12, 5, **options)
    embed.load_state_dict(ref.state_dict())
    words = torch.tensor([[3, 1, 1, 4, 3, 1], [2, 1, 3, 3, 7, 0]])
    expected = ref(words)
    out = embedding_dropout(embed, words, p, training=p == 0.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(embed.weight.detach(), ref.weight.detach(), rtol=0, atol=0)
    (expected + expected.pow(2)).sum().backward()  # a gradient that is not 0 where the vector is 0 (padding)
    (out + out.pow(2)).sum().backward()
    assert ref.weight.grad is not None and embed.weight.grad is not None
    assert embed.weight.grad.is_sparse == ref.weight.grad.is_sparse
    torch.testing.assert_close(embed.weight.grad.to_dense(), ref.weight.grad.to_dense(), rtol=0, atol=0)


def test_embedding_dropout_at_p0_draws_nothing() -> None:
    """p = 0 in training is the plain lookup: the global RNG is not read (Merity et al. 2017)."""
    embed = nn.Embedding(12, 5)
    state = torch.get_rng_state()
    embedding_dropout(embed, torch.arange(12)[None], 0.0, training=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_penalties_keep_float64() -> None:
    """A float64 output gives a float64 penalty, off or on, with float64's digits (Merity et al. 2017)."""
    h = torch.randn(3, 6, 4, dtype=torch.float64)
    for z in (ar_penalty(h, 0.0), tar_penalty(h, 0.0), tar_penalty(h[:, :1], 1.0)):
        assert z.dtype == torch.float64
    ar = ar_penalty(h, 0.7)
    tar = tar_penalty(h, 0.3)
    assert ar.dtype == tar.dtype == torch.float64
    assert ar.item() == pytest.approx(0.7 * sum(float(v) ** 2 for v in h.flatten()) / h.numel(), rel=1e-12)
    diffs = (h[:, 1:] - h[:, :-1]).flatten()
    assert tar.item() == pytest.approx(0.3 * sum(float(d) ** 2 for d in diffs) / diffs.numel(), rel=1e-12)


def test_penalties_when_off_are_on_the_inputs_device() -> None:
    """The zero of a disabled term is on the input's device, here PyTorch's ``meta`` device, which any CPU has
    (Merity et al. 2017)."""
    h = torch.empty(2, 4, 3, device="meta")
    for z in (ar_penalty(h, 0.0), tar_penalty(h, 0.0), tar_penalty(h[:, :1], 1.0)):
        assert z.device.type == "meta"
        assert z.shape == ()


def test_penalties_with_a_coefficient_of_one() -> None:
    """alpha = beta = 1 are the plain means, not a disabled term (Merity et al. 2017)."""
    h = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (B=1, T=2, H=2)
    assert ar_penalty(h, 1.0).item() == (1 + 4 + 9 + 0) / 4
    assert tar_penalty(h, 1.0).item() == (2**2 + 2**2) / 2


def test_tar_penalty_of_two_steps() -> None:
    """Two steps are one difference per feature: T = 2 is the shortest sequence TAR counts
    (Merity et al. 2017)."""
    h = torch.tensor([[[0.0, 1.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, -1.0]]])  # (B=2, T=2, H=2)
    # diffs: (1, 2), (0, -3) -> squares 1, 4, 0, 9 -> mean 14/4
    assert tar_penalty(h, 0.5).item() == 0.5 * 14 / 4
