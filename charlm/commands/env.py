"""``charlm env``: the versions, machine and build facts a bug report needs, as a table or ``--json``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from charlm.commands.common import friendly, out, stdout_may_close


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return "; ".join(_shown(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_shown(v)}" for k, v in value.items())
    return str(value)


@friendly
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    with_torch: Annotated[bool, typer.Option(
        "--torch", help="Also what torch reports: its CPU capability, threads, CUDA and GPUs, oneDNN, and whether "
                        "the C++ kernels are built here (loads torch: a few seconds).")] = False,
) -> None:
    """The machine and the install, for a bug report: versions, OS, CPU features, GPUs, C++ libraries.

    Answers at once, without loading torch; --torch adds what torch itself reports. Paste the output of
    `charlm env --torch` (or --json) into a bug report."""
    from charlm.tools.env import environment

    facts = environment(with_torch)
    with stdout_may_close():
        if as_json:
            print(json.dumps(facts, indent=1))
            return
        table = Table(title="charlm env", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for section, values in facts.items():
            table.add_section()
            for key, value in values.items():
                table.add_row(f"{section}.{key}", _shown(value))
        out.print(table)
