"""charlm viz: the feature extractors on known strings, find_units on a planted unit, and the page the command
writes (self-contained, holding the trace's values, the find-units table), in a real browser too."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import shakespeare_text
from typer.testing import CliRunner

from charlm.cli import app
from charlm.model.checkpoint import load_model
from charlm.tools.viz.features import find_units, text_features
from charlm.tools.viz.page import embed_json
from charlm.tools.viz.trace import LayerTrace, Trace, trace

runner = CliRunner()


def test_feature_extractors_on_a_known_string() -> None:
    text = 'A "b (c" d).\nKING LEAR:\nNo? x'
    f = {k: v.tolist() for k, v in text_features(text).items()}
    assert f["in_quotes"] == [0, 0, 1, 1, 1, 1, 1, 0] + [0] * (len(text) - 8)
    #                      A  _  "  b  _  (  c  "  _  d  )  .
    assert f["in_brackets"][:12] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert f["line_position"][:14] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 1]
    speaker = [0.0] * 13 + [1.0] * len("KING LEAR:") + [0.0] * (1 + len("No? x"))
    assert f["speaker_name"] == speaker
    assert f["sentence_end"] == [0.0] * 11 + [1, 1] + [0] * 11 + [0, 0, 1, 1, 0]


def test_find_units_finds_a_planted_unit() -> None:
    """A unit equal to the quote feature plus a little noise is found first, with r near 1; a constant unit
    is never listed; features absent from the text are reported absent."""
    text = 'he said "go home" and "stay" then left\n' * 6
    T = len(text)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(T, 8, generator=gen)
    quotes = text_features(text)["in_quotes"].float()
    h[:, 5] = quotes + 0.05 * torch.randn(T, generator=gen)
    h[:, 2] = 0.3  # constant: no correlation
    tr = Trace(text, "rnn", [LayerTrace(h, None, {})], torch.zeros(T), torch.zeros(T, 5, dtype=torch.long),
               torch.zeros(T, 5))
    found = {f.name: f for f in find_units(tr, top=3)}
    best = found["in_quotes"].best[0]
    assert (best.quantity, best.layer, best.unit) == ("h", 1, 5) and best.r > 0.98
    assert not found["in_brackets"].present and found["in_brackets"].best == []
    assert not found["speaker_name"].present
    for f in found.values():
        assert all(-1.0 <= u.r <= 1.0 and u.unit != 2 for u in f.best)


def test_embedded_json_cannot_end_the_script_or_hold_a_url() -> None:
    raw = embed_json({"text": "</script><!-- see http://example.org & https://x"})
    assert "</script" not in raw and "http://" not in raw and "https://" not in raw and "<" not in raw
    assert json.loads(raw) == {"text": "</script><!-- see http://example.org & https://x"}


def _page_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="charlm-data">(.*?)</script>', html, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_viz_writes_a_self_contained_page_with_the_values(trained_run: Path, tmp_path: Path) -> None:
    text = shakespeare_text(300)
    src = tmp_path / "passage.txt"
    src.write_text(text, encoding="utf-8")
    page = tmp_path / "page.html"
    ckpt = trained_run / "best.ckpt"
    result = runner.invoke(app, ["viz", "--checkpoint", str(ckpt), "--text", str(src), "--out", str(page),
                                 "--find-units", "--json", "--top", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [f["name"] for f in report["features"]] == list(text_features(text))
    for f in report["features"]:
        assert set(f) == {"name", "description", "present", "best"}
        assert len(f["best"]) == (3 if f["present"] else 0)
        for u in f["best"]:
            assert set(u) == {"quantity", "layer", "unit", "r"} and -1.0 <= u["r"] <= 1.0
    html = page.read_text(encoding="utf-8")
    for banned in ("http://", "https://", "//cdn", "<link", "src="):
        assert banned not in html
    data = _page_data(html)
    assert data["text"] == text
    # the page holds the trace's values: h of layer 2, the surprisal, the top-5
    model, vocab, _, _ = load_model(ckpt)
    tr = trace(model, vocab, text)
    q = data["layers"][1]["quantities"]["h"]
    codes = torch.frombuffer(bytearray(base64.b64decode(q["data"])), dtype=torch.int8).reshape(len(text), -1)
    decoded = codes.double() / 127 * torch.tensor(q["scale"], dtype=torch.float64)
    assert (decoded - tr.layers[1].h.double()).abs().max() <= torch.tensor(q["scale"]).max() / 254 + 1e-6
    assert set(data["layers"][0]["quantities"]) == {"h", "c", "i", "f", "g", "o"}
    assert data["surprisal"][0] is None
    assert data["surprisal"][1:] == pytest.approx(tr.surprisal[1:].tolist(), abs=1e-3)
    assert data["top_ids"][:5] == tr.top_ids[0].tolist()
    assert [f["name"] for f in data["features"]] == [f["name"] for f in report["features"]]


def test_viz_from_a_prime_and_its_limits(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    page = tmp_path / "s.html"
    result = runner.invoke(app, ["viz", "--checkpoint", ckpt, "--prime", "ROMEO:", "--length", "40", "--seed", "1",
                                 "--out", str(page), "--layers", "2", "--quantities", "h,f"])
    assert result.exit_code == 0, result.output
    data = _page_data(page.read_text(encoding="utf-8"))
    assert data["text"].startswith("ROMEO:") and len(data["text"]) == 46
    assert [(entry["number"], sorted(entry["quantities"])) for entry in data["layers"]] == [(2, ["f", "h"])]
    cases = [
        (["--length", "30000"], "--prime plus --length has 30,006 characters, more than the limit of 20,000"),
        (["--layers", "3"], "--layers must be numbers from 1 to 2"),
        (["--quantities", "h,z"], "--quantities: lstm has no z; it offers c, f, g, h, i, o"),
        (["--prime", "ROMEO\u00e9"], "--prime has 1 character(s) outside the model's 65-character vocabulary"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["viz", "--checkpoint", ckpt, "--prime", "ROMEO:", "--out", str(page), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), result.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_page_runs_in_a_real_browser(trained_run: Path, tmp_path: Path) -> None:
    """Headless Chromium loads the page from disk, runs its script (the characters become spans, coloured)
    and the find-units table is there."""
    page = tmp_path / "p.html"
    text = tmp_path / "t.txt"
    text.write_text(shakespeare_text(200), encoding="utf-8")
    result = runner.invoke(app, ["viz", "--checkpoint", str(trained_run / "best.ckpt"), "--text", str(text),
                                 "--out", str(page), "--find-units"])
    assert result.exit_code == 0, result.output
    profile = tmp_path / "profile"
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--dump-dom", f"{page.as_uri()}#q=h&l=1&u=3&p=10"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-ready="1"' in dom
    assert dom.count("data-i=") == 200
    assert "background-color: rgb(" in dom
    assert "Units that track a feature" in dom and "line_position" in dom
    assert "next character, after this one" in dom  # the pinned character's top-5
