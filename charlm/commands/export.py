"""``charlm export``: a checkpoint for use without charlm's training stack: one step as an ONNX graph (``onnx``), a
self-contained web page that writes in the browser (``web``), or a Hugging Face-style folder of safetensors weights,
config and model card (``safetensors``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from charlm.commands.common import checkpoint_path, friendly, out
from charlm.util.errors import CharlmError

FORMATS = ("onnx", "web", "safetensors")


@friendly
def export(
    checkpoint: Annotated[str | None, typer.Argument(
        help="Checkpoint: a .ckpt file or an exported safetensors folder (default: newest run's best).",
        show_default=False)] = None,
    format_: Annotated[str, typer.Option("--format", help="Export format: onnx, web or safetensors.")] = "onnx",
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="Where to write: a folder for onnx (default onnx/ beside the checkpoint) and safetensors "
                      "(default safetensors/ beside it), a file for web (default <run>.html beside it).",
        show_default=False)] = None,
    weights: Annotated[str | None, typer.Option(
        help="web: the precision the page stores its weights in, float16 (half the size) or float32 (exact).",
        show_default="float16")] = None,
    title: Annotated[str | None, typer.Option(
        help="web and safetensors: the page's or model card's title (default: the run's name).",
        show_default=False)] = None,
    data: Annotated[str | None, typer.Option(
        help="safetensors: the corpus the run trained on, for the model card's val and test figures (default: the "
             "run's, where it is found).", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        help="Replace what --out holds: the exported files of a folder (anything else in it stays), or the page.")
    ] = False,
) -> None:
    """Export a checkpoint: one step as ONNX, a web page that writes offline, or safetensors with a model card."""
    if format_ not in FORMATS:
        raise CharlmError(f"--format must be one of {', '.join(FORMATS)}, got '{format_}'")
    for flag, value, formats in (("--weights", weights, ("web",)), ("--title", title, ("web", "safetensors")),
                                 ("--data", data, ("safetensors",))):
        if value is not None and format_ not in formats:
            raise CharlmError(f"{flag} goes with --format {' or '.join(formats)}, not {format_}; drop it")
    _require_extra(format_)  # before the slow load
    if format_ == "web":
        from charlm.tools.export.web import WEIGHTS

        if weights is not None and weights not in WEIGHTS:
            raise CharlmError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    if out_dir is not None:  # before the slow load (the export checks again, with the files it writes)
        from charlm.tools.export.staging import check_out_file
        from charlm.util.atomic import check_output_folder

        if format_ == "web":
            check_out_file(Path(out_dir), force)
        else:
            check_output_folder(out_dir, "--out")
    from charlm.evaluation.scoring import nonfinite_parameters
    from charlm.model.checkpoint import load_model

    path = checkpoint_path(checkpoint, option="the checkpoint argument")
    model, vocab, cfg, ckpt = load_model(path)
    _check_cell(format_, cfg.model.cell)
    bad = nonfinite_parameters(model)
    if bad:
        raise CharlmError(f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. {bad[0]}), "
                          "so it cannot be exported; use an earlier checkpoint of that run or retrain")
    run = path.name if path.is_dir() else path.parent.name or path.stem  # the run folder's name, or the folder's
    if format_ == "onnx":
        from charlm.tools.export.onnx import export_model

        written = export_model(model, vocab, cfg, Path(out_dir) if out_dir else path.parent / "onnx", force=force)
    elif format_ == "web":
        from charlm.tools.export.web import export_page

        target = Path(out_dir) if out_dir else path.parent / f"{run}.html"
        written = [export_page(model, vocab, cfg, target, weights=weights or "float16", title=title or run,
                               force=force)]
    else:
        from charlm.tools.export.hub import export_folder
        from charlm.util.threads import fast_cpu_math

        fast_cpu_math()  # as `charlm eval`, whose figures the card repeats
        folder = Path(out_dir) if out_dir else path.parent / "safetensors"
        written = export_folder(model, vocab, cfg, ckpt, folder, name=title or run, data=data, force=force)
    for file in written:
        out.print(f"{escape(str(file))}  ({file.stat().st_size:,} bytes)", highlight=False, soft_wrap=True)


def _require_extra(format_: str) -> None:
    """The one-sentence install hint of a format's missing packages."""
    if format_ == "onnx":
        from charlm.tools.export.onnx import require_onnx

        require_onnx()
    elif format_ == "safetensors":
        from charlm.tools.export.hub import require_safetensors

        require_safetensors()


def _check_cell(format_: str, cell: str) -> None:
    """Refuse, in one sentence, a cell the format cannot hold (both refuse lstm-bn; safetensors holds any)."""
    if format_ == "onnx":
        from charlm.tools.export.onnx import check_exportable

        check_exportable(cell)
    elif format_ == "web":
        from charlm.tools.export.web import check_web_exportable

        check_web_exportable(cell)
