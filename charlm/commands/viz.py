"""``charlm viz``: one self-contained HTML page showing what a checkpoint does at every character of a text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from charlm.commands.common import checkpoint_path, friendly, out, stdout_may_close
from charlm.tools.viz.limits import MAX_CHARS
from charlm.util.errors import CharlmError


def _numbers(value: str | None, option: str) -> set[int] | None:
    if value is None:
        return None
    try:
        picked = {int(v) for v in value.split(",") if v.strip()}
    except ValueError:
        raise CharlmError(f"{option} takes layer numbers separated by commas (e.g. 1,2), got '{value}'") from None
    if not picked:
        raise CharlmError(f"{option} names no layer; give layer numbers separated by commas (e.g. 1,2)")
    return picked


@friendly
def viz(
    checkpoint: Annotated[str | None, typer.Option(
        help="Checkpoint: a .ckpt file or an exported safetensors folder (default: newest run's best).")] = None,
    text: Annotated[str | None, typer.Option(help="Text file to show (default: a sample from --prime).")] = None,
    prime: Annotated[str, typer.Option(help="Without --text: the sample starts with this.",
                                       show_default="a newline")] = "\n",
    length: Annotated[int, typer.Option(help="Without --text: characters to generate after the prime.")] = 500,
    temperature: Annotated[float, typer.Option(help="Without --text: sampling temperature (0 is greedy).")] = 0.8,
    seed: Annotated[int | None, typer.Option(help="Without --text: same seed, same sample.")] = None,
    out_file: Annotated[str, typer.Option("--out", help="The HTML file to write.")] = "viz.html",
    find_units: Annotated[bool, typer.Option(
        "--find-units", help="Score every unit against features of the text; list the best per feature.")] = False,
    top: Annotated[int, typer.Option(help="With --find-units: units listed per feature.")] = 5,
    layers: Annotated[str | None, typer.Option(help="Only these layers (e.g. 1,2; default: all).")] = None,
    quantities: Annotated[str | None, typer.Option(
        help="Only these quantities (e.g. h,c,f; default: all the cell has).")] = None,
    max_chars: Annotated[int, typer.Option(help="Longest text accepted.")] = MAX_CHARS,
    as_json: Annotated[bool, typer.Option("--json", help="Print the --find-units results as JSON.")] = False,
) -> None:
    """A page that colours each character of a text by its surprisal or by any unit of the model.

    Any unit (h, c, a gate) of any layer; hover for the model's top-5 next characters. --find-units lists the
    units that track quotes, brackets, line position, speaker names and sentence ends."""
    from charlm.data.corpus import read_corpus, resolve_corpus_path
    from charlm.generation.continuation import generate
    from charlm.generation.options import check_options
    from charlm.model.checkpoint import load_model
    from charlm.tools.viz.features import find_units as score_units
    from charlm.tools.viz.limits import check_length
    from charlm.tools.viz.page import render
    from charlm.tools.viz.trace import trace
    from charlm.util.atomic import atomic_write_text, check_output_file
    from charlm.util.threads import fast_cpu_math

    check_output_file(out_file, "--out")  # before any work
    if max_chars < 1:
        raise CharlmError(f"--max-chars must be at least 1, got {max_chars}")
    if top < 1:
        raise CharlmError(f"--top must be at least 1, got {top}")
    if text is None:
        check_options(length, temperature, None, prefix="--", seed=seed)
        check_length(prime + "x" * length, max_chars, what="--prime plus --length")
    picked_layers = _numbers(layers, "--layers")
    picked_quantities = None if quantities is None else {q.strip() for q in quantities.split(",") if q.strip()}
    path = checkpoint_path(checkpoint)
    model, vocab, cfg, _ = load_model(path)
    fast_cpu_math()
    if picked_layers is not None and not picked_layers <= set(range(1, cfg.model.num_layers + 1)):
        raise CharlmError(f"--layers must be numbers from 1 to {cfg.model.num_layers} (this model's layers), "
                          f"got {layers}")
    if text is not None:
        corpus = read_corpus(resolve_corpus_path(text, option="--text"), "--text file")
        shown, what, source = corpus.text, f"--text file {corpus.path}", str(corpus.path)
    else:
        vocab.check(prime, what="--prime")
        shown = generate(model, vocab, prime, length, temperature=temperature, seed=seed)[0]
        what, source = "the sample", f"a sample from --prime {prime!r}"
    tr = trace(model, vocab, shown, max_chars=max_chars, what=what)
    offered = {name for layer in tr.layers for name in layer.quantities()}
    if picked_quantities is not None and not picked_quantities <= offered:
        bad = ", ".join(sorted(picked_quantities - offered))
        raise CharlmError(f"--quantities: {cfg.model.cell} has no {bad}; it offers {', '.join(sorted(offered))}")
    units = score_units(tr, top, picked_layers, picked_quantities) if find_units else None
    title = f"charlm viz: {path.name} ({cfg.model.cell} {cfg.model.num_layers}x{cfg.model.hidden_size}) on {source}"
    page = render(tr, vocab.chars, units, title=title, layers=picked_layers, quantities=picked_quantities)
    atomic_write_text(Path(out_file), page)
    with stdout_may_close():
        if units is not None and as_json:
            print(json.dumps({"html": out_file, "chars": len(shown), "features": [asdict(u) for u in units]}))
            return
        if units is not None:
            table = Table(title=f"units that track each feature ({len(shown):,} characters; Pearson r)")
            for col in ("feature", "quantity", "layer", "unit", "r"):
                table.add_column(col, justify="right" if col in ("layer", "unit", "r") else "left")
            for f in units:
                if not f.present:
                    table.add_row(f.name, "[dim]not in this text[/]", "", "", "")
                for i, u in enumerate(f.best):
                    table.add_row(f.name if i == 0 else "", u.quantity, str(u.layer), str(u.unit), f"{u.r:+.3f}")
            out.print(table)
        out.print(f"wrote {escape(out_file)} ({len(shown):,} characters, {len(page):,} bytes)", highlight=False)
