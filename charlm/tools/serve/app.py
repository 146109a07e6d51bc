"""The web app: the page, what the server offers, and generations streamed as Server-Sent Events.

Routes:

- ``GET /``: the page (``static/index.html``, one file: no script, style or font from anywhere else, and
  a Content-Security-Policy that forbids them);
- ``GET /api/info``: the checkpoints on offer, the limits, the generations running;
- ``GET /api/checkpoints/{id}``: one checkpoint's cell, size and stored validation bpc (loads it);
- ``POST /api/generate``: a JSON request; the answer is ``text/event-stream``: ``start``, one ``char``
  event per generated character (with its surprisal and the top-5 there), then ``done`` or ``error``.

Every refusal is HTTP 4xx (503 when busy) with ``{"error": "<one sentence>"}``, which the page shows.
Each generation runs in a thread of its own (the event loop only forwards its characters), holds one of
``Limits.max_generations`` slots, and stops at the next character once its client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from charlm import __version__
from charlm.tools.serve.registry import Loaded, Registry
from charlm.tools.serve.requests import MAX_BODY_BYTES, BadRequest, GenerateRequest, Limits, parse_generate
from charlm.tools.serve.scored import generate_scored
from charlm.util.errors import CharlmError

# the page may use only itself: inline style and script, requests to this server, nothing fetched elsewhere
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_END = object()


def page_html() -> str:
    """The page, a package resource (shipped by the wheel: pyproject's package-data), with ``charlm viz``'s
    colour scale put in (``charlm/tools/viz/assets/colour.js``, the one place it lives)."""
    page = resources.files("charlm.tools.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    colour = resources.files("charlm.tools.viz").joinpath("assets", "colour.js").read_text(encoding="utf-8")
    return page.replace("{{colour_js}}", colour)


class Slots:
    """At most ``limit`` generations at once: a slot is taken without waiting, or refused."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise CharlmError(f"--max-generations must be at least 1, got {limit}")
        self.limit, self.running = limit, 0
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.running >= self.limit:
                return False
            self.running += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.running -= 1


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_json(request: Request) -> object:
    """The request body as JSON, refused once it passes ``MAX_BODY_BYTES`` (never read further)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request is larger than {MAX_BODY_BYTES // 1024} KiB; a prime is at most a "
                             "few thousand characters", status=413)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the request is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise BadRequest("the request is JSON nested too deeply; send one object of plain fields") from None


def _generation_thread(loaded: Loaded, req: GenerateRequest, put: Callable[[object], None],
                       stop: threading.Event, slots: Slots) -> None:
    """Generate in this thread, handing each event to ``put``; the slot is given back when it ends."""
    start = time.perf_counter()
    count = 0
    try:
        model = loaded.private_model()
        for scored in generate_scored(model, loaded.vocab, req.prime, req.length, temperature=req.temperature,
                                      top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=stop):
            put(("char", scored.to_json()))
            count += 1
        put(("done", {"chars": count, "seconds": round(time.perf_counter() - start, 3), "stopped": stop.is_set()}))
    except CharlmError as exc:
        put(("error", {"error": str(exc)}))
    except Exception as exc:  # the server stays up whatever happens in one generation; the page is told
        put(("error", {"error": f"the generation failed ({type(exc).__name__}: {exc})"}))
    finally:
        slots.give_back()
        put(_END)


def create_app(registry: Registry, limits: Limits | None = None) -> FastAPI:
    """The app serving ``registry``'s checkpoints within ``limits``."""
    limits = limits or Limits()
    slots = Slots(limits.max_generations)
    app = FastAPI(title="charlm serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.limits, app.state.slots = registry, limits, slots

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(str(exc.detail), exc.status_code)

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.message, exc.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error(f"the server could not answer this request ({type(exc).__name__}: {exc})", 500)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {"version": __version__, "checkpoints": registry.listing(), "running": slots.running,
                "limits": {"max_prime": limits.max_prime, "max_length": limits.max_length,
                           "max_generations": limits.max_generations}}

    async def load(checkpoint_id: str) -> Loaded:
        try:
            registry.entry(checkpoint_id)
        except CharlmError as exc:
            raise BadRequest(str(exc), 404) from None
        try:  # reading a checkpoint takes a while: off the event loop
            return await run_in_threadpool(registry.get, checkpoint_id)
        except CharlmError as exc:
            raise BadRequest(str(exc), 500) from None

    @app.get("/api/checkpoints/{checkpoint_id}")
    async def checkpoint(checkpoint_id: str) -> dict[str, Any]:
        return (await load(checkpoint_id)).summary

    @app.post("/api/generate")
    async def generate(request: Request) -> StreamingResponse:
        req = parse_generate(await read_json(request), limits)
        loaded = await load(req.checkpoint)
        unknown = loaded.vocab.describe_unknown(req.prime, "the prime")
        if unknown:
            raise BadRequest(f"{unknown}; {loaded.summary['label']} knows only the characters it was trained on",
                             422)
        if not slots.try_take():
            raise BadRequest(f"the server is busy: {limits.max_generations} generation(s) are running, the most it "
                             "runs at once (charlm serve --max-generations); try again when one ends", 503)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                stop.set()

        thread = threading.Thread(target=_generation_thread, args=(loaded, req, put, stop, slots),
                                  name="charlm-generation", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            slots.give_back()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                yield sse("start", {"checkpoint": req.checkpoint, "prime": req.prime, "length": req.length})
                while True:
                    items = [await queue.get()]
                    with contextlib.suppress(asyncio.QueueEmpty):  # whatever else is ready goes in one write
                        while len(items) < 256:
                            items.append(queue.get_nowait())
                    done = _END in items
                    yield "".join(sse(*item) for item in items if item is not _END)  # type: ignore[misc]
                    if done:
                        return
            finally:
                stop.set()  # the client went away (or the stream ended): the thread stops at its next character

        # also run when the client disconnects (Starlette calls it after cancelling the stream)
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(stop.set),
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app
