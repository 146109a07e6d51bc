"""``charlm export``: one step of a checkpoint's model as an ONNX graph, plus the JSON that drives it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from charlm.commands.common import checkpoint_path, friendly, out
from charlm.util.errors import CharlmError


@friendly
def export(
    checkpoint: Annotated[str | None, typer.Argument(
        help="Checkpoint (default: newest run's best).", show_default=False)] = None,
    format_: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    out_dir: Annotated[str | None, typer.Option(
        "--out", help="Folder for model.onnx and model.json (default: onnx/ beside the checkpoint).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="Replace model.onnx / model.json in a folder that has files.")] = False,
) -> None:
    """Export one step of the model (token and state in, logits and state out) for use without PyTorch."""
    from charlm.tools.export.onnx import FORMATS, require_onnx

    if format_ not in FORMATS:
        raise CharlmError(f"--format must be one of {', '.join(FORMATS)}, got '{format_}'")
    require_onnx()  # before the slow load
    if out_dir is not None:
        from charlm.util.atomic import check_output_folder

        check_output_folder(out_dir, "--out")
    from charlm.evaluation.scoring import nonfinite_parameters
    from charlm.model.checkpoint import load_model
    from charlm.tools.export.onnx import check_exportable, export_model

    path = checkpoint_path(checkpoint, option="the checkpoint argument")
    model, vocab, cfg, _ = load_model(path)
    check_exportable(cfg.model.cell)
    bad = nonfinite_parameters(model)
    if bad:
        raise CharlmError(f"checkpoint {path} has weights that are NaN or inf ({len(bad)} tensor(s), e.g. {bad[0]}), "
                          "so it cannot be exported; use an earlier checkpoint of that run or retrain")
    folder = Path(out_dir) if out_dir is not None else path.parent / "onnx"
    written = export_model(model, vocab, cfg, folder, force=force)
    for file in written:
        out.print(escape(str(file)), highlight=False, soft_wrap=True)
