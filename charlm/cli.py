"""The ``charlm`` command line (Typer): train, eval, sample, data, cells, compare.

Every user error is a :class:`CharlmError`, printed as one red line on stderr with exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from charlm.errors import CharlmError, TrainingInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Character-level recurrent language models of Shakespeare, AWD-LSTM style.")
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn a :class:`CharlmError` into one clear message and its exit code (2; 130 for Ctrl-C), never a
    traceback; likewise an ``OSError`` no other layer explained (a full disk, a vanished folder) and a
    Ctrl-C outside training."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TrainingInterrupted as exc:
            from lightning.pytorch.utilities import rank_zero_only

            if rank_zero_only.rank == 0:  # under DDP every process stops the same way: say it once
                err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except CharlmError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            err.print(f"[bold red]error:[/] could not read or write{escape(where)}: {exc.strerror or exc}",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[bold yellow]stopped:[/] interrupted by Ctrl-C", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- train
class _TrainCommand(TyperCommand):
    """``train`` with ``--resume`` usable alone: Typer options cannot take an optional value, so a bare
    ``--resume`` (the last word, or followed by another option) is given the value ``newest`` here."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("newest")
        return super().parse_args(ctx, fixed)


@app.command(cls=_TrainCommand)
@friendly
def train(
    config: Annotated[str, typer.Option(help="A named config (default, smoke, awd-lstm) or a YAML file.")] = "default",
    cell: Annotated[str | None, typer.Option(help="Recurrent cell (see `charlm cells`).")] = None,
    data: Annotated[str | None, typer.Option(help="Corpus text file (UTF-8).")] = None,
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
    precision: Annotated[str | None, typer.Option(help="e.g. 32-true, bf16-mixed.")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a run: alone (or 'newest'), the newest run's last.ckpt under --out; or a checkpoint.",
        show_default=False)] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")] = None,
    show_samples: Annotated[bool | None, typer.Option(
        "--samples/--no-samples", help="Print a short sample at each validation (default: the config's).")] = None,
) -> None:
    """Train a model; prints the best validation loss and where its checkpoint is."""
    from charlm.config import load_config

    overrides = list(set_ or [])
    named = {"model.cell": cell, "data.path": data, "train.max_epochs": max_epochs,
             "train.max_steps": max_steps, "train.max_time": max_time, "train.seed": seed,
             "train.name": name, "train.out": out_dir, "train.strategy": strategy,
             "train.num_nodes": num_nodes, "train.accelerator": accelerator, "train.precision": precision,
             "sample.enabled": show_samples}
    overrides += [f"{key}={json.dumps(value)}" for key, value in named.items() if value is not None]
    if devices is not None:
        overrides.append(f"train.devices={devices}")
    cfg = load_config(config, overrides)
    resume_path, run_dir = None, None
    if resume is not None:
        from charlm.resume import resolve_resume

        cfg, resume_path, run_dir = resolve_resume(resume, cfg, overrides)
    from charlm.train import train as run_training

    result = run_training(cfg, resume=resume_path, run_dir=run_dir, console=out)
    from lightning.pytorch.utilities import rank_zero_only

    from charlm.metrics import LN2

    if rank_zero_only.rank != 0:  # under DDP every process runs this command; one report is enough
        return
    out.print(f"[bold green]done[/] in {result.seconds:.0f} s, {result.steps} steps, "
              f"{result.parameters:,} parameters")
    out.print(f"best val loss {result.best_val_loss:.4f} nats/char = {result.best_val_loss / LN2:.4f}"
              f" bits/char")
    out.print(f"checkpoint: {result.best_checkpoint}")


# ------------------------------------------------------------------------------------------------ eval
def _checkpoint(path: str | None, out_dir: str = "checkpoints") -> Path:
    from charlm.checkpoint import newest_run_checkpoint

    return Path(path) if path else newest_run_checkpoint(out_dir)


