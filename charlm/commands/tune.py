"""``charlm tune``: a hyperparameter search (Optuna) over a YAML search space, one training run per trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from charlm.commands.common import ConfigOption, DataOption, RunStepsOption, RunTimeOption, friendly, out
from charlm.util.errors import CharlmError


@friendly
def tune(
    space: Annotated[str, typer.Option(
        help="Search-space YAML: config keys and distributions, e.g. 'optim.lr: loguniform(1e-4, 1e-2)'.")],
    trials: Annotated[int, typer.Option(help="Trials in the study in all, over every worker and machine.")],
    study: Annotated[str, typer.Option(help="Study name: its folder under --out, and its name in the storage.")],
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL (e.g. postgresql://...): every machine given it joins the study. "
             "Default: sqlite:///<out>/<study>/study.db.")] = None,
    workers: Annotated[int, typer.Option(help="Trials run at once on this machine, one process each.")] = 1,
    config: ConfigOption = "default",
    data: DataOption = None,
    max_steps: RunStepsOption = None,
    max_time: RunTimeOption = None,
    pruner: Annotated[str, typer.Option(
        help="median, hyperband, threshold:LOSS or none: stops a trial whose validation curve is bad.")] = "median",
    out_dir: Annotated[str | None, typer.Option("--out", help="Folder of studies (default: the config's train.out).")
                       ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")] = None,
) -> None:
    """Search hyperparameters: each trial a training run; prints a table, writes best.yaml and importance.png."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise CharlmError('charlm tune needs Optuna: pip install "charlm[tune]"') from None
    from charlm.config import load_config
    from charlm.tools.compare.plan import budget_overrides
    from charlm.tools.tune.results import report_study
    from charlm.tools.tune.space import load_space
    from charlm.tools.tune.study import run_study, study_settings
    from charlm.util.atomic import check_output_folder

    search = load_space(space)
    overrides = [*(set_ or []), *budget_overrides(max_steps, max_time)]
    if data is not None:
        overrides.append(f"data.path={json.dumps(data)}")
    user_config = load_config(config, overrides)  # what best.yaml starts from
    base = load_config(config, ["sample.enabled=false", "train.progress=false", *overrides])  # each trial's
    check_output_folder(out_dir or user_config.train.out, "--out" if out_dir else "train.out")
    settings = study_settings(base, search, study=study, out=Path(out_dir or user_config.train.out),
                              storage=storage, trials=trials, workers=workers, pruner=pruner)
    t = base.train
    if t.max_steps > 0 and t.val_every_steps > t.max_steps:
        out.print(f"[yellow]note:[/] validation every {t.val_every_steps} steps never fires within {t.max_steps} "
                  "steps: nothing to prune on (lower it with --set train.val_every_steps=N)")
    out.print(f"[bold]tune[/] study {study}: {trials} trials, {workers} worker(s) here, storage "
              f"{settings.storage if storage is None else 'from --storage'}; runs in {settings.study_dir} "
              "(the same command continues the study)")
    result = run_study(settings, say=lambda line: out.print(f"[yellow]note:[/] {escape(line)}"))
    report = report_study(result, user_config, settings.study_dir, out)
    if report.best is not None and report.best_yaml is not None:
        out.print(f"[bold green]best[/] trial {report.best.number}: val loss {report.best.value:.4f}; "
                  f"config {report.best_yaml}")
    else:
        out.print("[yellow]no trial completed[/]: no best.yaml")
    if report.plot is not None:
        out.print(f"importance plot: {report.plot}")
