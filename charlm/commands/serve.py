"""``charlm serve``: a local web page to generate text from checkpoints and watch it stream in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from charlm.commands.common import err, friendly, out
from charlm.util.errors import CharlmError

NEEDS_EXTRA = 'charlm serve needs FastAPI and uvicorn, which are not installed: pip install "charlm[serve]"'


@friendly
def serve(
    checkpoint: Annotated[list[str] | None, typer.Option(metavar="FILE",
        help="A checkpoint to offer, a .ckpt file or an exported safetensors folder (repeatable); the page switches "
             "between them.")] = None,
    runs: Annotated[str | None, typer.Option(metavar="FOLDER",
        help="Offer every <runs>/<run>/best.ckpt (default, without --checkpoint: checkpoints/).")] = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on; anything but loopback makes the page reachable from the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 8000,
    max_prime: Annotated[int, typer.Option(help="Longest prime a request may send, in characters.")] = 1000,
    max_length: Annotated[int, typer.Option(help="Most characters one request may generate.")] = 5000,
    max_generations: Annotated[int, typer.Option(
        help="Generations running at once; one more is refused with 'busy'.")] = 2,
    cache: Annotated[int, typer.Option(help="Loaded models kept in memory.")] = 2,
) -> None:
    """A local web page: type a prime and watch the text stream in, coloured by surprisal.

    The page sets temperature, top-k, top-p and length, and switches between the checkpoints offered."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CharlmError(NEEDS_EXTRA) from None
    from charlm.tools.serve.app import create_app
    from charlm.tools.serve.registry import Registry
    from charlm.tools.serve.requests import Limits
    from charlm.tools.serve.server import bind, is_loopback, make_server, url_of
    from charlm.util.threads import fast_cpu_math

    for name, value in (("--max-prime", max_prime), ("--max-length", max_length)):
        if value < 1:
            raise CharlmError(f"{name} must be at least 1, got {value}")
    if checkpoint and runs:
        raise CharlmError("pass either --checkpoint (repeatable) or --runs, not both")
    if checkpoint:
        registry = Registry([Path(p) for p in checkpoint], cache_size=cache)
    else:
        registry = Registry.from_runs(Path(runs or "checkpoints"), cache_size=cache)
    app = create_app(registry, Limits(max_prime, max_length, max_generations))
    sock = bind(host, port)
    fast_cpu_math()
    if not is_loopback(host):
        err.print(f"[bold yellow]warning:[/] listening on {host}: the page and its generations are reachable from "
                  "the network, by anyone who can reach this machine (leave out --host to keep it to this one)",
                  highlight=False, soft_wrap=True)
    listed = ", ".join(e.label for e in registry.entries.values())
    out.print(f"charlm serve: {url_of(sock)}  ({len(registry.entries)} checkpoint(s): {listed}; Ctrl-C stops)",
              highlight=False, soft_wrap=True)
    make_server(app).run(sockets=[sock])
