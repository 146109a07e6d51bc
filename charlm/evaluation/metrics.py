"""Exact, token-weighted language-model metrics (torchmetrics ``Metric`` objects, summed across DDP ranks).

The loss is the summed negative log-likelihood over every scored character divided by their count,
so a split's figure does not depend on how it was cut into batches. Perplexity = exp(loss); bits per
character = loss / ln 2.

During training the module logs the metric objects themselves (``self.log(name, metric)``): Lightning
calls ``compute`` at the end of the validation, torchmetrics sums the two states over the DDP ranks
for it, and Lightning resets them. Every figure of a split is computed from the same two sums (one
compute group of :func:`split_metrics`), so under DDP each is the exact figure of the whole split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

LN2 = math.log(2.0)


def summarize(nll_sum: float, chars: int) -> dict[str, float]:
    """Loss (nats/char), bits per char and perplexity from a summed NLL (the perplexity saturates at exp(700),
    where math.exp would soon overflow)."""
    loss = nll_sum / max(chars, 1)
    return {"loss": loss, "bpc": loss / LN2, "perplexity": math.exp(min(loss, 700.0)), "chars": chars}


class CharNLL(Metric):
    """Sum of per-character NLL and the number of characters; ``compute`` gives the mean in nats.

    The sums are kept in float64 and int64; ``compute`` (here and in the subclasses) works on them in
    float64 and returns float32, the precision Lightning logs plain numbers in.
    """

    full_state_update = False
    higher_is_better: bool | None = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, chars: int) -> None:  # type: ignore[override]
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.chars += chars

    def mean_nll(self) -> Tensor:
        """The loss in nats per character, float64 (from the states as they are: summed inside ``compute``)."""
        return self.nll_sum / self.chars.clamp(min=1)

    def compute(self) -> Tensor:
        return self.mean_nll().float()


class BitsPerChar(CharNLL):
    """The same sums as :class:`CharNLL`, reported in bits per character (loss / ln 2)."""

    def compute(self) -> Tensor:
        return (self.mean_nll() / LN2).float()


FLOAT32_MAX = torch.finfo(torch.float32).max


class Perplexity(CharNLL):
    """The same sums as :class:`CharNLL`, reported as perplexity, exp(loss): saturated at float32's largest
    number (a loss above 88.72 nats/char), so a diverged run logs a finite figure, as :func:`summarize`'s
    perplexity saturates at exp(700)."""

    def compute(self) -> Tensor:
        return torch.exp(self.mean_nll().double()).clamp(max=FLOAT32_MAX).float()  # (16-bit: states in half)


class CharCount(CharNLL):
    """The same sums as :class:`CharNLL`, reporting how many characters were scored."""

    higher_is_better = None

    def compute(self) -> Tensor:
        return self.chars.float()


def split_metrics(split: str) -> MetricCollection:
    """``{split}_loss``, ``{split}_bpc``, ``{split}_ppl`` and ``{split}_chars``, one compute group: an
    update adds to one pair of sums, which every figure reads."""
    figures = {"loss": CharNLL(), "bpc": BitsPerChar(), "ppl": Perplexity(), "chars": CharCount()}
    return MetricCollection(figures, prefix=f"{split}_", compute_groups=[list(figures)])
