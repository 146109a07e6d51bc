"""``charlm train``: a model from a config, a run continued (``--resume``), or fine-tuned (``--init-from``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from charlm.commands.common import ConfigOption, DataOption, friendly, out
from charlm.util.errors import CharlmError


class TrainCommand(TyperCommand):
    """``train`` with ``--resume`` usable alone: Typer options cannot take an optional value, so a bare
    ``--resume`` (the last word, or followed by another option) is given the value ``newest`` here."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("newest")
        return super().parse_args(ctx, fixed)


@friendly
def train(
    config: ConfigOption = "default",
    cell: Annotated[str | None, typer.Option(help="Recurrent cell (see `charlm cells`).")] = None,
    data: DataOption = None,
    max_epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    max_time: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name (folder under --out).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Folder of runs.")] = None,
    devices: Annotated[str | None, typer.Option(help="Devices per node: a number or 'auto'.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Number of nodes.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="cpu, gpu or auto.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto (the default: bf16-mixed for the LSTM on a CPU with native bfloat16, else 32-true), 32-true, "
             "bf16-mixed, ...")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a run: alone (or 'newest'), the newest run's last.ckpt under --out; or a checkpoint.",
        show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")] = None,
    show_samples: Annotated[bool | None, typer.Option(
        "--samples/--no-samples", help="Print a short sample at each validation (default: the config's).")] = None,
    logger: Annotated[list[str] | None, typer.Option(
        help="Where metrics go: csv (metrics.csv, the default), tensorboard (<run>/tensorboard/), or both: "
             "csv,tensorboard (or the option twice).", show_default=False)] = None,
    init_from: Annotated[str | None, typer.Option(
        help="Fine-tune: a new run starting from this checkpoint's weights, model and vocabulary (fresh "
             "optimizer and schedule).", show_default=False)] = None,
    drop_unknown: Annotated[bool, typer.Option(
        "--drop-unknown", help="With --init-from: remove the text's characters outside the checkpoint's "
                               "vocabulary (else they are refused).")] = False,
) -> None:
    """Train a model; prints the best validation loss and where its checkpoint is."""
    from charlm.config import load_config

    overrides = list(set_ or [])
    named = {"model.cell": cell, "data.path": data, "train.max_epochs": max_epochs,
             "train.max_steps": max_steps, "train.max_time": max_time, "train.seed": seed,
             "train.name": name, "train.out": out_dir, "train.strategy": strategy,
             "train.num_nodes": num_nodes, "train.accelerator": accelerator, "train.precision": precision,
             "sample.enabled": show_samples, "train.loggers": ",".join(logger) if logger else None,
             "train.init_from": init_from, "data.drop_unknown": drop_unknown or None}
    overrides += [f"{key}={json.dumps(value)}" for key, value in named.items() if value is not None]
    if devices is not None:
        overrides.append(f"train.devices={devices}")
    cfg = load_config(config, overrides)
    from charlm.util.atomic import check_output_folder

    check_output_folder(cfg.train.out, "--out" if out_dir is not None else "train.out")
    resume_path, run_dir = None, None
    if resume is not None:
        from charlm.training.resume import INIT_FROM_WITH_RESUME, resolve_resume

        if init_from is not None:
            raise CharlmError(INIT_FROM_WITH_RESUME)
        cfg, resume_path, run_dir = resolve_resume(resume, cfg, overrides)
    elif cfg.train.init_from is not None:
        from charlm.training.finetune import fine_tune_config

        cfg = fine_tune_config(cfg, overrides)
    from charlm.training.fit import train as run_training

    result = run_training(cfg, resume=resume_path, run_dir=run_dir, console=out)
    from lightning.pytorch.utilities import rank_zero_only

    from charlm.evaluation.metrics import LN2

    if rank_zero_only.rank != 0:  # under DDP every process runs this command; one report is enough
        return
    out.print(f"[bold green]done[/] in {result.seconds:.0f} s, {result.steps} steps, "
              f"{result.parameters:,} parameters")
    out.print(f"best val loss {result.best_val_loss:.4f} nats/char = {result.best_val_loss / LN2:.4f}"
              f" bits/char")
    out.print(f"checkpoint: {result.best_checkpoint}")
