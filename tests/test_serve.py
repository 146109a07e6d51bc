"""``charlm serve``: the page, the API, streamed generations (equal to ``charlm.generation``), refusals that
leave the server up, the bound on concurrent generations and a client that goes away."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from charlm.generation.continuation import generate  # noqa: E402
from charlm.model.char_lm import count_parameters  # noqa: E402
from charlm.model.checkpoint import load_model  # noqa: E402
from charlm.tools.serve.app import create_app  # noqa: E402
from charlm.tools.serve.registry import Registry  # noqa: E402
from charlm.tools.serve.requests import Limits  # noqa: E402
from charlm.tools.serve.server import serve_in_thread  # noqa: E402


def events(text: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a text/event-stream body."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.fixture(scope="module")
def client(trained_run: Path) -> Iterator[httpx.Client]:
    """A client of a real uvicorn server, on a free port of 127.0.0.1, for the whole module."""
    registry = Registry([trained_run / "best.ckpt", trained_run / "last.ckpt"])
    app = create_app(registry, Limits(max_prime=50, max_length=300, max_generations=2))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def stream(client: httpx.Client, **body: object) -> list[tuple[str, dict]]:
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return events(r.text)


def test_page_answers_with_nothing_from_elsewhere(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert 'id="output"' in r.text and "function surprisalColour" in r.text and "function charlmColour" in r.text
    assert "{{colour_js}}" not in r.text
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_info_lists_the_checkpoints_and_their_stored_validation_bpc(client: httpx.Client, trained_run: Path) -> None:
    info = client.get("/api/info").json()
    assert [c["label"] for c in info["checkpoints"]] == ["smoke/best.ckpt", "smoke/last.ckpt"]
    assert info["limits"] == {"max_prime": 50, "max_length": 300, "max_generations": 2}
    m = client.get("/api/checkpoints/0").json()
    model, vocab, config, _ = load_model(trained_run / "best.ckpt")
    assert (m["cell"], m["num_layers"], m["hidden_size"]) == ("lstm", config.model.num_layers, config.model.hidden_size)
    assert (m["parameters"], m["vocab_size"]) == (count_parameters(model), len(vocab))
    with (trained_run / "metrics.csv").open() as f:  # the best validation the run logged
        logged = [float(row["val_bpc"]) for row in csv.DictReader(f) if row.get("val_bpc")]
    assert m["val_bpc"] == pytest.approx(min(logged), rel=1e-5)
    assert client.get("/api/info").json()["checkpoints"][0]["loaded"] is True


def test_streamed_text_is_charlm_sampling_output(client: httpx.Client, trained_run: Path) -> None:
    model, vocab, _, _ = load_model(trained_run / "best.ckpt")
    prime = "ROMEO:\n"
    for settings in ({"temperature": 0}, {"temperature": 0.9, "top_k": 10, "seed": 7}):
        got = stream(client, checkpoint="0", prime=prime, length=120, **settings)
        assert got[0] == ("start", {"checkpoint": "0", "prime": prime, "length": 120})
        assert got[-1][0] == "done" and got[-1][1]["chars"] == 120
        text = "".join(d["c"] for e, d in got if e == "char")
        assert prime + text == generate(model, vocab, prime, 120, **settings)[0]
    # each surprisal is -log2 p of that character under the plain forward pass over the whole text
    chars = [d for e, d in got if e == "char"]
    ids = vocab.encode(prime + text)
    with torch.no_grad():
        logits = model(ids[None, :-1]).logits[0]
    nll = F.cross_entropy(logits, ids[1:], reduction="none")[len(prime) - 1:] / math.log(2)
    assert [d["s"] for d in chars] == pytest.approx(nll.tolist(), abs=2e-3)
    probs = torch.softmax(logits[len(prime) - 1], dim=-1)
    top = probs.topk(5)
    assert chars[0]["top"] == [[vocab.chars[i], pytest.approx(p, abs=1e-4)]
                               for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def test_streamed_top_p_draws_from_the_nucleus(client: httpx.Client) -> None:
    top_p = 0.15  # small: without the nucleus cut, this briefly trained model draws outside it at once
    events_ = stream(client, prime="ROMEO:", length=200, temperature=1.0, top_p=top_p, seed=1)
    got = [d for e, d in events_ if e == "char"]
    assert len(got) == 200
    for d in got:  # at temperature 1 the reported distribution is the one drawn from
        chars = [c for c, _ in d["top"]]
        likelier = [p for _, p in d["top"]][: chars.index(d["c"]) if d["c"] in chars else None]
        assert sum(likelier) < top_p + 1e-3  # the mass of the likelier characters is still short of top-p


BAD = [  # (body, status, the sentence the page shows)
    (b"garbage", 400, "the request is not valid JSON (UTF-8)"),
    (b"[1, 2]", 400, "the request must be a JSON object with a prime and the sampling settings"),
    (b"x" * 70_000, 413, "the request is larger than 64 KiB; a prime is at most a few thousand characters"),
    (b"[" * 60_000, 400, "the request is JSON nested too deeply; send one object of plain fields"),
    (b'{"prime": "\\ud800"}', 400, "the prime is not valid text (it holds a lone UTF-16 surrogate)"),
    ({"prime": ""}, 400, "type a prime: the text the model continues (at least one character)"),
    ({"prime": "a" * 51}, 400, "the prime has 51 characters; this server takes at most 50 (charlm serve --max-prime)"),
    ({"prime": "ROMEO: ¿qué?"}, 422, "the prime has 2 character(s) outside the model's 65-character vocabulary: "
     "'¿' (1x), 'é' (1x); smoke/best.ckpt knows only the characters it was trained on"),
    ({"prime": "a", "length": 0}, 400, "length must be from 1 to 300 characters (charlm serve --max-length), got 0"),
    ({"prime": "a", "length": 10**9}, 400,
     "length must be from 1 to 300 characters (charlm serve --max-length), got 1,000,000,000"),
    ({"prime": "a", "length": 2.5}, 400, "length must be a whole number, got 2.5"),
    ({"prime": "a", "temperature": "warm"}, 400, "temperature must be a number, got 'warm'"),
    (b'{"prime": "a", "temperature": NaN}', 400, "temperature must be a finite number, got nan"),
    ({"prime": "a", "temperature": -1}, 400, "temperature must be from 0 (greedy) to 100, got -1"),
    ({"prime": "a", "top_k": 0}, 400, "top-k must be at least 1 (or empty: every character), got 0"),
    ({"prime": "a", "top_p": 1.5}, 400, "top-p must be above 0 and at most 1 (or empty: no nucleus cut), got 1.5"),
    ({"prime": "a", "seed": -1}, 400,
     "seed must be a whole number from 0 to 4294967295 (or empty: a fresh one), got -1"),
    ({"prime": "a", "checkpoint": "nope"}, 404, "there is no checkpoint 'nope' on this server; it offers 0, 1"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_requests_get_one_sentence_and_the_server_stays_up(client: httpx.Client, body: object, status: int,
                                                               message: str) -> None:
    if isinstance(body, bytes):
        r = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/api/generate", json=body)
    assert (r.status_code, r.json()) == (status, {"error": message})
    got = stream(client, prime="a", length=3, temperature=0)
    assert got[-1] == ("done", {"chars": 3, "seconds": got[-1][1]["seconds"], "stopped": False})


def test_other_bad_paths_answer_json(client: httpx.Client) -> None:
    assert client.get("/api/checkpoints/7").json() == {"error": "there is no checkpoint '7' on this server; "
                                                                "it offers 0, 1"}
    assert client.get("/api/generate").status_code == 405
    assert client.get("/nothing").json() == {"error": "Not Found"}


def test_an_unreadable_checkpoint_is_one_sentence_and_the_others_still_serve(trained_run: Path,
                                                                            tmp_path: Path) -> None:
    bad = tmp_path / "bad" / "best.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    app = create_app(Registry([bad, trained_run / "best.ckpt"]))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        r = http.get("/api/checkpoints/0")
        assert r.status_code == 500
        assert r.json()["error"].startswith(f"{bad} is not a readable checkpoint (truncated, corrupt, or not a "
                                            "checkpoint); refused to load it")
        r = http.post("/api/generate", json={"checkpoint": "1", "prime": "a", "length": 4, "temperature": 0})
        assert r.status_code == 200 and events(r.text)[-1][1]["chars"] == 4


def test_busy_server_answers_503_and_a_client_that_leaves_stops_its_generation(trained_run: Path) -> None:
    registry = Registry([trained_run / "best.ckpt"])
    app = create_app(registry, Limits(max_length=10_000_000, max_generations=1))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        long = {"prime": "a", "length": 10_000_000, "temperature": 1.0}
        with http.stream("POST", "/api/generate", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            while next(lines) != "event: char":  # generating
                pass
            assert http.get("/api/info").json()["running"] == 1
            busy = http.post("/api/generate", json={"prime": "a", "length": 5})
            assert (busy.status_code, busy.json()) == (503, {"error": (
                "the server is busy: 1 generation(s) are running, the most it runs at once (charlm serve "
                "--max-generations); try again when one ends")})
        deadline = time.monotonic() + 10  # the client closed the stream: the generation ends, its slot is free
        while http.get("/api/info").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/api/info").json()["running"] == 0
        r = http.post("/api/generate", json={"prime": "a", "length": 5, "temperature": 0})
        assert r.status_code == 200 and events(r.text)[-1][1]["chars"] == 5


def test_command_listens_where_told_and_says_so(trained_run: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "charlm", "serve", "--runs", str(trained_run.parent),
                             "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("charlm serve: http://0.0.0.0:"), line + proc.stderr.read()
        assert "1 checkpoint(s): smoke/best.ckpt" in line
        warning = proc.stderr.readline()
        assert warning.startswith("warning: listening on 0.0.0.0: the page and its generations are reachable from "
                                  "the network"), warning
        port = line.split("http://0.0.0.0:")[1].split("/")[0]
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/info").json()["checkpoints"][0]["id"] == "0"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_command_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from charlm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--runs", str(tmp_path)])
    assert result.exit_code == 2
    assert f"no checkpoint under {tmp_path}/" in " ".join(result.output.split())
    result = runner.invoke(app, ["serve", "--checkpoint", str(tmp_path / "x.ckpt")])
    assert f"checkpoint {tmp_path / 'x.ckpt'} does not exist" in " ".join(result.output.split())
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert ('charlm serve needs FastAPI and uvicorn, which are not installed: pip install "charlm[serve]"'
            in " ".join(result.output.split()))
