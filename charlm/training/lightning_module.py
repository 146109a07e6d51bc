"""The thin ``LightningModule`` around :class:`CharLM`: truncated BPTT, the schedule, NT-ASGD, metrics.

Lightning 2.x has no ``truncated_bptt_steps``: one batch is one window. The module keeps the hidden
state of the training streams (detached after every step, reset at every epoch start) and a separate
state for evaluation (reset at the start of each pass over a split).

The hooks, in the order they fire in one training step:

1. ``on_train_batch_start``: applies a resumed run's carried state and random state (first step only);
   with variable-length BPTT, scales this one step's rate by ``seq_len / bptt`` (the one rate change
   made outside the scheduler); logs ``lr``.
2. ``training_step``: forward from the carried state, loss with AR/TAR; a non-finite loss stops the run
   (or skips the step).
3. ``on_before_optimizer_step``: logs the gradients' norm (``grad_norm``, before clipping); a non-finite
   gradient never reaches the weights.
4. Lightning steps the optimizer, then the ``LambdaLR`` of ``configure_optimizers`` (``interval:
   "step"``), which asks :meth:`CharLMModule.learning_rate` for the next step's rate.
5. When a validation follows the step: ``on_validation_start`` swaps in NT-ASGD's averaged weights
   (:meth:`CharLMModule.averaged_weights`), ``validation_step`` scores each window,
   ``on_validation_epoch_end`` feeds the loss to NT-ASGD (which may switch to averaged SGD) and logs
   the elapsed time; Lightning then computes and logs the split's metrics (``val_loss``, ...), the
   callbacks' ``on_validation_end`` save ``best.ckpt`` and ``last.ckpt`` (``on_save_checkpoint``
   adds this module's state), and the module's ``on_validation_end`` puts the raw weights back.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection

from charlm.config import Config, from_dict
from charlm.data.streams import Batch
from charlm.data.vocab import Vocab
from charlm.evaluation.metrics import LN2, split_metrics
from charlm.evaluation.scoring import score_batch
from charlm.model.char_lm import CharLM, States, detach_states
from charlm.model.checkpoint import FORMAT_VERSION
from charlm.model.regularizers import ar_penalty, tar_penalty
from charlm.training.ntasgd import NTASGD, asgd_from, averaged_weights, rate_applied_now
from charlm.util.errors import TrainingDiverged

MAX_SKIPPED_IN_A_ROW = 10  # on_nan=skip: this many non-finite steps in a row stop the run all the same


class CharLMModule(L.LightningModule):
    """Trains and evaluates a :class:`CharLM`; hyperparameters are primitives (config dict + vocab)."""

    def __init__(self, config: dict[str, Any], vocab: str, format_version: int = FORMAT_VERSION) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = from_dict(config)
        self.vocab = Vocab(vocab)
        self.model = CharLM(len(self.vocab), self.cfg.model)
        self.val_metrics, self.test_metrics = split_metrics("val"), split_metrics("test")
        self.ntasgd = NTASGD(self.cfg.optim.nonmono)
        self._train_states: States | None = None
        self._eval_states: States | None = None
        self._raw_backup: list[tuple[Tensor, Tensor]] = []  # (parameter, raw weights) while averages are in
        self._averaging = ExitStack()  # holds averaged_weights() open from on_validation_start to _end
        self._from_checkpoint = False  # a resumed run: its schedule is made afresh when training starts
        self._last_step_time: float | None = None
        self.last_good_checkpoint: str | None = None
        self._resumed: dict[str, Any] | None = None  # carried state + RNG from a checkpoint, applied at step 1
        self._skipped_in_a_row = 0
        self._lr_at_switch: float | None = None  # NT-ASGD: the scheduled rate when averaging began, held after
        # Training wall time of earlier sessions (restored from the checkpoint); None after resuming from a
        # checkpoint that did not keep it, so no made-up time is logged.
        self._elapsed_before: float | None = 0.0
        self._session_start: float | None = None  # perf_counter() when this session's training started

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
        if self._any_rank(not bool(torch.isfinite(loss))):  # decided together: DDP ranks must not diverge
            self._non_finite(f"the loss became {loss.item()}")
            self._train_states = None  # a NaN in the carried state would poison every later window
            return None
        chars = batch.y.numel()
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train_chars_per_s", chars / max(now - self._last_step_time, 1e-9), on_step=True)
        self._last_step_time = now
        self.log("train_loss", nll, on_step=True, prog_bar=True)
        self.log("train_bpc", nll / LN2, on_step=True)
        return loss

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or'ed over the DDP processes (just ``flag`` in one process or outside a Trainer)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _non_finite(self, what: str) -> None:
        """Stop with a message naming the step and the last good checkpoint, or count a skipped step."""
        step = self.global_step
        where = self.last_good_checkpoint
        resume = (f" Resume from it with `charlm train --resume {where} --set optim.lr=...` (a lower rate)."
                  if where else "")
        if self.cfg.train.on_nan == "skip":
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row < MAX_SKIPPED_IN_A_ROW:
                self.print(f"step {step}: {what}; step skipped (train.on_nan=skip)")
                return
            raise TrainingDiverged(f"training stopped: {what} at step {step}, the {MAX_SKIPPED_IN_A_ROW}th step in a "
                                   f"row that was not finite. Last good checkpoint: {where or 'none saved yet'}."
                                   + resume, what, step)
        raise TrainingDiverged(f"training stopped: {what} at step {step}. Last good checkpoint: "
                               f"{where or 'none saved yet'}. Lower optim.lr or raise optim.clip, "
                               "or set train.on_nan=skip to skip such steps." + resume, what, step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A finite loss can still give inf/NaN gradients: never let them reach the weights."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return  # a step skipped for its loss: nothing to check, and not a good step either
        norm = torch.nn.utils.get_total_norm(grads)  # before clipping (Lightning clips after this hook)
        finite = bool(torch.isfinite(norm))
        if finite:
            self.log("grad_norm", norm, on_step=True)
        if finite or str(self.trainer.precision).startswith("16"):
            # a good step ends a run of bad ones (16-bit: a finite loss; the gradient scaler skips a
            # non-finite gradient itself)
            self._skipped_in_a_row = 0
            return
        self._non_finite("the gradients became non-finite")
        optimizer.zero_grad(set_to_none=True)  # skipped: no gradient, no update
        self._train_states = None

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self._resumed is not None:
            self._restore_resume_state(self._resumed)
            self._resumed = None
        scheduler = self.lr_schedulers()
        assert isinstance(scheduler, LambdaLR)
        rates = scheduler.get_last_lr()  # the scheduler's rate for this step
        if self.cfg.data.variable_bptt:
            # The one change made outside the scheduler, for this step only (AWD-LSTM): a short window
            # takes a proportionally smaller step. The scheduler's next step sets the rates afresh.
            scale = batch.x.size(1) / self.cfg.data.bptt
            rates = [rate * scale for rate in rates]
            for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
        rate_applied_now(scheduler.optimizer)  # NT-ASGD: the rate set now is the one this step applies
        self.log("lr", rates[0], on_step=True)

    def progress(self) -> float:
        """Fraction of the budget spent: the most advanced of steps, time and epochs (batches done)."""
        if self._trainer is None:
            return 0.0
        t, trainer = self.cfg.train, self.trainer
        parts = [0.0]
        if t.max_steps > 0:
            parts.append(trainer.global_step / t.max_steps)
        if t.max_time is not None:
            timer = next((c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)), None)
            if timer is not None:
                parts.append((timer.time_elapsed("train") or 0.0) / t.max_time)
        if t.max_epochs > 0 and trainer.num_training_batches not in (0, float("inf")):
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # in this epoch
            parts.append((trainer.current_epoch + batches / trainer.num_training_batches) / t.max_epochs)
        return min(1.0, max(parts))

    def learning_rate(self) -> float:
        """The rate of the next optimizer step, as the budget stands now (the scheduler's lambda).

        Linear warm-up, then constant or cosine from ``lr`` to ``min_lr`` over the budget. NT-ASGD: once
        averaging has begun, the rate the schedule had reached at the switch is held constant
        (AWD-LSTM's averaged SGD runs at a constant rate), so the rate never jumps at the switch.
        """
        o = self.cfg.optim
        if self.ntasgd.switched:
            # a checkpoint from before the rate at the switch was kept: its run averaged at the base rate
            return o.lr if self._lr_at_switch is None else self._lr_at_switch
        if o.warmup_steps and self.global_step < o.warmup_steps:
            return o.lr * (self.global_step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return o.lr
        return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * self.progress()))

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> LambdaLR:
        """The ``LambdaLR`` that sets ``optimizer``'s rate to :meth:`learning_rate` (at once, then after every
        step). Each group's base rate is 1, so the lambda's value is the rate itself."""
        for group in optimizer.param_groups:
            group["initial_lr"] = 1.0
        return LambdaLR(optimizer, lambda _: self.learning_rate())

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        o = self.cfg.optim
        optimizer: torch.optim.Optimizer
        if o.optimizer == "adamw":
            decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": o.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2))
        else:
            optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
            if self.ntasgd.switched:  # resumed after the switch
                optimizer = asgd_from(optimizer, lr=self.learning_rate())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    # --------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: Batch, batch_idx: int, metrics: MetricCollection) -> None:
        if batch_idx == 0:
            self._eval_states = None
        nll_sum, self._eval_states = score_batch(self.model, batch, self._eval_states)
        metrics.update(nll_sum, batch.y.numel())
        # The metric objects themselves: Lightning computes them at the end of the split (torchmetrics sums
        # their states over the DDP ranks first, so every rank logs the exact figure of the whole split)
        # and resets them.
        for name, metric in metrics.items(copy_state=False):
            self.log(name, metric, prog_bar=name.endswith("_loss"))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside, the model holds NT-ASGD's running averages (the weights that are validated, scored at the
        end of training and saved as ``best.ckpt``); on exit the raw weights, which training goes on from,
        come back bit for bit. A checkpoint written inside keeps the raw weights too. A no-op before the
        switch to averaged SGD (no averages yet). Every swap of the averages goes through here."""
        if not self.ntasgd.switched:
            yield
            return
        with averaged_weights(self.trainer.optimizers[0]) as raw:
            self._raw_backup = raw
            try:
                yield
            finally:
                self._raw_backup = []

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._averaging.enter_context(self.averaged_weights())

    def _val_loss(self) -> float:
        """This validation's loss, as logged (computing it now: Lightning then logs the same value)."""
        return float(self.val_metrics.compute()["val_loss"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        elapsed = self.elapsed_seconds()
        if elapsed is not None:
            self.log("elapsed_s", elapsed)
        if self.cfg.optim.optimizer != "ntasgd":
            return
        scheduler = self.lr_schedulers()
        assert isinstance(scheduler, LambdaLR)
        rate = scheduler.get_last_lr()[0]  # the rate the next step gets: held from now on
        if self.ntasgd.step(self._val_loss()):
            self._lr_at_switch = rate
            self.print(f"NT-ASGD: validation stopped improving at step {self.global_step}; "
                       f"switching to averaged SGD at the rate reached, {rate:g}")
            asgd = asgd_from(self.trainer.optimizers[0], lr=rate)
            self.trainer.strategy.optimizers = [asgd]
            self.trainer.lr_scheduler_configs[0].scheduler = self._scheduler(asgd)
        self.log("ntasgd_switched", float(self.ntasgd.switched))

    def on_validation_end(self) -> None:  # after the callbacks (best.ckpt, last.ckpt) saved the averages
        self._averaging.close()

    # ---------------------------------------------------------------------------------- wall time
    def on_train_start(self) -> None:
        self._session_start = time.perf_counter()
        if self._from_checkpoint:
            # Resumed: the scheduler Lightning restored holds the rate for the next step as the old budget
            # had it, and none at all in a checkpoint written before the schedule was a scheduler. Its
            # lambda keeps no state, so a new scheduler, made now that the step count and the clock are
            # back, is the same schedule, under the budget as it stands now (it may change on resuming).
            config = self.trainer.lr_scheduler_configs[0]
            config.scheduler = self._scheduler(config.scheduler.optimizer)
            self._from_checkpoint = False

    def on_train_end(self) -> None:  # the clock stops: a checkpoint saved after training keeps this time
        self._elapsed_before = self.elapsed_seconds()
        self._session_start = None

    def elapsed_seconds(self) -> float | None:
        """Wall time spent training this run (validation included), over every resumed session so far;
        ``None`` when resumed from a checkpoint that did not keep it."""
        if self._elapsed_before is None:
            return None
        running = 0.0 if self._session_start is None else time.perf_counter() - self._session_start
        return self._elapsed_before + running

    # -------------------------------------------------------------------------------- checkpoints
    def _gather(self, tensor: Tensor) -> Tensor:
        """[world_size, ...] on the CPU: every process's copy (all processes call this together)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor.detach().cpu().unsqueeze(0)
        local = tensor.detach().to(self.device).contiguous()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.empty_like(local) for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather(parts, local)
            return torch.stack(parts).cpu()
        return self.all_gather(local).cpu()  # type: ignore[union-attr]

    def _resume_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond weights, optimizer and loops: the streams' carried hidden
        state and the random state (dropout masks), one copy per DDP process."""
        version, internal, _ = random.getstate()
        rng = {"torch": self._gather(torch.get_rng_state()),
               "python": self._gather(torch.tensor(internal, dtype=torch.int64))}
        if self.device.type == "cuda":
            rng["cuda"] = self._gather(torch.cuda.get_rng_state(self.device))
        states = None
        if self._train_states is not None:
            states = [[self._gather(t) for t in layer] for layer in self._train_states]
        world = 1 if self._trainer is None else self.trainer.world_size
        return {"world_size": world, "python_rng_version": version, "rng": rng, "train_states": states}

    def _restore_resume_state(self, state: dict[str, Any]) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if state["world_size"] != world:
            self.print(f"resuming with {world} process(es) where the checkpoint had {state['world_size']}: "
                       "the streams' hidden state starts from zero and random numbers from the seed")
            return
        rng = state["rng"]
        # clone: a row of the stacked states is a view at an offset, which set_rng_state misreads (segfault)
        torch.set_rng_state(rng["torch"][rank].clone())
        random.setstate((state["python_rng_version"], tuple(rng["python"][rank].tolist()), None))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank].clone(), self.device)
        if state["train_states"] is not None:
            self._train_states = [tuple(t[rank].to(self.device) for t in layer) for layer in state["train_states"]]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # never a NaN model on disk, whoever saves (last.ckpt, best.ckpt, Ctrl-C); every DDP process holds
        # the same weights and runs this hook, so they all stop together
        bad = [name for name, value in checkpoint["state_dict"].items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:
            where = self.last_good_checkpoint or "none saved yet"
            what = f"the weights are not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
            raise TrainingDiverged(f"training stopped at step {self.global_step}: {what}, so they were not saved. "
                                   f"Last good checkpoint: {where}", what, self.global_step)
        checkpoint["ntasgd"] = self.ntasgd.state_dict()
        if self._lr_at_switch is not None:
            checkpoint["ntasgd_lr_at_switch"] = self._lr_at_switch
        elapsed = self.elapsed_seconds()
        if elapsed is not None:
            checkpoint["elapsed_s"] = elapsed
        checkpoint["resume_state"] = self._resume_state()
        if self._raw_backup:  # saved while averages are swapped in: keep the raw weights to resume
            names = {id(p): n for n, p in self.named_parameters()}
            checkpoint["raw_weights"] = {names[id(p)]: raw for p, raw in self._raw_backup if id(p) in names}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ntasgd" in checkpoint:
            self.ntasgd.load_state_dict(checkpoint["ntasgd"])
        self._lr_at_switch = checkpoint.get("ntasgd_lr_at_switch")
        self._from_checkpoint = True
        self._elapsed_before = checkpoint.get("elapsed_s")
        # applied at the first training batch, after everything that may draw random numbers on the way
        self._resumed = checkpoint.get("resume_state")
        if "raw_weights" in checkpoint:  # resume training from the raw (not averaged) weights
            checkpoint["state_dict"].update(checkpoint["raw_weights"])