@app.command("eval")
@friendly
def eval_(
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint (default: newest run's best).")] = None,
    split: Annotated[str, typer.Option(help="val or test.")] = "val",
    text: Annotated[str | None, typer.Option(help="Evaluate this text file instead of a split.")] = None,
    data: Annotated[str | None, typer.Option(help="Corpus the split is cut from (default: the run's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    batch_size: Annotated[int | None, typer.Option(
        help="Streams evaluated side by side (default: as the run's validation, so the loss matches its "
             "val_loss: data.eval_batch_size x the processes it trained on).", show_default=False)] = None,
) -> None:
    """Loss (nats/char), bits per char and perplexity of a checkpoint on a split or a file."""
    from charlm.checkpoint import load_model
    from charlm.corpus import load_corpus, read_corpus, resolve_corpus_path
    from charlm.datamodule import split_ids, text_ids
    from charlm.evaluate import evaluate_ids, finite_or_null, nonfinite_parameters, validation_streams
    from charlm.train import fast_cpu_math

    if split not in ("val", "test"):
        raise CharlmError(f"--split must be val or test, got '{split}'")
    if batch_size is not None and batch_size < 1:
        raise CharlmError(f"--batch-size must be at least 1, got {batch_size}")
    path = _checkpoint(checkpoint)
    model, vocab, cfg, ckpt = load_model(path)
    fast_cpu_math()
    if text is not None:
        corpus = read_corpus(resolve_corpus_path(text, option="--text"))
        ids = text_ids(vocab, corpus.text, what=f"--text file {corpus.path}")
        source = str(corpus.path)
    else:
        corpus = load_corpus(data if data is not None else cfg.data.path)
        all_ids = vocab.encode(corpus.text, what=f"corpus {corpus.path}")
        ids = getattr(split_ids(all_ids, cfg.data.val_fraction, cfg.data.test_fraction), split)
        source = f"{corpus.path} ({split} split)"
    streams = batch_size or validation_streams(ckpt, ids.numel(), cfg.data.eval_batch_size)
    # the training run's window, as its validation used: lstm-bn's per-step statistics restart with every
    # window, so its loss depends on the window length (the other cells' does not, up to float rounding)
    result = evaluate_ids(model, ids, batch_size=streams, bptt=cfg.data.bptt)
    bad = nonfinite_parameters(model)
    why = (f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. {bad[0]})" if bad
           else "the model's scores overflowed on this text")
    result = finite_or_null({"checkpoint": str(path), "source": source, "streams": streams, **result}, why)
    with _stdout_may_close():
        if as_json:
            print(json.dumps(result, allow_nan=False))
            return
        table = Table(title=f"{path}\n{source}", show_header=False)
        for key, fmt in (("loss", "{:.4f} nats/char"), ("bpc", "{:.4f} bits/char"), ("perplexity", "{:.3f}"),
                         ("chars", "{:,}"), ("chars_per_s", "{:,.0f}")):
            table.add_row(key, "not a finite number" if result[key] is None else fmt.format(result[key]))
        out.print(table)
    if "reason" in result:
        err.print(f"[bold yellow]warning:[/] {escape(result['reason'])}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- sample
@contextlib.contextmanager
def _stdout_may_close() -> Iterator[None]:
    """A reader that stops early (``charlm sample | head``) is a normal end: exit 0, quietly."""
    try:
        yield
    except BrokenPipeError:
        # stdout's buffer still holds text for the closed pipe: point it at /dev/null, so that flushing
        # it at exit neither fails nor prints "Exception ignored ... BrokenPipeError"
        with contextlib.suppress(OSError, ValueError):  # ValueError, io.UnsupportedOperation: a test's capture
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


@app.command()
@friendly
def sample(
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint (default: newest run's best).")] = None,
    prime: Annotated[str, typer.Option(help="Text the sample starts with.")] = "\n",
    length: Annotated[int, typer.Option(
        help="Characters to generate after the prime (at most 100,000,000).")] = 500,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher is wilder.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample only from the k likeliest characters.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text (0 to 2**32 - 1).")] = None,
    num_samples: Annotated[int, typer.Option(help="Independent samples, generated together.")] = 1,
) -> None:
    """Generate text, streamed as it comes; the output starts with the prime."""
    from charlm.checkpoint import load_model
    from charlm.evaluate import nonfinite_parameters
    from charlm.sampling import check_options, generate, stream
    from charlm.train import fast_cpu_math

    check_options(length, temperature, top_k, num_samples, prefix="--", seed=seed)  # before the slow load
    path = _checkpoint(checkpoint)
    model, vocab, _, _ = load_model(path)
    vocab.check(prime, what="--prime")
    bad = nonfinite_parameters(model)
    if bad:
        raise CharlmError(f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. "
                          f"{bad[0]}), so it cannot generate text; use an earlier checkpoint of that run or retrain")
    fast_cpu_math()
    with _stdout_may_close():
        if num_samples == 1:
            sys.stdout.write(prime)
            sys.stdout.flush()

            def emit(ch: str) -> None:
                sys.stdout.write(ch)
                sys.stdout.flush()

            stream(model, vocab, prime, length, emit, temperature=temperature, top_k=top_k, seed=seed)
            sys.stdout.write("\n")
            sys.stdout.flush()
            return
        texts = generate(model, vocab, prime, length, temperature=temperature, top_k=top_k, seed=seed,
                         num_samples=num_samples)
        for i, text in enumerate(texts):
            sys.stdout.write(f"=== sample {i + 1} ===\n{text}\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ data
@app.command("data")
@friendly
def data_(
    data: Annotated[str | None, typer.Option(help="Corpus text file (default: tiny Shakespeare).")] = None,
    config: Annotated[str, typer.Option(help="Config whose split fractions to use.")] = "default",
) -> None:
    """Where the corpus is, its sha256, size, vocabulary and split sizes."""
    from charlm.config import load_config
    from charlm.corpus import load_corpus
    from charlm.datamodule import split_ids
    from charlm.vocab import Vocab

    cfg = load_config(config)
    corpus = load_corpus(data if data is not None else cfg.data.path)
    vocab = Vocab.from_text(corpus.text)
    splits = split_ids(vocab.encode(corpus.text), cfg.data.val_fraction, cfg.data.test_fraction)
    table = Table(show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")  # a narrow terminal folds the hash, never cuts it
    table.add_row("path", str(corpus.path))
    table.add_row("sha256", corpus.sha256)
    table.add_row("characters", f"{len(corpus.text):,}")
    table.add_row("vocabulary", f"{len(vocab)}: {vocab.chars!r}")
    for name in ("train", "val", "test"):
        table.add_row(f"{name} split", f"{getattr(splits, name).numel():,}")
    out.print(table)


# ----------------------------------------------------------------------------------------------- cells
@app.command()
def cells() -> None:
    """The recurrent cells, one line each."""
    from charlm.cells import describe_cells

    table = Table("cell", "what it computes")
    for name, summary in describe_cells():
        table.add_row(name, escape(summary))
    out.print(table)


# --------------------------------------------------------------------------------------------- compare
@app.command()
@friendly
def compare(
    cells: Annotated[str | None, typer.Option(
        help="Comma-separated cells, e.g. lstm,gru,peephole (see `charlm cells`); the first is the reference.")
    ] = None,
    preset: Annotated[str | None, typer.Option(
        help="jozefowicz: Tanh, LSTM, LSTM-f/i/o/b, GRU, MUT1-3 (Jozefowicz et al. 2015); "
             "greff: V (peephole) and NIG NFG NOG NIAF NOAF NP CIFG FGR (Greff et al. 2017).")] = None,
    config: Annotated[str, typer.Option(help="A named config (default, smoke, awd-lstm) or a YAML file.")] = "default",
    data: Annotated[str | None, typer.Option(help="Corpus text file (UTF-8).")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Steps per run (alone, it turns the config's time limit off).")] = None,
    max_time: Annotated[float | None, typer.Option(
        help="Seconds per run (alone, it turns the config's step limit off).")] = None,
    seeds: Annotated[str | None, typer.Option(
        help="Comma-separated seeds, e.g. 1,2,3: each cell is trained once per seed; mean ± std and "
             "min–max are reported. Default: the config's seed.")] = None,
    match_params: Annotated[bool, typer.Option(
        "--match-params", help="Give each cell the hidden size whose parameter count is nearest the first cell's.")
    ] = False,
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="Folder of the comparison (default checkpoints/compare-<time>); the same --out resumes.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")] = None,
) -> None:
    """Train several cells under one config, seed and budget; a table, results files and curves.png."""
    import datetime as dt

    from charlm.compare import PRESET_OVERRIDES, budget_overrides, parse_seeds, resolve_entries, run_comparison
    from charlm.config import load_config

    entries = resolve_entries(cells, preset)
    overrides = ["sample.enabled=false", *PRESET_OVERRIDES.get((preset or "").strip().lower(), []),
                 *(set_ or []), *budget_overrides(max_steps, max_time)]
    if data is not None:
        overrides.append(f"data.path={json.dumps(data)}")
    cfg = load_config(config, overrides)
    folder = Path(out_dir) if out_dir else Path(cfg.train.out) / f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}"
    settings = {"config": config, "overrides": overrides, "preset": preset}
    result = run_comparison(cfg, entries, seeds=parse_seeds(seeds, cfg.train.seed), out=folder,
                            match_params=match_params, console=out, settings=settings)
    out.print(f"[bold green]done[/]: {result.trained} run(s) trained, {len(result.runs) - result.trained} "
              f"already finished; wrote {', '.join(str(p) for p in result.files)}")


def main() -> None:
    app()
