"""The thin ``LightningModule`` around :class:`CharLM`: truncated BPTT, the schedule, NT-ASGD, metrics.

Lightning 2.x has no ``truncated_bptt_steps``: one batch is one window. The module keeps the hidden
state of the training streams (detached after every step, reset at every epoch start) and a separate
state for evaluation (reset at the start of each pass over a split).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.checkpoint import FORMAT_VERSION
from charlm.config import Config, from_dict
from charlm.errors import CharlmError
from charlm.evaluate import score_batch
from charlm.metrics import LN2, CharNLL
from charlm.model import CharLM, States, detach_states
from charlm.ntasgd import NTASGD, asgd_from, restore_raw_weights, swap_in_averages
from charlm.regularizers import ar_penalty, tar_penalty
from charlm.streams import Batch
from charlm.vocab import Vocab


class CharLMModule(L.LightningModule):
    """Trains and evaluates a :class:`CharLM`; hyperparameters are primitives (config dict + vocab)."""

    def __init__(self, config: dict[str, Any], vocab: str, format_version: int = FORMAT_VERSION) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = from_dict(config)
        self.vocab = Vocab(vocab)
        self.model = CharLM(len(self.vocab), self.cfg.model)
        self.val_nll, self.test_nll = CharNLL(), CharNLL()
        self.ntasgd = NTASGD(self.cfg.optim.nonmono)
        self._train_states: States | None = None
        self._eval_states: States | None = None
        self._raw_backup: list[tuple[Tensor, Tensor]] = []
        self._last_step_time: float | None = None
        self.last_good_checkpoint: str | None = None

    # ----------------------------------------------------------------------------------- training
    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if batch_idx == 0:
            self._train_states = None  # every epoch starts the streams from zero
        out = self.model(batch.x, self._train_states)
        self._train_states = detach_states(out.states)
        nll = self._loss(out.logits, batch.y)
        o = self.cfg.optim
        loss = nll + ar_penalty(out.dropped_last, o.alpha) + tar_penalty(out.raw_last, o.beta)
        if not torch.isfinite(loss):
            if self.cfg.train.on_nan == "skip":
                self.print(f"step {self.global_step}: non-finite loss {loss.item()}, step skipped")
                self._train_states = None
                return None
            where = self.last_good_checkpoint or "none saved yet"
            raise CharlmError(f"training stopped: the loss became {loss.item()} at step {self.global_step}. "
                              f"Last good checkpoint: {where}. Lower optim.lr or raise optim.clip, "
                              "or set train.on_nan=skip")
        chars = batch.y.numel()
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train_chars_per_s", chars / max(now - self._last_step_time, 1e-9), on_step=True)
        self._last_step_time = now
        self.log("train_loss", nll, on_step=True, prog_bar=True)
        self.log("train_bpc", nll / LN2, on_step=True)
        return loss

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        lr = self.learning_rate()
        if self.cfg.data.variable_bptt:  # AWD-LSTM: short windows take proportionally smaller steps
            lr *= batch.x.size(1) / self.cfg.data.bptt
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = lr
        self.log("lr", lr, on_step=True)

    def progress(self) -> float:
        """Fraction of the budget spent: the most advanced of steps, time and epochs."""
        t, trainer = self.cfg.train, self.trainer
        parts = [0.0]
        if t.max_steps > 0:
            parts.append(trainer.global_step / t.max_steps)
        if t.max_time is not None:
            timer = next((c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)), None)
            if timer is not None:
                parts.append((timer.time_elapsed("train") or 0.0) / t.max_time)
        if t.max_epochs > 0 and trainer.num_training_batches not in (0, float("inf")):
            done = trainer.current_epoch + trainer.fit_loop.epoch_loop.batch_idx / trainer.num_training_batches
            parts.append(done / t.max_epochs)
        return min(1.0, max(parts))

    def learning_rate(self) -> float:
        """Linear warm-up, then constant or cosine from ``lr`` to ``min_lr`` over the budget."""
        o = self.cfg.optim
        if self.ntasgd.switched:
            return o.lr  # averaged SGD keeps the base rate (AWD-LSTM)
        if o.warmup_steps and self.global_step < o.warmup_steps:
            return o.lr * (self.global_step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return o.lr
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * self.progress()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if o.optimizer == "adamw":
            decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": o.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2))
        sgd = torch.optim.SGD(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        return asgd_from(sgd, lr=o.lr) if self.ntasgd.switched else sgd

    # --------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Batch, batch_idx: int, metric: CharNLL) -> None:
        if batch_idx == 0:
            self._eval_states = None
        nll_sum, self._eval_states = score_batch(self.model, batch, self._eval_states)
        metric.update(nll_sum, batch.y.numel())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_nll)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_nll)

    def _log_split(self, split: str, metric: CharNLL) -> float:
        loss = float(metric.compute())
        self.log(f"{split}_loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}_bpc", loss / LN2)
        self.log(f"{split}_ppl", math.exp(min(loss, 700.0)))
        self.log(f"{split}_chars", float(metric.chars))
        metric.reset()
        return loss

    def on_validation_start(self) -> None:
        if self.ntasgd.switched and not self.trainer.sanity_checking:
            self._raw_backup = swap_in_averages(self.trainer.optimizers[0])

    def on_validation_epoch_end(self) -> None:
        loss = self._log_split("val", self.val_nll)
        if self.trainer.sanity_checking or self.cfg.optim.optimizer != "ntasgd":
            return
        if self.ntasgd.step(loss):
            self.print(f"NT-ASGD: validation stopped improving at step {self.global_step}; "
                       "switching to averaged SGD")
            self.trainer.strategy.optimizers = [asgd_from(self.trainer.optimizers[0], lr=self.cfg.optim.lr)]
        self.log("ntasgd_switched", float(self.ntasgd.switched))

    def on_validation_end(self) -> None:  # after ModelCheckpoint saved the averaged weights
        if self._raw_backup:
            restore_raw_weights(self._raw_backup)
            self._raw_backup = []

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_nll)

    # -------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ntasgd"] = self.ntasgd.state_dict()
        if self._raw_backup:  # saved while averages are swapped in: keep the raw weights to resume
            names = {id(p): n for n, p in self.named_parameters()}
            checkpoint["raw_weights"] = {names[id(p)]: raw for p, raw in self._raw_backup if id(p) in names}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ntasgd" in checkpoint:
            self.ntasgd.load_state_dict(checkpoint["ntasgd"])
        if "raw_weights" in checkpoint:  # resume training from the raw (not averaged) weights
            checkpoint["state_dict"].update(checkpoint["raw_weights"])
