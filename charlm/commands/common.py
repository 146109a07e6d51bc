"""What every command shares: the consoles, one clear line for a user error, the default checkpoint, and a
reader that closes the pipe early."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from charlm.util.errors import CharlmError, TrainingInterrupted

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

# options several commands share, spelled once
ConfigOption = Annotated[str, typer.Option(help="A named config (default, smoke, awd-lstm) or a YAML file.")]
DataOption = Annotated[str | None, typer.Option(help="Corpus text file (UTF-8).")]
RunStepsOption = Annotated[int | None, typer.Option(  # compare's and tune's budget for each training run
    help="Steps of each training run (alone, it turns the config's time limit off).")]
RunTimeOption = Annotated[float | None, typer.Option(
    help="Seconds of each training run (alone, it turns the config's step limit off).")]


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


def checkpoint_path(path: str | None, out_dir: str = "checkpoints", option: str = "--checkpoint") -> Path:
    """The checkpoint asked for, else (none given) the newest run's best under ``out_dir``."""
    from charlm.model.checkpoint import newest_run_checkpoint

    if path == "":  # an unset shell variable, say: not the same as leaving the option out
        leave = "the option" if option.startswith("-") else "it"
        raise CharlmError(f"{option} is empty; give a checkpoint file, or leave {leave} out to use the newest "
                          "run's best.ckpt")
    return Path(path) if path is not None else newest_run_checkpoint(out_dir)


@contextlib.contextmanager
def stdout_may_close() -> Iterator[None]:
    """A reader that stops early (``charlm sample | head``) is a normal end: exit 0, quietly."""
    try:
        yield
    except BrokenPipeError:
        # stdout's buffer still holds text for the closed pipe: point it at /dev/null, so that flushing
        # it at exit neither fails nor prints "Exception ignored ... BrokenPipeError"
        with contextlib.suppress(OSError, ValueError):  # ValueError, io.UnsupportedOperation: a test's capture
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
