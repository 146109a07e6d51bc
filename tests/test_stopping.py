"""Ctrl-C and SIGTERM stop a run cleanly: the step finishes (and its validation), last.ckpt is saved, the
resume command is printed, the exit code is the signal's."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import invoke_as_printed as invoke
from conftest import shakespeare_text

from charlm.config import load_config
from charlm.model.checkpoint import safe_load
from charlm.training.fit import train
from charlm.util.errors import TrainingInterrupted


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(shakespeare_text(6000), encoding="utf-8")  # 22 training windows per epoch
    return path


@pytest.mark.parametrize(("signum", "code", "what"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_last_checkpoint_and_says_how_to_resume(tmp_path: Path, short_corpus: Path, signum: int,
                                                               code: int, what: str) -> None:
    """Ctrl-C, or SIGTERM (what `kill` and job schedulers send), stops the run after the step under way with
    last.ckpt saved, the resume command printed and the signal's exit code."""
    out = tmp_path / "runs"
    last = out / "int" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charlm", "train", "--config", "smoke", "--data", str(short_corpus), "--out", str(out),
         "--name", "int", "--max-steps", "1000000", "--set", "sample.enabled=false", "--set", "train.threads=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no checkpoint"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 10
    message = " ".join(stderr.split())
    command = f"charlm train --resume {shlex.quote(str(last.resolve()))}"
    assert f"{what}: finishing this step, then saving last.ckpt and stopping" in message
    assert f"stopped: training interrupted by {what} at step {step}; saved {last}. Resume with: {command}" \
        in message
    # the command it printed works (here with a near step limit)
    code, output = invoke(*shlex.split(command)[1:], "--max-steps", str(step + 3))
    assert code == 0, output
    assert torch.load(last, weights_only=True)["global_step"] == step + 3


class SignalDuring(L.Callback):
    """Sends ``signum`` to this process while the training step that ends at ``step`` runs."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_a_signal_at_a_validation_step_stops_after_that_validation(tmp_path: Path, short_corpus: Path) -> None:
    """SIGTERM during step 20, which a validation follows: the validation runs, then last.ckpt is saved
    holding it (best score included), then the run stops."""
    config = load_config("smoke", [f"data.path={short_corpus}", "sample.enabled=false"])
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as caught:
        train(config, run_dir=run, callbacks=[SignalDuring(20, signal.SIGTERM)])
    assert caught.value.exit_code == 143
    assert str(caught.value).startswith(f"training interrupted by SIGTERM at step 20; saved {run / 'last.ckpt'}.")
    logged = [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader((run / "metrics.csv").open())
              if r.get("val_loss")]
    assert [step for step, _ in logged] == [19]  # the validation after step 20
    ckpt = safe_load(run / "last.ckpt")
    assert ckpt["global_step"] == 20
    best_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert float(best_state["best_model_score"]) == pytest.approx(logged[0][1], abs=1e-6)
    assert safe_load(run / "best.ckpt")["global_step"] == 20
