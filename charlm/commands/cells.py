"""``charlm cells``: the recurrent cells, one line each."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from charlm.commands.common import out


def cells() -> None:
    """The recurrent cells, one line each."""
    from charlm.cells.registry import describe_cells

    table = Table("cell", "what it computes")
    for name, summary in describe_cells():
        table.add_row(name, escape(summary))
    out.print(table)
