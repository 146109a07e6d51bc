"""``charlm train --resume``: a killed run continues exactly where its last checkpoint left it.

A smoke-sized run over a short corpus (22 windows per epoch, so the 40 steps cross an epoch boundary)
with dropout on, one thread, on the CPU is deterministic: a run killed after step 33 (last checkpoint
at step 30, window 8 of epoch 1) and resumed must end with the very same weights and the same logged
training losses as a run that never stopped. That only holds if the optimizer state, the schedule,
the step count, the stream position, the carried hidden state and the random state (dropout masks)
all come back; the negative controls below take one of them out of the checkpoint and show the test
notices.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import shakespeare_text
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config
from charlm.training.fit import train
from charlm.training.resume import resolve_resume

runner = CliRunner()
WINDOWS_PER_EPOCH = 22  # 6,000 chars: 5,400 train chars / 8 streams = 674 columns / bptt 32 -> 22 windows

KILLER = textwrap.dedent('''
    """The charlm CLI, SIGKILL-ing itself right after training step $KILL_AT (a crash, nothing cleaned up),
    or with KILL_IN=validation in the middle of the validation after that step, or with KILL_IN=metrics
    while it writes metrics.csv for the first time, or with KILL_IN=last.ckpt / best.ckpt half-way through
    the $KILL_AT-th write of that checkpoint in this session (half its bytes in the temporary file)."""
    import os
    import signal
    import sys
    from pathlib import Path

    import lightning as L

    from charlm.training import checkpoint_io
    from charlm.training import fit as train_module
    from charlm.util import atomic


    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if os.environ.get("KILL_IN", "train") == "train" and trainer.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if os.environ.get("KILL_IN") == "validation" and trainer.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)


    if os.environ.get("KILL_IN") == "metrics":  # right after metrics.csv's rows are written out, before any close
        import csv

        _writerows = csv.DictWriter.writerows

        def writerows(self, rows):
            _writerows(self, rows)
            os.kill(os.getpid(), signal.SIGKILL)

        csv.DictWriter.writerows = writerows

    if os.environ.get("KILL_IN", "").endswith(".ckpt"):
        _write, writes = checkpoint_io.atomic_write_bytes, []

        def atomic_write_bytes(path, data):
            if Path(path).name == os.environ["KILL_IN"]:
                writes.append(path)
                if len(writes) == int(os.environ["KILL_AT"]):
                    with atomic.atomic_file(path) as fh:
                        fh.write(bytes(data[: len(data) // 2]))
                        fh.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
            _write(path, data)

        checkpoint_io.atomic_write_bytes = atomic_write_bytes

    original = train_module.build_trainer


    def build_trainer(config, run_dir, *, extra_callbacks=None):
        return original(config, run_dir, extra_callbacks=[*(extra_callbacks or []), KillAt()])


    train_module.build_trainer = build_trainer
    from charlm.cli import app

    app(sys.argv[1:], prog_name="charlm")
''')


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(shakespeare_text(6000), encoding="utf-8")
    return path


BASE = ["train.threads=1", "model.dropout=0.2", "model.dropouth=0.2", "sample.enabled=false"]
NTASGD = ["optim.optimizer=ntasgd", "optim.lr=16", "optim.nonmono=1", "train.val_every_steps=4",
          "train.checkpoint_every_steps=11"]


def run_args(corpus: Path, out: Path, name: str, *overrides: str) -> list[str]:
    sets = [arg for key in [*BASE, *overrides] for arg in ("--set", key)]
    return ["train", "--config", "smoke", "--data", str(corpus), "--out", str(out), "--name", name, *sets]


def invoke(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def train_losses(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")}


def val_losses(run: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def kill_run(out: Path, corpus: Path, name: str, kill_at: int, kill_in: str = "train", *overrides: str) -> Path:
    """Run ``name`` under the killer script until it SIGKILLs itself; its folder."""
    killed_command(out, run_args(corpus, out, name, *overrides), kill_at, kill_in)
    return out / name


def killed_command(out: Path, args: list[str], kill_at: int, kill_in: str) -> None:
    """``charlm <args>`` under the killer script (written into ``out``), which must SIGKILL itself."""
    script = out / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KILL_AT": str(kill_at), "KILL_IN": kill_in})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, short_corpus: Path) -> dict[str, Path]:
    """A reference run, and a copy of the same run SIGKILLed after step 33 (its last.ckpt is step 30's)."""
    out = tmp_path_factory.mktemp("killed")
    invoke(run_args(short_corpus, out, "reference"))
    pristine = out / "cut-at-kill"
    shutil.copytree(kill_run(out, short_corpus, "cut", 33), pristine)
    return {"reference": out / "reference", "cut": pristine, "out": out}


def resumed_copy(killed: dict[str, Path], name: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A fresh copy of the killed run, its last.ckpt optionally edited, resumed to the end."""
    run = killed["out"] / name
    shutil.copytree(killed["cut"], run)
    if edit is not None:
        ckpt = torch.load(run / "last.ckpt", weights_only=True)
        edit(ckpt)
        torch.save(ckpt, run / "last.ckpt")
    output = invoke(["train", "--resume", str(run / "last.ckpt")])
    assert f"resuming from {run / 'last.ckpt'}" in output.replace("\n", "")
    return run


def test_killed_run_checkpoint_is_mid_epoch(killed: dict[str, Path]) -> None:
    ckpt = torch.load(killed["cut"] / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "served": 30 - 22}]
    state = ckpt["resume_state"]
    assert state["world_size"] == 1 and state["train_states"] is not None
    assert state["rng"]["torch"].shape[0] == 1


def test_resumed_run_matches_an_uninterrupted_one(killed: dict[str, Path]) -> None:
    run = resumed_copy(killed, "resumed")
    reference = killed["reference"]
    final = torch.load(run / "last.ckpt", weights_only=True)
    assert final["global_step"] == 40
    assert largest_difference(run / "last.ckpt", reference / "last.ckpt") < 1e-6
    ref_opt = torch.load(reference / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    for key, state in final["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], ref_opt[key]["exp_avg_sq"], rtol=0, atol=1e-9)
    # the history before the kill is kept and every logged step's training loss is the same
    expected, got = train_losses(reference), train_losses(run)
    assert sorted(got) == sorted(expected) == [4, 9, 14, 19, 24, 29, 34, 39]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step


def _forget_stream_position(ckpt: dict[str, Any]) -> None:
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def _forget_hidden_state(ckpt: dict[str, Any]) -> None:
    ckpt["resume_state"]["train_states"] = None


def _forget_random_state(ckpt: dict[str, Any]) -> None:
    ckpt["resume_state"]["rng"]["torch"] = torch.Generator().manual_seed(99).get_state().unsqueeze(0)


@pytest.mark.parametrize("forget", [_forget_stream_position, _forget_hidden_state, _forget_random_state],
                         ids=["stream-position", "hidden-state", "random-state"])
def test_the_comparison_notices_a_missing_piece(killed: dict[str, Path],
                                                forget: Callable[[dict[str, Any]], None]) -> None:
    run = resumed_copy(killed, f"without-{forget.__name__}", forget)
    assert largest_difference(run / "last.ckpt", killed["reference"] / "last.ckpt") > 1e-4


def test_a_run_killed_during_a_validation_validates_again_on_resume(killed: dict[str, Path],
                                                                   short_corpus: Path) -> None:
    """SIGKILL in the middle of the validation after step 20 (a checkpoint step too): the resumed run
    validates at step 20, and ends as the run that never stopped (metrics, best.ckpt, weights)."""
    reference = killed["reference"]
    run = kill_run(killed["out"], short_corpus, "cut-in-validation", 20, "validation")
    assert val_losses(run) == []  # killed before the validation was logged
    saved_at = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
    invoke(["train", "--resume", str(run / "last.ckpt")])
    assert val_losses(run) == val_losses(reference) and [s for s, _ in val_losses(run)] == [19, 39]
    assert saved_at == 10  # step 20's last.ckpt waited for its validation, which never ended
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    assert largest_difference(run / "last.ckpt", reference / "last.ckpt") < 1e-6
    assert torch.load(run / "best.ckpt", weights_only=True)["global_step"] == \
        torch.load(reference / "best.ckpt", weights_only=True)["global_step"]


def test_a_kill_while_metrics_csv_is_written_keeps_its_history(killed: dict[str, Path]) -> None:
    """A resumed run rewrites metrics.csv (it drops the rows it logs again): killed in the middle of that
    write, the file still holds the whole history."""
    run = killed["out"] / "killed-writing-metrics"
    shutil.copytree(killed["cut"], run)
    before = (run / "metrics.csv").read_bytes()
    assert before.count(b"\n") == 8  # the header and 7 rows (steps 4 to 29, a validation at 19)
    proc = subprocess.run([sys.executable, str(killed["out"] / "killer.py"), "train", "--resume",
                           str(run / "last.ckpt")], env={**os.environ, "KILL_AT": "-1", "KILL_IN": "metrics"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (run / "metrics.csv").read_bytes() == before


def test_a_run_killed_again_and_again_ends_as_the_unbroken_one(killed: dict[str, Path], short_corpus: Path) -> None:
    """Killed half-way through writing last.ckpt, resumed and killed inside a validation, resumed and killed
    half-way through writing best.ckpt, resumed and killed after a training step, then resumed to the end:
    the same validations, training losses, best checkpoint and final weights as the run that never stopped.
    No kill leaves a damaged checkpoint or, once resumed, its temporary file."""
    reference, out = killed["reference"], killed["out"]
    run = out / "again-and-again"
    last = run / "last.ckpt"

    def step_of(path: Path) -> int:
        return int(torch.load(path, weights_only=True)["global_step"])

    killed_command(out, run_args(short_corpus, out, run.name), 2, "last.ckpt")  # step 20's last.ckpt
    assert step_of(last) == 10 and [p.name for p in run.glob(".last.ckpt.*.tmp")] != []
    killed_command(out, ["train", "--resume", str(last)], 20, "validation")  # the validation after step 20
    assert step_of(last) == 10 and not list(run.glob(".*.tmp"))
    killed_command(out, ["train", "--resume", str(last)], 1, "best.ckpt")  # that validation's best.ckpt
    assert step_of(last) == 10 and step_of(run / "best.ckpt") == 20  # the first session wrote it whole
    killed_command(out, ["train", "--resume", str(last)], 33, "train")
    assert step_of(last) == 30
    invoke(["train", "--resume", str(last)])
    assert step_of(last) == 40 and not list(run.glob(".*.tmp"))
    assert val_losses(run) == val_losses(reference)
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    assert step_of(run / "best.ckpt") == step_of(reference / "best.ckpt")
    assert largest_difference(run / "best.ckpt", reference / "best.ckpt") < 1e-6
    assert largest_difference(last, reference / "last.ckpt") < 1e-6


@pytest.mark.parametrize(("kill_at", "overrides", "saved_at", "validations"), [
    (21, [], 20, 2),  # step 20: a checkpoint and a validation
    (25, ["train.val_every_steps=0", "train.checkpoint_every_steps=0"], WINDOWS_PER_EPOCH, 1),  # epoch end: both
], ids=["mid-epoch", "epoch-end"])
def test_a_checkpoint_written_after_its_validation_resumes_exactly(tmp_path: Path, short_corpus: Path, kill_at: int,
                                                                    overrides: list[str], saved_at: int,
                                                                    validations: int) -> None:
    """When a validation follows a checkpoint step, last.ckpt is written after it: resumed from there, the
    run neither repeats nor skips that validation and ends as the run that never stopped."""
    reference = tmp_path / "reference"
    invoke(run_args(short_corpus, tmp_path, "reference", *overrides))
    run = kill_run(tmp_path, short_corpus, "cut", kill_at, "train", *overrides)
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == saved_at
    invoke(["train", "--resume", str(run / "last.ckpt")])
    assert val_losses(run) == val_losses(reference) and len(val_losses(run)) == validations
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    assert largest_difference(run / "last.ckpt", reference / "last.ckpt") < 1e-6


def test_a_run_resumed_after_its_budget_logs_as_an_unbroken_one(tmp_path: Path, short_corpus: Path) -> None:
    """8 steps (last.ckpt written when training ends, mid-epoch), then --resume --max-steps 12: validations and
    training losses at the steps of a 12-step run, not one step later (Lightning counts the last batch before
    training ends, then once more on resuming). A rate that ignores the budget, so the two runs are one."""
    steps = ["train.val_every_steps=4", "train.log_every_steps=3", "optim.schedule=constant"]
    invoke(run_args(short_corpus, tmp_path, "reference", *steps, "train.max_steps=12"))
    invoke(run_args(short_corpus, tmp_path, "longer", *steps, "train.max_steps=8"))
    run, reference = tmp_path / "longer", tmp_path / "reference"
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 8
    invoke(["train", "--resume", str(run / "last.ckpt"), "--max-steps", "12"])
    assert [s for s, _ in val_losses(run)] == [3, 7, 11] and val_losses(run) == val_losses(reference)
    assert train_losses(run) == pytest.approx(train_losses(reference), abs=1e-6)
    assert sorted(train_losses(run)) == [2, 5, 8, 11]
    assert largest_difference(run / "last.ckpt", reference / "last.ckpt") < 1e-6


class CrashAt(L.Callback):
    """Stands in for a crash: raises after training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_ntasgd_resumes_from_an_epoch_end_checkpoint(tmp_path: Path, short_corpus: Path) -> None:
    """NT-ASGD switched to averaged SGD before the checkpoint, which was written at the end of epoch 0
    (checkpoints every 11 steps: step 22 is the epoch's last batch); `--resume` alone finds it."""
    out = tmp_path / "runs"
    invoke(run_args(short_corpus, out, "reference", *NTASGD))
    config = load_config("smoke", [f"data.path={short_corpus}", *BASE, *NTASGD])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, run_dir=out / "cut", callbacks=[CrashAt(WINDOWS_PER_EPOCH + 3)])
    ckpt = torch.load(out / "cut" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == WINDOWS_PER_EPOCH
    assert ckpt["ntasgd"]["switched_at"] >= 0  # averaged SGD already: its state is in the checkpoint
    assert "ax" in next(iter(ckpt["optimizer_states"][0]["state"].values()))
    invoke(["train", "--resume", "--out", str(out)])
    assert largest_difference(out / "cut" / "last.ckpt", out / "reference" / "last.ckpt") < 1e-6
    assert torch.load(out / "cut" / "last.ckpt", weights_only=True)["ntasgd"] == \
        torch.load(out / "reference" / "last.ckpt", weights_only=True)["ntasgd"]


class TimerProbe(L.Callback):
    """Records the Timer's elapsed training time and the module's budget progress at the first batch,
    then stops the run."""

    def __init__(self) -> None:
        self.seen: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.seen is None:
            timer = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer))
            self.seen = (timer.time_elapsed("train"), pl_module.progress())  # type: ignore[operator]
            trainer.should_stop = True


