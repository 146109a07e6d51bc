"""The page of ``charlm export --format web`` in Chromium: its size, and how fast it writes.

    python -m benchmarks.web_page --out benchmarks/results/web-page.md

The model is a random-init model of the default config (LSTM 2x384, tied embedding, 65 characters; the speed
does not depend on the weights' values), saved as a checkpoint the way ``tests/conftest.py``'s
``write_model_checkpoint`` saves one and exported with ``charlm export --format web``, float16 and float32.
Headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through Selenium) opens each page from
``file://``. Two speeds per page: ``window.charlm.benchmark(n)``, n greedy steps of the model and the pick alone
(the median of ``--repeats``, after a warm-up), and the rate the page's own status bar shows after writing
``--length`` characters at temperature 0.8 from the form (drawing on the page included).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from charlm.config import load_config
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM, count_parameters
from charlm.model.checkpoint import FORMAT_VERSION

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,860")
VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65 characters


def default_checkpoint(path: Path) -> Path:
    cfg = load_config("default")
    vocab = Vocab(VOCAB)
    torch.manual_seed(0)
    net = CharLM(len(vocab), cfg.model)
    torch.save({"hyper_parameters": {"config": cfg.to_dict(), "vocab": vocab.chars, "format_version": FORMAT_VERSION},
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, path)
    print(f"default model: {count_parameters(net):,} parameters", file=sys.stderr)
    return path


def cpu() -> tuple[str, str]:
    """The CPU's model name and the vector extensions among its flags."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    vector = sorted(f for f in (flags[1].split() if flags else []) if f.startswith(("avx", "fma", "sse4")))
    return (name[1] if name else platform.processor()), " ".join(vector)


def measure(page: Path, steps: int, repeats: int, length: int) -> tuple[float, float, str]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.get(page.resolve().as_uri())
        WebDriverWait(driver, 120).until(lambda d: d.execute_script("return document.body.dataset.state") == "ready")
        driver.execute_script(f"return window.charlm.benchmark({max(steps // 4, 50)})")  # warm-up: the JIT
        rates = [driver.execute_script(f"return window.charlm.benchmark({steps})") for _ in range(repeats)]
        for name, value in (("temperature", "0.8"), ("length", str(length)), ("seed", "1")):
            box = driver.find_element(By.ID, name)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 600).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
        shown = driver.find_element(By.ID, "speed").text  # "1,234 characters/s"
        version = driver.capabilities.get("browserVersion", "?")
    finally:
        driver.quit()
    return statistics.median(rates), float(shown.split()[0].replace(",", "")), version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="greedy steps per benchmark() call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=5000, help="characters the form writes")
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = default_checkpoint(Path(tmp) / "default.ckpt")
        for weights in ("float16", "float32"):
            page = Path(tmp) / f"default-{weights}.html"
            subprocess.run([sys.executable, "-m", "charlm", "export", str(ckpt), "--format", "web", "--weights",
                            weights, "--out", str(page)], check=True, capture_output=True)
            step_rate, shown, version = measure(page, args.steps, args.repeats, args.length)
            rows.append((weights, page.stat().st_size, step_rate, shown))
    load_after = os.getloadavg()[0]
    name, flags = cpu()
    lines = [
        "# The web page of `charlm export --format web`: size and speed in Chromium",
        "",
        f"Machine: `{name}` ({flags}), {os.cpu_count()} CPUs, shared with other work (load average "
        f"{load_before:.1f} before, {load_after:.1f} after). Chromium {version} (headless, Debian's build), torch "
        f"{torch.__version__}. {datetime.date.today().isoformat()}.",
        "",
        f"Command: `python -m benchmarks.web_page --steps {args.steps} --repeats {args.repeats} --length "
        f"{args.length}`. The default model (LSTM 2x384, tied embedding 384, 65 characters, 2,390,465 parameters), "
        "random init.",
        "",
        "| weights | page size (bytes) | model steps alone (chars/s, median) | writing from the form (chars/s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {w} | {size:,} | {rate:,.0f} | {shown:,.0f} |" for w, size, rate, shown in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
