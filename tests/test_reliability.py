"""Nothing lost, nothing run: atomic checkpoints, last.ckpt cadence, Ctrl-C, safe loading, non-finite losses."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import invoke_as_printed as invoke
from conftest import shakespeare_text

import charlm.training.fit as train_module
from charlm.config import load_config
from charlm.model.checkpoint import FORMAT_VERSION, safe_load
from charlm.training.checkpoint_io import AtomicCheckpointIO
from charlm.training.fit import train
from charlm.util.errors import CharlmError, TrainingDiverged


def flat(text: str) -> str:
    """CLI output with Rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(shakespeare_text(6000), encoding="utf-8")  # 22 training windows per epoch
    return path


def smoke(corpus: Path, *overrides: str) -> Any:
    return load_config("smoke", [f"data.path={corpus}", "sample.enabled=false", *overrides])


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ a full disk
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_while_training_keeps_the_old_checkpoint(tmp_path: Path, corpus_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The second save of last.ckpt (step 20) meets a full disk: its temporary file is /dev/full, where
    every write fails with ENOSPC. One clear message, exit 2, and the step-10 last.ckpt stays byte for byte."""
    real_mkstemp = tempfile.mkstemp
    last = tmp_path / "full" / "last.ckpt"
    before: list[bytes] = []

    def filling_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        if kwargs.get("prefix") == ".last.ckpt.":
            before.append(last.read_bytes() if last.is_file() else b"")
            if len(before) == 2:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", filling_mkstemp)
    code, output = invoke("train", "--config", "smoke", "--data", str(corpus_file), "--out", str(tmp_path),
                          "--name", "full", "--set", "sample.enabled=false")
    assert code == 2, output
    assert flat(output).endswith(f"error: could not save checkpoint {last}: No space left on device (ENOSPC); the "
                                 "previous checkpoint there is unchanged. Free some space, then resume with "
                                 "`charlm train --resume`")
    assert "Traceback" not in output and "unexpected pos" not in output
    assert len(before) == 2 and last.read_bytes() == before[1]
    assert safe_load(last)["global_step"] == 10
    assert temp_files(last.parent) == []


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")


def test_a_really_full_file_system_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """A 1 MiB tmpfs with 64 KiB left after the first checkpoint: the second (200 KB) fills it half-way and
    fails with ENOSPC, not with torch's zip writer's "unexpected pos", and the first stays."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        target = disk / "last.ckpt"
        io = AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.ones(1000)}, target)
        old = target.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))
        with pytest.raises(CharlmError) as caught:
            io.save_checkpoint({"w": torch.zeros(50_000)}, target)
        assert str(caught.value) == (f"could not save checkpoint {target}: No space left on device (ENOSPC); the "
                                     "previous checkpoint there is unchanged. Free some space, then resume with "
                                     "`charlm train --resume`")
        assert target.read_bytes() == old
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "last.ckpt"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize(("code", "advice"), [
    (errno.EACCES, "is not writable: make it writable, then resume with `charlm train --resume`, or train again "
                   "with another --out"),
    (errno.EROFS, "is not writable: make it writable, then resume with `charlm train --resume`, or train again "
                  "with another --out"),
    (errno.ENOSPC, "Free some space, then resume with `charlm train --resume`"),
    (errno.EIO, "Check the disk, then resume with `charlm train --resume`, or train again with another --out"),
], ids=["EACCES", "EROFS", "ENOSPC", "EIO"])
def test_the_advice_fits_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, advice: str) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)

    def failing_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    with pytest.raises(CharlmError) as caught:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, target)
    message = str(caught.value)
    assert message.startswith(f"could not save checkpoint {target}: {os.strerror(code)} "
                              f"({errno.errorcode[code]}); the previous checkpoint there is unchanged. ")
    assert message.endswith(advice)
    assert ("Free some space" in message) == (code == errno.ENOSPC)


