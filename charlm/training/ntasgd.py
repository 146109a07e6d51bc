"""Non-monotonically triggered averaged SGD, NT-ASGD (Merity et al. 2017, arXiv:1708.02182, section 3).

Train with plain SGD; after each validation, feed the loss to :class:`NTASGD`. Once the loss is
worse than the best loss seen more than ``nonmono`` validations ago, switch to
``torch.optim.ASGD(params, lr, t0=0, lambd=0, weight_decay=wd)`` (:func:`asgd_from`), which keeps a
running average of the iterates in ``optimizer.state[p]["ax"]``. From then on, validate and save the
best checkpoint with the averaged weights swapped in (:func:`averaged_weights`), and train on the raw
ones.

Independent of Lightning: the controller holds only primitive state (``state_dict`` is a dict of
ints, floats and lists, safe for ``torch.load(weights_only=True)``), and the ASGD averages live in
the optimizer's own state, so both survive a checkpoint resume.

torch's ASGD (checked on 2.13, both the for-loop and the foreach kernels) starts with ``mu = 1``
and sets ``mu = 1 / max(1, step - t0)`` after each step, so with ``t0 = 0`` the first two steps copy
the iterate and ``ax`` is the mean of the iterates from the second ASGD step on. That matches the
reference AWD-LSTM code, which used the same optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "NTASGD",
    "asgd_from",
    "averaged_weights",
    "nonmono_triggered",
    "rate_applied_now",
    "restore_raw_weights",
    "swap_in_averages",
]


def nonmono_triggered(loss: float, history: Sequence[float], nonmono: int) -> bool:
    """The AWD-LSTM switch test ``len(h) > n and loss > min(h[:-n])`` (Merity et al. 2017).

    ``history`` holds the earlier validation losses (oldest first, the current ``loss`` not included).
    ``nonmono`` must be >= 1 (``h[:-0]`` would be empty in Python).
    """
    if nonmono < 1:
        raise ValueError(f"nonmono must be >= 1, got {nonmono}")
    return len(history) > nonmono and float(loss) > min(history[:-nonmono])


class NTASGD:
    """Controller that decides the one-time SGD -> ASGD switch from validation losses (Merity et al. 2017)."""

    def __init__(self, nonmono: int = 5) -> None:
        """Keep ``nonmono``, the validation-count window of the non-monotone test (Merity et al. 2017)."""
        if nonmono < 1:
            raise ValueError(f"nonmono must be >= 1, got {nonmono}")
        self.nonmono = int(nonmono)
        self.history: list[float] = []
        self.switched_at = -1  # index in ``history`` of the loss that triggered the switch, -1 if none

    @property
    def switched(self) -> bool:
        """Whether the switch to averaged SGD has happened (Merity et al. 2017)."""
        return self.switched_at >= 0

    def step(self, val_loss: float | Tensor) -> bool:
        """Record a validation loss; True only at the call that triggers the switch (Merity et al. 2017).

        The test runs against the losses recorded before this one, then this one is appended (the
        AWD-LSTM order). After the switch it returns False and just keeps recording.
        """
        loss = float(val_loss)
        trigger = not self.switched and nonmono_triggered(loss, self.history, self.nonmono)
        if trigger:
            self.switched_at = len(self.history)
        self.history.append(loss)
        return trigger

    def state_dict(self) -> dict[str, Any]:
        """Primitive-only state (ints, floats, a list) for a weights_only checkpoint (Merity et al. 2017)."""
        return {"nonmono": self.nonmono, "history": list(self.history), "switched_at": self.switched_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (Merity et al. 2017)."""
        self.nonmono = int(state["nonmono"])
        self.history = [float(x) for x in state["history"]]
        self.switched_at = int(state["switched_at"])

    def __repr__(self) -> str:
        """Short summary for logs (Merity et al. 2017)."""
        return f"NTASGD(nonmono={self.nonmono}, evals={len(self.history)}, switched_at={self.switched_at})"


def asgd_from(optimizer: Optimizer, lr: float | None = None) -> torch.optim.ASGD:
    """An ASGD over the same param groups as ``optimizer`` (e.g. the SGD being replaced) (Merity et al. 2017).

    Each group keeps its parameters and ``weight_decay``; its ``lr`` too, unless ``lr`` is given
    (AWD-LSTM passes the base learning rate, not a per-step scaled one).
    """
    groups = [
        {
            "params": list(group["params"]),
            "lr": float(group["lr"] if lr is None else lr),
            "weight_decay": float(group.get("weight_decay", 0.0)),
        }
        for group in optimizer.param_groups
    ]
    return torch.optim.ASGD(groups, lr=groups[0]["lr"], t0=0, lambd=0.0)


@torch.no_grad()
def rate_applied_now(optimizer: Optimizer) -> None:
    """Make ASGD's next step apply its groups' rates as they are now (a no-op for other optimizers).

    torch's ASGD steps each weight by ``state["eta"]``, which it sets at the end of a step from that step's
    rate (``lr / (1 + lambd lr step) ** alpha``; ``lr`` itself with ``lambd = 0``), not from the group's
    ``lr`` at the next step: a rate changed between two steps (variable-length BPTT scales each step's)
    would reach the weights one step late. Called before each step, after the rate is set; a weight's
    first step makes its state from the group's ``lr`` itself.
    """
    if not isinstance(optimizer, torch.optim.ASGD):
        return
    for group in optimizer.param_groups:
        lr, lambd, alpha = float(group["lr"]), float(group["lambd"]), float(group["alpha"])
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("eta"), Tensor):
                state["eta"].fill_(lr / (1 + lambd * lr * float(state["step"])) ** alpha)


def _averaged_params(optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
    """(parameter, average) pairs of an ASGD's state; empty for other optimizers (Polyak & Juditsky 1992)."""
    pairs: list[tuple[Tensor, Tensor]] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            ax = optimizer.state.get(p, {}).get("ax")
            if isinstance(ax, Tensor) and id(p) not in seen:
                seen.add(id(p))
                pairs.append((p, ax))
    return pairs


@torch.no_grad()
def swap_in_averages(optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
    """Copy each parameter's ASGD average into it in place; return the raw copies (Merity et al. 2017).

    In-place copies keep the parameter objects and storages (so cuDNN flattened weights, weight-tied
    modules and weight-drop raw parameters stay wired). Parameters without an average (no ASGD step
    yet, or a non-ASGD optimizer) are left alone. Pass the result to :func:`restore_raw_weights`.
    """
    backup: list[tuple[Tensor, Tensor]] = []
    for p, ax in _averaged_params(optimizer):
        backup.append((p, p.detach().clone()))
        p.copy_(ax)
    return backup


@torch.no_grad()
def restore_raw_weights(backup: list[tuple[Tensor, Tensor]]) -> None:
    """Put back the raw weights saved by :func:`swap_in_averages`, bit for bit (Merity et al. 2017)."""
    for p, raw in backup:
        p.copy_(raw)


@contextmanager
def averaged_weights(optimizer: Optimizer) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Context in which the model holds its ASGD averages; raw weights come back on exit (Merity et al. 2017).

    Yields the (parameter, raw copy) pairs of :func:`swap_in_averages` (a checkpoint written inside
    keeps them, to resume training from the raw weights). A no-op for optimizers without averages.
    """
    backup = swap_in_averages(optimizer)
    try:
        yield backup
    finally:
        restore_raw_weights(backup)
