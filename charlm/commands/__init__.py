"""The ``charlm`` commands, one module each; ``charlm.cli`` gathers them into one Typer app."""
