"""AWD-LSTM regularizers as tiny composable pieces (Merity et al. 2017, arXiv:1708.02182).

Everything here is batch-first: sequences are ``(B, T, F)``. Each piece is the identity in eval
mode (or with a zero rate / coefficient), so a model can call them unconditionally. Dropout rates are
taken as given, in [0, 1): the config's validation is where a rate outside that range is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LockedDropout",
    "ar_penalty",
    "drop_weight",
    "embedding_dropout",
    "locked_dropout",
    "tar_penalty",
]


def drop_weight(weight: Tensor, p: float, variational: bool = False, training: bool = True) -> Tensor:
    """DropConnect on a weight matrix, drawn once per call (Wan et al. 2013; Merity et al. 2017).

    One mask per call, so every time step of the forward that uses the result shares it; the next
    call draws a fresh mask. Kept entries are scaled by 1/(1-p), and gradients flow back to ``weight``.
    ``variational=True`` drops whole rows (one unit's incoming weights, e.g. one gate unit of
    ``weight_hh``) instead of single elements.
    Identity (the very same tensor object) when not training or p == 0.
    """
    if not training or p == 0.0:
        return weight
    if variational:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1.0 - p) / (1.0 - p)
        return weight * mask
    return torch.nn.functional.dropout(weight, p, training=True)


def locked_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Variational dropout with one mask per sequence reused at every step (Gal & Ghahramani 2016).

    ``x`` is batch-first ``(B, T, F, ...)``; the mask has shape ``(B, 1, F, ...)``, is broadcast over
    time and scaled by 1/(1-p). Returns ``x`` itself when not training or p == 0.
    """
    if not training or p == 0.0:
        return x
    if x.dim() < 3:
        raise ValueError(f"locked dropout expects batch-first (B, T, F) input, got shape {tuple(x.shape)}")
    mask = x.new_empty(x.size(0), 1, *x.shape[2:]).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask


class LockedDropout(nn.Module):
    """Module form of locked (variational) dropout on batch-first sequences (Gal & Ghahramani 2016)."""

    def __init__(self, p: float = 0.5) -> None:
        """Store the drop rate p in [0, 1) (Gal & Ghahramani 2016)."""
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Apply one (B, 1, F) mask to every time step of ``x`` (Gal & Ghahramani 2016)."""
        return locked_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        """Show the rate in the module print-out (Gal & Ghahramani 2016)."""
        return f"p={self.p}"


def embedding_dropout(embed: nn.Embedding, words: Tensor, p: float, training: bool) -> Tensor:
    """Look up ``words`` with whole embedding rows dropped (Gal & Ghahramani 2016; Merity et al. 2017).

    One Bernoulli draw per vocabulary entry per call: a dropped character type is zero at every
    position of the batch, kept rows are scaled by 1/(1-p). The embedding's own options
    (padding_idx, max_norm, ...) are honoured. The plain lookup when not training or p == 0.
    """
    weight = embed.weight
    if training and p > 0.0:
        weight = weight * weight.new_empty(weight.size(0), 1).bernoulli_(1.0 - p).div_(1.0 - p)
    return F.embedding(  # what nn.Embedding.forward does, so subclasses can call this too
        words,
        weight,
        embed.padding_idx,
        embed.max_norm,
        embed.norm_type,
        embed.scale_grad_by_freq,
        embed.sparse,
    )


def _accumulation_view(x: Tensor) -> Tensor:
    """Upcast half-precision activations so a penalty's mean is taken in fp32 (Merity et al. 2017)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_penalty(x: Tensor) -> Tensor:
    """A 0-dim zero on ``x``'s device in the penalty's dtype, for a disabled term (Merity et al. 2017)."""
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return torch.zeros((), dtype=dtype, device=x.device)


def ar_penalty(dropped_output: Tensor, alpha: float) -> Tensor:
    """Activation regularization ``alpha * mean(h**2)`` on the dropped last-layer output (Merity et al. 2017).

    The mean runs over every element (batch, time and features). Returns a 0-dim zero tensor on the
    input's device when ``alpha == 0``.
    """
    if alpha == 0.0:
        return _zero_penalty(dropped_output)
    return alpha * _accumulation_view(dropped_output).pow(2).mean()


def tar_penalty(raw_output: Tensor, beta: float) -> Tensor:
    """Temporal activation regularization ``beta * mean((h_t - h_{t-1})**2)`` (Merity et al. 2017).

    ``raw_output`` is the undropped last-layer output, batch-first ``(B, T, H)``; differences are
    taken along dim 1 and averaged over all ``B * (T-1) * H`` of them. Returns a 0-dim zero tensor on
    the input's device when ``beta == 0`` or ``T < 2``.
    """
    if beta == 0.0 or raw_output.size(1) < 2:
        return _zero_penalty(raw_output)
    x = _accumulation_view(raw_output)
    return beta * (x[:, 1:] - x[:, :-1]).pow(2).mean()
