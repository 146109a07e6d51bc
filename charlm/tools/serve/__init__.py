"""``charlm serve``: a local web page to generate from checkpoints, the text streamed in as it comes.

- :mod:`charlm.tools.serve.registry`: the checkpoints on offer, loaded on first use, a few kept in memory;
- :mod:`charlm.tools.serve.scored`: one generation, each character with its surprisal and the top-5 there;
- :mod:`charlm.tools.serve.requests`: the limits, and a request read from untrusted JSON;
- :mod:`charlm.tools.serve.app`: the FastAPI app (the page, the API, Server-Sent Events);
- :mod:`charlm.tools.serve.server`: uvicorn on a socket bound here (port 0, the printed URL, a background thread);
- ``static/index.html``: the page, one file with its style and script.

Only :mod:`~charlm.tools.serve.app` and :mod:`~charlm.tools.serve.server` import FastAPI / uvicorn (the ``serve``
extra).
"""
