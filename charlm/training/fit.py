"""``charlm train``: build the data, the module and the Lightning ``Trainer``, run, report."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from rich.console import Console
from rich.markup import escape

from charlm.cells.norm_lstm_cpp import build_before_training
from charlm.config import Config, dump_yaml
from charlm.data.datamodule import CharDataModule, eval_streams
from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.char_lm import count_parameters
from charlm.model.checkpoint import safe_load
from charlm.model.fast_step import build_before_training as build_step_before_training
from charlm.training.callbacks import LastCheckpoint, PrintSample, StopOnInterrupt, TrackBestPath
from charlm.training.checkpoint_io import AtomicCheckpointIO
from charlm.training.finetune import load_starting_point
from charlm.training.lightning_module import CharLMModule
from charlm.training.loggers import build_loggers, check_loggers
from charlm.training.precision import precision_of, resolve_precision
from charlm.training.progress import ProgressBar, TimeEstimate
from charlm.training.runs import hold_run_folder, new_run_dir
from charlm.util.atomic import atomic_write_text
from charlm.util.errors import CharlmError
from charlm.util.threads import fast_cpu_math


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    best_val_loss: float
    steps: int
    seconds: float
    parameters: int


def build_trainer(config: Config, run_dir: Path, *, extra_callbacks: list[L.Callback] | None = None
                  ) -> tuple[L.Trainer, ModelCheckpoint]:
    t = config.train
    best = ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                           save_last=False, enable_version_counter=False, auto_insert_metric_name=False,
                           save_on_train_epoch_end=False)  # after validations only: a resumed epoch has no val_loss
    last = LastCheckpoint(run_dir / "last.ckpt", t.checkpoint_every_steps)
    callbacks: list[L.Callback] = [best, last, TrackBestPath(run_dir / "best.ckpt", run_dir / "last.ckpt"),
                                   StopOnInterrupt(last)]
    if config.sample.enabled:
        callbacks.append(PrintSample(config.sample.prime, config.sample.length, config.sample.temperature,
                                     t.seed))
    if t.max_steps > 0:
        callbacks.append(TimeEstimate(config.data.batch_size * config.data.bptt))
    if t.progress:
        callbacks.append(ProgressBar())
    callbacks += extra_callbacks or []
    val_kwargs: dict[str, object] = (
        {"val_check_interval": t.val_every_steps, "check_val_every_n_epoch": None}
        if t.val_every_steps else {"check_val_every_n_epoch": 1})
    try:
        trainer = L.Trainer(
            accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
            precision=precision_of(config),  # type: ignore[arg-type]
            max_epochs=t.max_epochs, max_steps=t.max_steps,
            max_time=None if t.max_time is None else dt.timedelta(seconds=t.max_time),
            gradient_clip_val=config.optim.clip or None, logger=build_loggers(config, run_dir),
            callbacks=callbacks, enable_progress_bar=t.progress, log_every_n_steps=t.log_every_steps,
            use_distributed_sampler=False, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
            enable_model_summary=False, default_root_dir=run_dir, **val_kwargs)  # type: ignore[arg-type]
    # e.g. --accelerator foo, --devices 0; ImportError: --accelerator tpu without torch_xla
    except (MisconfigurationException, ValueError, TypeError, ImportError) as exc:
        raise CharlmError(f"invalid device settings (train.accelerator={t.accelerator!r}, devices={t.devices!r}, "
                          f"strategy={t.strategy!r}, num_nodes={t.num_nodes}, precision={t.precision!r}): "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return trainer, best


def describe_budget(config: Config, world: int = 1) -> str:
    """The run's stopping rules in words: ``"4,200 steps (17.2 M chars)"``, ``"840 s"``, or both."""
    t, d = config.train, config.data
    rules = []
    if t.max_steps > 0:
        chars = t.max_steps * d.batch_size * world * d.bptt
        amount = f"{chars / 1e6:.1f} M" if chars >= 1e6 else f"{chars:,}"
        rules.append(f"{t.max_steps:,} steps ({amount} chars; the time it takes is shown once the "
                     "first steps are timed)")
    if t.max_epochs > 0:
        rules.append(f"{t.max_epochs:,} epoch{'s' if t.max_epochs > 1 else ''}")
    if t.max_time is not None:
        rules.append(f"{t.max_time:g} s")
    return ", or ".join(rules) + (", whichever comes first" if len(rules) > 1 else "")


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device banner, tips) and known-harmless warnings off screen."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*exists and is not empty.*", ".*LeafSpec.*is deprecated.*", ".*does not have many workers.*",
                    ".*The number of training batches.*is smaller than the logging interval.*",
                    ".*`training_step` returned `None`.*",  # a step skipped on purpose (train.on_nan=skip)
                    # alike on every rank (ntasgd_switched) or rank 0's clock (elapsed_s): nothing to sync
                    r".*self\.log\('(ntasgd_switched|elapsed_s)', \.\.\., sync_dist=True\).*"):
        warnings.filterwarnings("ignore", message=pattern)