def test_an_unexplained_os_error_is_one_message(tmp_path: Path, corpus_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def full(config: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(train_module, "dump_yaml", full)
    code, output = invoke("train", "--config", "smoke", "--data", str(corpus_file), "--out", str(tmp_path),
                          "--name", "run")
    assert code == 2 and "Traceback" not in output
    assert f"error: could not read or write {tmp_path / 'run' / 'config.yaml'}: No space left on device" \
        in flat(output)


# ------------------------------------------------------------------------------------- last.ckpt cadence
class WatchLast(L.Callback):
    """Records the step stored in last.ckpt each time the file is replaced (a new inode: atomic rename)."""

    def __init__(self, path: Path) -> None:
        self.path, self.inode, self.steps = path, -1, []

    def _look(self) -> None:
        if self.path.is_file() and self.path.stat().st_ino != self.inode:
            self.inode = self.path.stat().st_ino
            self.steps.append(torch.load(self.path, weights_only=True)["global_step"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._look()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._look()


def test_last_checkpoint_every_n_steps_and_at_each_epoch_end(tmp_path: Path, short_corpus: Path) -> None:
    watch = WatchLast(tmp_path / "run" / "last.ckpt")
    config = smoke(short_corpus, "train.checkpoint_every_steps=7", "train.max_steps=30", "train.val_every_steps=0")
    train(config, run_dir=tmp_path / "run", callbacks=[watch])
    watch._look()  # the final save comes after every other callback's on_train_end
    assert watch.steps == [7, 14, 21, 22, 28, 30]  # 22: end of epoch 0 (22 windows); 30: end of training


# -------------------------------------------------------------------------------------- loading safely
class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: it creates a file, the stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path, trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "best.ckpt", weights_only=True)
    # the crafted file really is an attack: a plain torch.load runs it
    control_marker = tmp_path / "control-marker"
    torch.save({**ckpt, "extra": RunsCode(control_marker)}, tmp_path / "control.ckpt")
    torch.load(tmp_path / "control.ckpt", weights_only=False)
    assert control_marker.is_file()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "extra": RunsCode(marker)}, evil)
    for args in (("sample", "--checkpoint", str(evil), "--length", "5"), ("eval", "--checkpoint", str(evil)),
                 ("train", "--resume", str(evil))):
        code, output = invoke(*args)
        assert code == 2, output
        assert f"error: refused to load {evil}: unpickling it would call io.open, which can run code" in flat(output)
        assert "Traceback" not in output
        assert not marker.exists()


def _rewrite(source: Path, target: Path, change: Any) -> None:
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    torch.save(ckpt, target)


@pytest.mark.parametrize(("make", "message"), [
    (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
     "is not a readable checkpoint (truncated, corrupt, or not a checkpoint); refused to load it"),
    (lambda src, dst: dst.write_bytes(b""),
     "is not a readable checkpoint (truncated, corrupt, or not a checkpoint); refused to load it: EOFError"),
    (lambda src, dst: dst.write_bytes(bytes(range(256)) * 20),
     "is not a readable checkpoint (truncated, corrupt, or not a checkpoint); refused to load it"),
    (lambda src, dst: dst.write_text("ROMEO: this is a text file\n"),
     "is not a readable checkpoint (truncated, corrupt, or not a checkpoint); refused to load it"),
    (lambda src, dst: torch.save({"weights": torch.ones(2)}, dst),
     "is not a charlm checkpoint (no state_dict / hyper_parameters)"),
    (lambda src, dst: _rewrite(src, dst, lambda c: c["hyper_parameters"].update(format_version=FORMAT_VERSION + 98)),
     f"was written by an incompatible charlm (checkpoint format {FORMAT_VERSION + 98}, this is charlm"),
    (lambda src, dst: _rewrite(src, dst, lambda c: c["hyper_parameters"]["config"]["model"].update(wings=2)),
     "does not match this version of charlm: unknown config key 'model.wings'"),
], ids=["truncated", "empty", "garbage", "text", "not-charlm", "format-version", "newer-config"])
def test_a_bad_checkpoint_is_one_clear_message(tmp_path: Path, trained_run: Path, make: Any, message: str) -> None:
    bad = tmp_path / "bad.ckpt"
    make(trained_run / "best.ckpt", bad)
    code, output = invoke("eval", "--checkpoint", str(bad))
    assert code == 2, output
    assert f"error: {bad} {message}" in flat(output)
    assert "Traceback" not in output


def test_resume_from_a_missing_or_bad_checkpoint(tmp_path: Path) -> None:
    code, output = invoke("train", "--resume", "--out", str(tmp_path))
    assert code == 2
    assert f"no checkpoint found under {tmp_path}/ (looked for {tmp_path}/<run>/last.ckpt); train one with " \
           "`charlm train` or pass --resume FILE" in flat(output)
    code, output = invoke("train", "--resume", str(tmp_path / "nope.ckpt"))
    assert code == 2 and f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist" in flat(output)
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    code, output = invoke("train", "--resume", str(tmp_path / "text.ckpt"))
    assert code == 2 and "is not a readable checkpoint" in flat(output) and "Traceback" not in output


# --------------------------------------------------------------------------------------- non-finite loss
class Poison(L.Callback):
    """Puts NaN into the decoder bias before training step ``step``; ``transient``: restores it after."""

    def __init__(self, step: int, *, transient: bool = False) -> None:
        self.step, self.transient = step, transient
        self.saved: torch.Tensor | None = None
        self.before: dict[str, torch.Tensor] = {}
        self.change_in_poisoned_step: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            bias = pl_module.model.decoder.bias  # type: ignore[union-attr]
            self.saved = bias.detach().clone()
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            with torch.no_grad():
                bias.fill_(float("nan"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.transient and self.saved is not None:
            with torch.no_grad():
                pl_module.model.decoder.bias.copy_(self.saved)  # type: ignore[union-attr]
            now = pl_module.state_dict()
            self.change_in_poisoned_step = max((now[k] - v).abs().max().item() for k, v in self.before.items())
            self.saved = None


class InfGradient(L.Callback):
    """Makes one gradient infinite at step ``step`` (callbacks run before the module's own hook)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            pl_module.model.encoder.weight.grad[0, 0] = float("inf")  # type: ignore[index, union-attr]


def test_a_nan_loss_stops_the_run_naming_step_and_checkpoint(tmp_path: Path, short_corpus: Path) -> None:
    config = smoke(short_corpus, "train.max_steps=14")
    with pytest.raises(TrainingDiverged) as caught:
        train(config, run_dir=tmp_path / "run", callbacks=[Poison(12)])
    assert (caught.value.what, caught.value.step) == ("the loss became nan", 12)
    last = tmp_path / "run" / "last.ckpt"
    assert str(caught.value).startswith(
        f"training stopped: the loss became nan at step 12. Last good checkpoint: {last}. Lower optim.lr")
    assert safe_load(last)["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in safe_load(last)["state_dict"].values())


def test_a_nan_loss_reaches_the_cli_as_one_message(tmp_path: Path, short_corpus: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    original = train_module.build_trainer

    def poisoned(config: Any, run_dir: Path, *, extra_callbacks: Any = None) -> Any:
        return original(config, run_dir, extra_callbacks=[Poison(3)])

    monkeypatch.setattr(train_module, "build_trainer", poisoned)
    code, output = invoke("train", "--config", "smoke", "--data", str(short_corpus), "--out", str(tmp_path),
                          "--name", "nan", "--max-steps", "5")
    assert code == 2 and "Traceback" not in output
    assert "error: training stopped: the loss became nan at step 3. Last good checkpoint: none saved yet." \
        in flat(output)


def test_non_finite_gradients_stop_the_run(tmp_path: Path, short_corpus: Path) -> None:
    config = smoke(short_corpus, "train.max_steps=8")
    with pytest.raises(CharlmError, match=r"^training stopped: the gradients became non-finite at step 5\. "):
        train(config, run_dir=tmp_path / "run", callbacks=[InfGradient(5)])


def test_skip_mode_skips_a_bad_step_and_carries_on(tmp_path: Path, short_corpus: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    poison, inf = Poison(3, transient=True), InfGradient(6)
    config = smoke(short_corpus, "train.max_steps=8", "train.on_nan=skip")
    result = train(config, run_dir=tmp_path / "run", callbacks=[poison, inf])
    assert result.steps == 8
    assert poison.change_in_poisoned_step == 0.0  # the skipped step changed no weight
    printed = capsys.readouterr().out
    assert "step 3: the loss became nan; step skipped (train.on_nan=skip)" in printed
    assert "step 6: the gradients became non-finite; step skipped (train.on_nan=skip)" in printed
    final = safe_load(tmp_path / "run" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in final.values())


def test_skip_mode_still_stops_when_every_step_is_bad(tmp_path: Path, short_corpus: Path) -> None:
    config = smoke(short_corpus, "train.max_steps=30", "train.on_nan=skip", "train.checkpoint_every_steps=0",
                   "train.val_every_steps=0")
    with pytest.raises(TrainingDiverged) as caught:
        train(config, run_dir=tmp_path / "run", callbacks=[Poison(3)])
    assert (caught.value.what, caught.value.step) == ("the loss became nan", 12)
    assert str(caught.value) == ("training stopped: the loss became nan at step 12, the 10th step in a row that "
                                 "was not finite. Last good checkpoint: none saved yet.")


class PoisonSteps(Poison):
    """Poison's transient NaN at each of ``steps`` (never two in a row here)."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__(-1, transient=True)
        self.steps = steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step = trainer.global_step if trainer.global_step in self.steps else -1
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


@pytest.mark.parametrize("settings", [["train.precision=32-true"],
                                      ["train.precision=16-true", "optim.optimizer=ntasgd", "optim.lr=1"]],
                         ids=["32-bit", "16-bit"])  # (AdamW's eps is 0 in float16: SGD there)
def test_skip_mode_counts_bad_steps_in_a_row_not_in_the_run(tmp_path: Path, short_corpus: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            settings: list[str]) -> None:
    """Twelve bad steps, each followed by a good one, in 32 and 16 bits (where a gradient scaler would own
    non-finite gradients): the run goes on to its end, each bad step skipped."""
    bad = set(range(2, 26, 2))
    config = smoke(short_corpus, "train.max_steps=27", "train.on_nan=skip", *settings,
                   "train.checkpoint_every_steps=0", "train.val_every_steps=0")
    result = train(config, run_dir=tmp_path / "run", callbacks=[PoisonSteps(bad)])
    assert result.steps == 27
    printed = capsys.readouterr().out
    assert [s for s in range(27) if f"step {s}: the loss became nan; step skipped" in printed] == sorted(bad)


def test_non_finite_weights_are_never_saved(tmp_path: Path, short_corpus: Path) -> None:
    config = smoke(short_corpus, "train.max_steps=30", "train.on_nan=skip", "train.checkpoint_every_steps=5")
    last = tmp_path / "run" / "last.ckpt"
    with pytest.raises(TrainingDiverged) as caught:
        train(config, run_dir=tmp_path / "run", callbacks=[Poison(7)])
    assert (caught.value.what, caught.value.step) == ("the weights are not finite (model.decoder.bias)", 10)
    assert str(caught.value) == ("training stopped at step 10: the weights are not finite (model.decoder.bias), "
                                 f"so they were not saved. Last good checkpoint: {last}")
    assert safe_load(last)["global_step"] == 5
