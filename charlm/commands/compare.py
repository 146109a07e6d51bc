"""``charlm compare``: several cells under one config, seed and budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from charlm.commands.common import ConfigOption, DataOption, RunStepsOption, RunTimeOption, friendly, out


@friendly
def compare(
    cells: Annotated[str | None, typer.Option(
        help="Comma-separated cells, e.g. lstm,gru,peephole (see `charlm cells`); the first is the reference.")
    ] = None,
    preset: Annotated[str | None, typer.Option(
        help="jozefowicz: LSTM, Tanh, LSTM-f/i/o/b, GRU, MUT1-3 (Jozefowicz et al. 2015); "
             "greff: V (peephole) and NIG NFG NOG NIAF NOAF NP CIFG FGR (Greff et al. 2017); "
             "modern: LSTM, GRU, minGRU, minLSTM, sLSTM, Mogrifier at matched parameter counts, seeds 1,2,3 "
             "unless --seeds says otherwise.")] = None,
    config: ConfigOption = "default",
    data: DataOption = None,
    max_steps: RunStepsOption = None,
    max_time: RunTimeOption = None,
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
    logger: Annotated[list[str] | None, typer.Option(
        help="tensorboard: also write each run's TensorBoard events (<out>/<cell>-seed<seed>/tensorboard/; "
             "`tensorboard --logdir <out>` shows them side by side). metrics.csv is always written.",
        show_default=False)] = None,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Train nothing: write the tables and curves.png of the comparison in --out again from "
                          "its results.json, under this version's rules (e.g. diverged runs).")] = False,
) -> None:
    """Train several cells under one config, seed and budget; a table, results files and curves.png."""
    import datetime as dt

    from charlm.config import load_config
    from charlm.tools.compare.plan import (
        PRESET_MATCH_PARAMS,
        PRESET_OVERRIDES,
        PRESET_SEEDS,
        budget_overrides,
        parse_seeds,
        resolve_entries,
    )

    if rebuild:
        _rebuild(out_dir, cells=cells, preset=preset, data=data, max_steps=max_steps, max_time=max_time, seeds=seeds,
                 match_params=match_params, set_=set_, logger=logger)
        return
    from charlm.tools.compare.run import run_comparison
    from charlm.util.atomic import check_output_folder

    entries = resolve_entries(cells, preset)
    key = (preset or "").strip().lower()
    seeds = seeds if seeds is not None else PRESET_SEEDS.get(key)
    match_params = match_params or key in PRESET_MATCH_PARAMS
    overrides = ["sample.enabled=false", *PRESET_OVERRIDES.get(key, []),
                 *(set_ or []), *budget_overrides(max_steps, max_time)]
    if data is not None:
        overrides.append(f"data.path={json.dumps(data)}")
    if logger:
        overrides.append(f"train.loggers={json.dumps(','.join(logger))}")
    cfg = load_config(config, overrides)
    folder = Path(out_dir) if out_dir else Path(cfg.train.out) / f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}"
    check_output_folder(folder, "--out" if out_dir else "train.out")
    settings = {"config": config, "overrides": overrides, "preset": preset}
    result = run_comparison(cfg, entries, seeds=parse_seeds(seeds, cfg.train.seed), out=folder,
                            match_params=match_params, console=out, settings=settings)
    out.print(f"[bold green]done[/]: {result.trained} run(s) trained, {len(result.runs) - result.trained} "
              f"already finished; wrote {', '.join(str(p) for p in result.files)}")


def _rebuild(out_dir: str | None, **given: object) -> None:
    """``--rebuild``: the tables of the comparison in ``--out`` written again; every training option refused."""
    from charlm.tools.compare.rebuild import rebuild
    from charlm.util.errors import CharlmError

    if out_dir is None:
        raise CharlmError("--rebuild needs --out: the folder of the comparison whose tables to write again")
    extra = next((name for name, value in given.items() if value not in (None, False, [])), None)
    if extra is not None:
        flag = "--" + extra.rstrip("_").replace("_", "-")
        raise CharlmError(f"--rebuild trains nothing and keeps the comparison's own settings; leave out {flag}")
    _, files = rebuild(Path(out_dir), console=out)
    out.print(f"[bold green]rebuilt[/]: wrote {', '.join(str(p) for p in files)}")