def train(config: Config, *, resume: Path | None = None, run_dir: Path | None = None,
          console: Console | None = None, callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Train a model as ``config`` says (or continue ``resume``) and return where the best one is.

    ``run_dir`` is the folder to write (it may exist: a resumed run, a comparison's run); without it a new
    folder ``<out>/<name>`` is made, refused if it exists. Everything that can be checked is checked before
    the folder is touched; it is locked while the run writes to it.
    """
    config, precision_note = resolve_precision(config)  # train.precision: auto -> what it means here
    t = config.train
    check_loggers(config)
    run_dir, new = (run_dir, False) if run_dir is not None else (new_run_dir(config), True)
    quiet_lightning()
    fast_cpu_math(t.threads)
    L.seed_everything(t.seed, workers=True, verbose=False)
    vocab, start, resumed_at = None, None, None
    if resume is not None:  # the checkpoint's vocabulary (a fine-tuned run's is not its corpus's)
        ckpt = safe_load(resume)
        vocab = Vocab(ckpt["hyper_parameters"]["vocab"], origin=f"checkpoint {resume}")
        resumed_at = int(ckpt.get("global_step", 0))
    elif t.init_from is not None:
        start = load_starting_point(config)
        vocab = start.vocab
        config = copy.deepcopy(config)
        config.train.init_from_sha256 = start.sha256  # recorded in config.yaml and the checkpoints
    data = CharDataModule(config.data, seed=t.seed, vocab=vocab)
    module = CharLMModule(config.to_dict(), data.vocab.chars)
    if start is not None:
        module.model.load_state_dict(start.state_dict)
    trainer, best = build_trainer(config, run_dir, extra_callbacks=callbacks)
    if resumed_at is not None:  # continue the run's metrics.csv and TensorBoard events
        trainer.loggers = build_loggers(config, run_dir, resumed_at_step=resumed_at)
    with hold_run_folder(run_dir, new=new, writer=trainer.is_global_zero):
        if trainer.is_global_zero:
            atomic_write_text(run_dir / "config.yaml", dump_yaml(config))
        return _fit(config, trainer, best, module, data, run_dir, resume=resume, console=console,
                    precision_note=precision_note)


def _fit(config: Config, trainer: L.Trainer, best: ModelCheckpoint, module: CharLMModule, data: CharDataModule,
         run_dir: Path, *, resume: Path | None, console: Console | None, precision_note: str | None = None
         ) -> TrainResult:
    """Run ``trainer.fit``, then score the final weights and keep them if they are the best."""
    t = config.train
    if console is not None and trainer.is_global_zero:
        m, d = config.model, config.data
        console.print(f"[bold]run[/] {run_dir}  [bold]corpus[/] {data.corpus.path} "
                      f"({data.splits.train.numel():,} train chars, vocabulary {len(data.vocab)})")
        console.print(f"[bold]model[/] {m.cell} {m.num_layers}x{m.hidden_size}, embedding {m.embedding_size}, "
                      f"{count_parameters(module.model):,} parameters  [bold]device[/] {trainer.strategy.root_device}")
        world = trainer.world_size
        console.print(f"[bold]effective batch[/] {d.batch_size * world} streams x {d.bptt} chars = "
                      f"{d.batch_size * world * d.bptt:,} chars per step ({d.batch_size} per process x {world} "
                      f"process{'es' if world > 1 else ''})  [bold]lr[/] {config.optim.lr:g} "
                      f"({config.optim.schedule}, not scaled with the batch)  [bold]precision[/] {t.precision}")
        if precision_note:
            console.print(f"[bold]precision[/] {precision_note}")
        console.print(f"[bold]budget[/] {describe_budget(config, world)}")
        if resume is not None:
            console.print(f"[bold]resuming[/] from {resume}")
        elif t.init_from is not None:
            console.print(f"[bold]fine-tuning[/] from {escape(t.init_from)} (sha256 {t.init_from_sha256}): its "
                          "weights, model and vocabulary; a fresh optimizer and schedule")
        if data.dropped:
            problem = data.vocab.describe_unknown(data.corpus.text, f"corpus {data.corpus.path}")
            console.print(f"[yellow]dropped[/] from the text (data.drop_unknown): {escape(str(problem))}")
    # the C++ kernel of lstm-ln / lstm-bn is built (once per machine) here, not in the first timed step
    build_before_training(config.model.cell, trainer.strategy.root_device)
    if config.sample.enabled:  # and the model step's C++ op, which the samples at validation use
        build_step_before_training(module.model, trainer.strategy.root_device)

    start = dt.datetime.now()
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    seconds = (dt.datetime.now() - start).total_seconds()
    best_path = run_dir / "best.ckpt"
    # the budget can end between validations: score the final weights and keep them if they are best
    # (every rank scores the whole split, so all of them agree and reach save_checkpoint together;
    # cut into the same streams as a validation over world_size ranks, so the two figures compare)
    # (after the NT-ASGD switch the averaged weights are the ones scored and kept, as at every validation)
    streams = eval_streams(data.splits.val.numel(), config.data.eval_batch_size, trainer.world_size)
    with module.averaged_weights():
        final = evaluate_ids(module.model, data.splits.val, batch_size=streams * trainer.world_size,
                             bptt=config.data.bptt, device=module.device)
        best_score = float(best.best_model_score) if best.best_model_score is not None else float("inf")
        # rank 0 decides for all: on several nodes only its file system holds best.ckpt; saving is collective
        if trainer.strategy.broadcast(final["loss"] < best_score or not best_path.is_file(), src=0):
            trainer.save_checkpoint(best_path, weights_only=False)
            best_score = final["loss"]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # leave together and close the process group: a process exiting while gloo's threads still run
        # can abort ("terminate called without an active exception")
        trainer.strategy.barrier("charlm-train-end")
        torch.distributed.destroy_process_group()
    return TrainResult(run_dir, best_path, best_score, trainer.global_step, seconds,
                       count_parameters(module.model))