def test_time_budget_resumes_from_the_elapsed_time(tmp_path: Path, short_corpus: Path) -> None:
    """The cosine schedule follows the Timer; a resumed run goes on from the time already spent."""
    overrides = [f"data.path={short_corpus}", "train.max_time=60", "train.max_steps=8", "sample.enabled=false"]
    config = load_config("smoke", overrides)
    train(config, run_dir=tmp_path / "run")
    ckpt_path = tmp_path / "run" / "last.ckpt"
    spent = torch.load(ckpt_path, weights_only=True)["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert spent > 0
    budget = 4 * spent  # a quarter of it spent: time, not steps (8 / 1000), leads the schedule now
    config, path, run_dir = resolve_resume(str(ckpt_path), load_config("smoke"),
                                           [f"train.max_time={budget}", "train.max_steps=1000"])
    assert config.train.max_time == budget and config.train.max_steps == 1000 and run_dir == tmp_path / "run"
    probe = TimerProbe()
    train(config, resume=path, run_dir=run_dir, callbacks=[probe])
    assert probe.seen is not None
    elapsed, progress = probe.seen
    assert elapsed >= spent  # the clock goes on from the checkpoint, it does not start again at zero
    assert progress == pytest.approx(elapsed / budget, abs=0.02)
    assert progress >= 0.25
