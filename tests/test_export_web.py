"""`charlm export --format web` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium opens the page from ``file://``. Every cell's page against the model's own logits, the page's
greedy text equal to `charlm sample --temperature 0` and its log-probability to `charlm eval`'s, typed into the
form and streamed, with no network request; its draws as charlm's `pick` weighs them; its float16 decoder; the
default model's page size; and the refusals.

The browser tests are skipped only where the browser is missing and ``$CI`` is not set; under CI a missing browser
fails (``.ci/run`` installs it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CHROMIUM_OPTIONS, invoke, shakespeare_text, write_model_checkpoint
from typer.testing import CliRunner

from charlm.cells.registry import cell_names
from charlm.cli import app
from charlm.config import Config, ModelConfig, load_config
from charlm.data.vocab import Vocab
from charlm.generation.options import filtered_probs
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import load_model
from charlm.native.build import cpp_off
from charlm.tools.export.web import NOT_ON_PAGE, export_page, render_page, web_cells
from charlm.util.errors import CharlmError

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def driver(browser: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile and its performance (network) log on; the driver
    is Debian's, so Selenium Manager downloads nothing."""
    options = webdriver.ChromeOptions()
    options.binary_location = browser[0]
    for flag in [*CHROMIUM_OPTIONS, f"--user-data-dir={tmp_path_factory.mktemp('profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(browser[1]))
    try:
        yield chrome
    finally:
        chrome.quit()


def open_page(driver: Any, page: Path) -> None:
    """Load the page from its file and wait until its model is read."""
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.state") != "loading")
    state = driver.execute_script("return document.body.dataset.state")
    assert state == "ready", driver.find_element(By.ID, "error").text


def perturbed_model(vocab: Vocab, **model: Any) -> CharLM:
    """A small model whose every weight counts (peepholes and fgr's gate recurrence start at zero)."""
    torch.manual_seed(0)
    net = CharLM(len(vocab), ModelConfig(embedding_size=8, hidden_size=12, num_layers=2, **model))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    return net.eval()


def test_every_cell_runs_in_the_page_or_is_refused(driver: Any, tmp_path: Path) -> None:
    """Each cell's page, from a zero state over 6 characters, gives the model's own logits (the sequence path:
    kernels and torch RNN ops), with and without LayerNorm, tied and untied; lstm-bn and the cells of 2024 are
    refused in one sentence."""
    vocab = Vocab("abcdefg")
    ids = [0, 3, 6, 1, 1, 5]
    variants = [{"cell": name, "layer_norm": ln, "tie_weights": tie} for name in cell_names()
                for ln, tie in ((False, True), (True, False))]
    variants += [{"cell": "mogrifier", "mogrifier_rank": 2}, {"cell": "mogrifier", "mogrifier_rounds": 0}]
    for variant in variants:
        model = perturbed_model(vocab, **variant)
        page = tmp_path / f"{'-'.join(map(str, variant.values()))}.html"
        if variant["cell"] in NOT_ON_PAGE:
            with pytest.raises(CharlmError) as caught:
                export_page(model, vocab, Config(model=model.config), page, weights="float32")
            assert str(caught.value) == (f"cell {variant['cell']} cannot be exported to a web page: "
                                         f"{NOT_ON_PAGE[variant['cell']]}; the page runs {', '.join(web_cells())}")
            assert not page.exists()
            continue
        export_page(model, vocab, Config(model=model.config), page, weights="float32")
        open_page(driver, page)
        got = np.array(driver.execute_script(f"return window.charlm.logits({ids})"))
        with torch.no_grad(), cpp_off():  # lstm-ln: its Python kernel, not a C++ build (compared with it elsewhere)
            expected = model(torch.tensor([ids])).logits[0].double().numpy()
        assert np.abs(got - expected).max() < 1e-5, variant
    refused = {"lstm-bn", "mingru", "minlstm", "slstm"}
    assert set(NOT_ON_PAGE) == refused and web_cells() == [c for c in cell_names() if c not in refused]

    # float16: the same page at about half the size, its logits near the float32 model's
    model = perturbed_model(vocab, cell="peephole")
    half = export_page(model, vocab, Config(model=model.config), tmp_path / "half.html")
    full = tmp_path / "peephole-False-True.html"
    open_page(driver, half)
    got = np.array(driver.execute_script(f"return window.charlm.logits({ids})"))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert 1e-5 < np.abs(got - expected).max() < 1e-2
    assert driver.execute_script("return window.charlm.meta.weights.dtype") == "float16"
    assert len(weights_blob(half)) < 0.6 * len(weights_blob(full))


def weights_blob(page: Path) -> str:
    """The base64 of the page's weights."""
    return page.read_text(encoding="utf-8").split('id="charlm-weights">', 1)[1].split("</script>", 1)[0]


def network_requests(driver: Any) -> list[str]:
    """The URL of every request the page made since the log was last read (Chromium's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_page_writes_what_charlm_sample_writes(driver: Any, trained_run: Path, sharp_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    """Typed into the form: the greedy text equals `charlm sample --temperature 0`'s; from the page's functions the
    same for a sharper model, and the log-probability of a fixed text equals `charlm eval`'s; nothing is fetched."""
    for ckpt, prime in ((trained_run / "best.ckpt", "ROMEO:\nGood morrow"), (sharp_checkpoint, "Ay, é")):
        page = tmp_path / f"{ckpt.stem}.html"
        code, output = invoke("export", str(ckpt), "--format", "web", "--weights", "float32", "--out", str(page))
        assert code == 0, output
        sampled = runner.invoke(app, ["sample", "--checkpoint", str(ckpt), "--prime", prime, "--length", "300",
                                      "--temperature", "0"])
        assert sampled.exit_code == 0, sampled.output
        expected = sampled.output.removesuffix("\n")
        network_requests(driver)  # empty the log
        open_page(driver, page)
        greedy = driver.execute_script("return window.charlm.generate(arguments[0], 300, {temperature: 0})", prime)
        assert prime + greedy == expected

        # the sharp model is chaotic (its weights x 4): float32 and float64 part after some 300 characters
        text = tmp_path / "fixed.txt"
        text.write_text(shakespeare_text(21_000)[20_000:] if ckpt != sharp_checkpoint else
                        shakespeare_text(20_200)[20_000:] + "é", encoding="utf-8")
        code, output = invoke("eval", "--checkpoint", str(ckpt), "--text", str(text), "--batch-size", "1", "--json")
        assert code == 0, output
        scored = driver.execute_script("return window.charlm.logprob(arguments[0])", text.read_text(encoding="utf-8"))
        evaluated = json.loads(output)
        assert scored["chars"] == evaluated["chars"]
        assert abs(scored["loss"] - evaluated["loss"]) < 1e-4
        assert abs(scored["logprob"] + evaluated["loss"] * evaluated["chars"]) < 1e-3 * evaluated["chars"]

        if ckpt == sharp_checkpoint:  # the form: type, click, watch it arrive
            form_writes_the_same(driver, prime, expected, tmp_path)
        assert [url for url in network_requests(driver) if not url.startswith("file://")] == []
        source = page.read_text(encoding="utf-8")  # outside the weights' base64, which may hold "http" by chance
        assert "http" not in source.replace(weights_blob(page), "")


def form_writes_the_same(driver: Any, prime: str, expected: str, tmp_path: Path) -> None:
    def field(name: str, value: str) -> None:
        box = driver.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)

    wait = WebDriverWait(driver, 30)
    field("prime", prime)
    field("temperature", "0")
    field("length", "300")
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
    assert driver.find_element(By.ID, "output").text == expected
    assert driver.find_element(By.ID, "status").text.startswith("done: 300 characters in ")

    field("temperature", "0.8")
    field("length", "1000000")  # writes until Stop
    field("seed", "3")
    driver.find_element(By.ID, "generate").click()
    seen: list[int] = []  # characters on the page, observed while they arrive
    deadline = time.monotonic() + 20
    while len(set(seen)) < 4 and time.monotonic() < deadline:
        seen.append(len(driver.execute_script("return document.getElementById('written').textContent")))
        time.sleep(0.05)
    assert len(set(seen)) >= 4 and seen == sorted(seen), seen
    driver.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.execute_script("return document.body.dataset.state") == "stopped")
    written = driver.execute_script("return document.getElementById('written').textContent")
    assert written == driver.execute_script(
        "return window.charlm.generate(arguments[0], arguments[1], {temperature: 0.8, seed: 3})", prime, len(written))
    driver.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    field("prime", "ROMEO: ☃")
    driver.find_element(By.ID, "generate").click()
    error = driver.find_element(By.ID, "error")
    WebDriverWait(driver, 10).until(lambda d: error.is_displayed())
    assert error.text.startswith("the prime has 1 character(s) outside the model's ") and '"☃" (1x)' in error.text
    field("prime", "ROMEO:")
    field("top-p", "2")
    driver.find_element(By.ID, "generate").click()
    assert error.text == 'top-p must be a number above 0 and at most 1 (or empty: off), got "2"'


