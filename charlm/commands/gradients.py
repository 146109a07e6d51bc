"""``charlm gradients``: the norm of d loss_T / d h_(T-k) against k, per cell, initialisation and clipping."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from charlm.commands.common import err, friendly, out
from charlm.util.errors import CharlmError


def _list(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise CharlmError(f"{option} is empty; give a comma-separated list")
    return items


@friendly
def gradients(
    cells: Annotated[str, typer.Option(
        help="Cells to measure at a fresh init, comma-separated.")] = "rnn,irnn,lstm,gru",
    checkpoint: Annotated[list[str] | None, typer.Option(
        help="Measure this trained checkpoint instead of fresh cells (repeat for several; --cells and --config "
             "are then not used).")] = None,
    config: Annotated[str, typer.Option(help="Config whose model size the fresh cells get.")] = "default",
    data: Annotated[str | None, typer.Option(help="Corpus (default: found as for training).")] = None,
    max_lag: Annotated[int, typer.Option(help="Largest lag K: steps back from the loss.")] = 200,
    sequences: Annotated[int, typer.Option(help="Sequences the norms are averaged over.")] = 16,
    warmup: Annotated[int, typer.Option(help="Characters read first, without gradients.")] = 50,
    init: Annotated[str, typer.Option(
        help="Recurrent initialisations to try, comma-separated: default, orthogonal, identity, xavier.")] = "default",
    clip: Annotated[str, typer.Option(
        help="Per-step clipping of the gradient through h, comma-separated values (0: none).")] = "0",
    seed: Annotated[int, typer.Option(help="Seed of the fresh weights and of the sequences' positions.")] = 0,
    out_dir: Annotated[str, typer.Option("--out", help="Folder for gradients.csv and gradients.png.")] = "gradients",
) -> None:
    """The vanishing / exploding gradient, measured on real text: CSV and log-scale PNG."""
    import torch

    from charlm.cells.registry import cell_registry_names
    from charlm.config import check_seed, load_config
    from charlm.data.corpus import load_corpus
    from charlm.data.datamodule import splits_for
    from charlm.data.vocab import Vocab
    from charlm.model.char_lm import CharLM
    from charlm.model.checkpoint import load_model
    from charlm.tools.gradients.curves import plot_lag_curves, write_csv
    from charlm.tools.gradients.measure import (
        RECURRENT_INITS,
        reinit_recurrent,
        sample_windows,
        state_gradient_norms,
        summarise,
    )
    from charlm.util.atomic import check_output_folder
    from charlm.util.plotting import PlottingUnavailable
    from charlm.util.threads import fast_cpu_math

    check_output_folder(out_dir, "--out")  # before the measurements
    for name, value, low in (("--max-lag", max_lag, 0), ("--sequences", sequences, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise CharlmError(f"{name} must be at least {low}, got {value}")
    if max_lag > 5000:
        raise CharlmError(f"--max-lag must be at most 5,000 (every step is kept in memory), got {max_lag:,}")
    if sequences > 1024:
        raise CharlmError(f"--sequences must be at most 1,024, got {sequences:,}")
    check_seed(seed, "--seed")
    inits = _list(init, "--init")
    for name in inits:
        if name not in RECURRENT_INITS:
            raise CharlmError(f"unknown --init '{name}'; valid: {', '.join(RECURRENT_INITS)}")
    try:
        clips = [float(c) for c in _list(clip, "--clip")]
    except ValueError:
        raise CharlmError(f"--clip takes numbers separated by commas (0: no clipping), got '{clip}'") from None
    if any(not (c >= 0 and c < float("inf")) for c in clips):
        raise CharlmError(f"--clip values must be finite numbers >= 0, got '{clip}'")
    if checkpoint and inits != ["default"]:
        raise CharlmError("--init re-initialises fresh cells; a --checkpoint is measured with its trained weights, "
                          "so leave --init out with --checkpoint")
    fast_cpu_math()
    length = warmup + max_lag + 2
    curves = []
    runs: list[tuple[str, CharLM, Vocab, str, str]] = []  # (source, model, vocab, cell, init)
    if checkpoint:
        for path in checkpoint:
            model, vocab, cfg, _ = load_model(path)
            runs.append((path, model, vocab, cfg.model.cell, "trained"))
        corpus = load_corpus(data if data is not None else cfg.data.path)
    else:
        cfg = load_config(config)
        corpus = load_corpus(data if data is not None else cfg.data.path)
        vocab = Vocab.from_text(corpus.text)
        for cell in cell_registry_names(_list(cells, "--cells"), where="--cells"):
            for name in inits:
                torch.manual_seed(seed)
                model = CharLM(len(vocab), dataclasses.replace(cfg.model, cell=cell))
                reinit_recurrent(model, name)
                runs.append(("init", model, vocab, cell, name))
    for source, model, vocab, cell, name in runs:
        ids = vocab.encode(corpus.text, what=f"corpus {corpus.path}")
        val = splits_for(ids, cfg.data).val
        windows = sample_windows(val if val.numel() >= length else ids, sequences, length, seed)
        for c in clips:
            norms = state_gradient_norms(model, windows, warmup=warmup, clip=c)
            found = summarise(norms, source=source, cell=cell, init=name, clip=c)
            curves.extend(found)
            first, last = found[0].mean[0], found[0].mean[-1]
            out.print(f"{escape(found[0].label)}: layer 1 mean |grad| {first:.3g} at k=0, {last:.3g} at k={max_lag}",
                      highlight=False)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(curves, folder / "gradients.csv")
    out.print(f"wrote {escape(str(folder / 'gradients.csv'))}", highlight=False)
    size = f"{cfg.model.num_layers}x{cfg.model.hidden_size}"
    title = (f"|d loss_T / d h_(T-k)|, {sequences} sequences of {corpus.path.name}"
             + ("" if checkpoint else f", fresh {size} models (config {config}, seed {seed})"))
    try:
        plot_lag_curves(curves, folder / "gradients.png", title=title)
        out.print(f"wrote {escape(str(folder / 'gradients.png'))}", highlight=False)
    except PlottingUnavailable as exc:
        err.print(f"[bold yellow]no plot:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
