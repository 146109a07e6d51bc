"""Exact, token-weighted language-model metrics (a torchmetrics ``Metric``, summed across DDP ranks).

The loss is the summed negative log-likelihood over every scored character divided by their count,
so a split's figure does not depend on how it was cut into batches. Perplexity = exp(loss); bits per
character = loss / ln 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

LN2 = math.log(2.0)


def summarize(nll_sum: float, chars: int) -> dict[str, float]:
    """Loss (nats/char), bits per char and perplexity from a summed NLL."""
    loss = nll_sum / max(chars, 1)
    return {"loss": loss, "bpc": loss / LN2, "perplexity": math.exp(min(loss, 700.0)), "chars": chars}


class CharNLL(Metric):
    """Sum of per-character NLL and the number of characters; ``compute`` gives the mean in nats."""

    full_state_update = False
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, chars: int) -> None:  # type: ignore[override]
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.chars += chars

    def compute(self) -> Tensor:
        return self.nll_sum / self.chars.clamp(min=1)