def test_the_page_draws_as_charlm_pick_weighs(driver: Any, sharp_checkpoint: Path, tmp_path: Path) -> None:
    """The page's draw weights equal `filtered_probs` (temperature, top-k with ties, top-p); its float16 table
    equals numpy's; a seed repeats its text."""
    page = export_page(*_loaded(sharp_checkpoint), tmp_path / "sharp.html", weights="float32")
    open_page(driver, page)
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5, -1.0, 3.0, 1.0, -2.0]])
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 3, None), (1.3, None, 0.6), (0.5, 2, 0.9),
                                      (2.0, 4, 0.3)):
        got = driver.execute_script("return window.charlm.probabilities(arguments[0], arguments[1], arguments[2], "
                                    "arguments[3])", logits[0].tolist(), temperature, top_k, top_p)
        expected = filtered_probs(logits, temperature, top_k, top_p)[0].double()  # float32, as pick draws
        assert got == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6), (temperature, top_k, top_p)
    # every float16 bit pattern as model.js decodes it (infinities and NaN as text: JSON has no such numbers)
    half = driver.execute_script("return Array.from(charlmHalfTable(), (v) => Number.isFinite(v) ? v : String(v))")
    numpy_half = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float64)
    assert [float(v) for v in half] == pytest.approx(numpy_half.tolist(), abs=0, rel=0, nan_ok=True)
    signs = driver.execute_script("return Array.from(charlmHalfTable(), (v) => Math.sign(1 / v) || 0)")
    assert signs[0x8000] == -1 and signs[0] == 1  # -0 and +0 kept apart
    runs = [driver.execute_script("return window.charlm.generate('ROMEO:', 200, {temperature: 1, seed: arguments[0]})",
                                  seed) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2] and len(runs[0]) == 200
    assert driver.execute_script("return window.charlm.generate('ROMEO:', 100, {temperature: 1, topK: 1, seed: 9})") \
        == driver.execute_script("return window.charlm.generate('ROMEO:', 100, {temperature: 0})")


