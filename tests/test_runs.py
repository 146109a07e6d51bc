"""The run folder: a checked name, one folder per run (DDP included), never reused, locked while in use."""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke
from filelock import FileLock

import charlm.training.runs as runs
from charlm.config import load_config

REPO = Path(__file__).resolve().parents[1]




def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "smoke", "--data", str(corpus), "--out", str(out), "--set", "sample.enabled=false",
            *extra]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------- the name
@pytest.mark.parametrize("name", ["../../escaped", "/tmp/charlm-absolute-run", "a/b", "..", ".", "", "a\\b"],
                         ids=["dot-dot", "absolute", "slash", "parent", "here", "empty", "backslash"])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(tmp_path: Path, corpus_file: Path, name: str) -> None:
    out = tmp_path / "a" / "b" / "out"
    code, output = invoke(*train_args(corpus_file, out, "--name", name, "--max-steps", "2"))
    assert code == 2, output
    assert output == (f"error: --name (train.name) must be a plain folder name under --out: not empty, not '.' or "
                      f"'..', without '/' or '\\'; got {name!r}")
    assert files_under(tmp_path) == []  # nothing written, under --out or anywhere else
    assert not Path("/tmp/charlm-absolute-run").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Frozen:
            return cls(2025, 1, 2, 3, 4, 5)

    monkeypatch.setattr(runs.dt, "datetime", Frozen)
    monkeypatch.delenv(runs.RUN_NAME_ENV, raising=False)
    config = load_config("smoke", [f"train.out={tmp_path}"])
    assert runs.new_run_dir(config) == tmp_path / "lstm-20250102-030405"
    (tmp_path / "lstm-20250102-030405").mkdir()
    (tmp_path / "lstm-20250102-030405-2").mkdir()
    assert runs.new_run_dir(config) == tmp_path / "lstm-20250102-030405-3"
    monkeypatch.setenv(runs.RUN_NAME_ENV, "lstm-20250102-030405")  # a process the DDP launcher started
    assert runs.new_run_dir(config) == tmp_path / "lstm-20250102-030405"


# ------------------------------------------------------------------------------------ one run, one folder
def test_a_finished_run_is_never_overwritten(tmp_path: Path, corpus_file: Path, trained_run: Path) -> None:
    run = tmp_path / "smoke"
    shutil.copytree(trained_run, run)
    before = {name: (run / name).read_bytes() for name in ("best.ckpt", "last.ckpt", "metrics.csv", "config.yaml")}
    code, output = invoke(*train_args(corpus_file, tmp_path, "--name", "smoke", "--max-steps", "5"))
    assert code == 2, output
    assert output == (f"error: run folder {run} already exists; choose another --name, or continue that run with "
                      f"`charlm train --resume {run / 'last.ckpt'}`")
    assert {name: (run / name).read_bytes() for name in before} == before


def test_a_folder_left_by_a_failed_start_can_be_taken_over(tmp_path: Path, corpus_file: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("left by a run that failed before its first step\n")
    (run / runs.LOCK_FILE).touch()
    code, output = invoke(*train_args(corpus_file, tmp_path, "--name", "run", "--max-steps", "2"))
    assert code == 0, output
    assert "max_steps: 2" in (run / "config.yaml").read_text() and (run / "last.ckpt").is_file()


def test_a_run_folder_in_use_is_refused(tmp_path: Path, trained_run: Path) -> None:
    run = tmp_path / "smoke"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with FileLock(run / runs.LOCK_FILE, timeout=0):  # what a training into that folder holds
        code, output = invoke("train", "--resume", str(run / "last.ckpt"), "--max-steps", "45")
    assert code == 2, output
    assert output == (f"error: run folder {run} is in use by another charlm train (it holds {run / '.lock'}); "
                      "wait for that run to end, or choose another --name")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_two_trainings_into_one_name_at_once(tmp_path: Path, corpus_file: Path) -> None:
    """Started together: one trains, the other is refused with one sentence; metrics.csv is one run's."""
    args = [sys.executable, "-m", "charlm", *train_args(corpus_file, tmp_path, "--name", "same", "--max-steps", "10",
                                                        "--set", "train.threads=1", "--set", "train.log_every_steps=1")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.communicate()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, (_, err) in results]
    refused = next(" ".join(err.split()) for code, (_, err) in results if code == 2)
    run = tmp_path / "same"
    assert refused in (
        f"error: run folder {run} already exists; choose another --name, or continue that run with "
        f"`charlm train --resume {run / 'last.ckpt'}`",
        f"error: run folder {run} is in use by another charlm train (it holds {run / '.lock'}); wait for that run "
        "to end, or choose another --name")
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train_loss")]
    assert steps == list(range(10))


@pytest.mark.parametrize("extra", [["--devices", "0"], ["--precision", "bogus"], ["--strategy", "nosuch"],
                                   ["--accelerator", "tpu"], ["--set", "train.threads=100000"]],
                         ids=["devices", "precision", "strategy", "tpu", "threads"])
def test_a_failed_start_leaves_no_folder(tmp_path: Path, corpus_file: Path, extra: list[str]) -> None:
    code, output = invoke(*train_args(corpus_file, tmp_path / "out", "--name", "run", *extra))
    assert code == 2 and output.startswith("error: ") and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ DDP
def test_a_ddp_run_without_a_name_makes_one_folder(tmp_path: Path, corpus_file: Path) -> None:
    """Lightning's launcher runs the command again for process 1; both must use process 0's run name."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                        runs.RUN_NAME_ENV) and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "charlm", *train_args(corpus_file, out, "--accelerator", "cpu", "--devices", "2",
                                                        "--strategy", "ddp", "--max-steps", "2",
                                                        "--set", "train.val_every_steps=2")]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process DDP training did not finish in 240 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]
    folders = list(out.iterdir())
    assert len(folders) == 1, folders
    assert folders[0].name.startswith("lstm-")
    assert {"best.ckpt", "last.ckpt", "config.yaml", "metrics.csv"} <= {p.name for p in folders[0].iterdir()}