def _loaded(ckpt: Path) -> tuple[CharLM, Vocab, Config]:
    model, vocab, cfg, _ = load_model(ckpt)
    return model, vocab, cfg


def test_the_default_models_page_fits_in_6_mb() -> None:
    cfg = load_config("default")
    vocab = Vocab.from_text(shakespeare_text())
    torch.manual_seed(0)
    model = CharLM(len(vocab), cfg.model).eval()
    size = len(render_page(model, vocab, cfg).encode("utf-8"))
    assert len(vocab) == 65 and size <= 6_000_000, size


def test_export_web_refusals_write_nothing(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    page = tmp_path / "page.html"
    page.write_text("mine")
    assert invoke("export", ckpt, "--format", "web", "--out", str(page)) == (
        2, f"error: --out {page} already exists; choose another file name, or add --force to replace it")
    assert page.read_text() == "mine"
    assert invoke("export", ckpt, "--format", "web", "--out", str(tmp_path)) == (
        2, f"error: --out {tmp_path} is a folder; give the name of the file to write (e.g. {tmp_path / 'model.html'})")
    assert invoke("export", ckpt, "--format", "web", "--weights", "float8", "--out", str(tmp_path / "x.html")) == (
        2, "error: --weights must be one of float16, float32, got 'float8'")
    assert invoke("export", ckpt, "--format", "onnx", "--weights", "float32") == (
        2, "error: --weights goes with --format web, not onnx; drop it")
    bn = write_model_checkpoint(tmp_path / "bn.ckpt", shakespeare_text(), cell="lstm-bn")
    code, output = invoke("export", str(bn), "--format", "web", "--out", str(tmp_path / "bn.html"))
    assert (code, output) == (2, f"error: cell lstm-bn cannot be exported to a web page: {NOT_ON_PAGE['lstm-bn']}; "
                                 f"the page runs {', '.join(web_cells())}")
    assert invoke("export", ckpt, "--format", "web", "--out", str(page), "--force")[0] == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.ckpt", "page.html"]  # nothing else, no temporary file
