"""``charlm tune``: the search space's checks, worker processes against one SQLite storage (no trial lost or run
twice), pruning, the best config, and a study continued after SIGKILL and after SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import optuna
import pytest
import yaml
from filelock import FileLock
from optuna.trial import TrialState
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config
from charlm.tools.tune.space import load_space, parse_space
from charlm.util.errors import CharlmError

TINY = ["--config", "smoke", "--set", "model.hidden_size=16", "--set", "model.embedding_size=16",
        "--set", "train.val_every_steps=3", "--set", "train.checkpoint_every_steps=3"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def tune_args(space: Path, corpus: Path, out: Path, *extra: str, trials: int = 6, steps: int = 6) -> list[str]:
    return ["tune", "--space", str(space), "--trials", str(trials), "--study", "s", "--data", str(corpus),
            "--out", str(out), "--max-steps", str(steps), *TINY, *extra]


_STORAGES: dict[Path, optuna.storages.RDBStorage] = {}


def load(out: Path) -> optuna.Study:
    db = out / "s" / "study.db"
    if db not in _STORAGES:  # one engine per file: polling a study must cost little next to its workers
        _STORAGES[db] = optuna.storages.RDBStorage(f"sqlite:///{db}")
    return optuna.load_study(study_name="s", storage=_STORAGES[db])


# --- the search space ---------------------------------------------------------------------------------------

def test_the_space_parses_every_form_and_draws_within_it() -> None:
    space = parse_space({"optim.lr": "loguniform(1e-4, 1e-2)", "model.dropout": "uniform(0, 0.4)",
                         "model": {"hidden_size": "int(16, 32)", "num_layers": "intlog(1, 4)"},
                         "model.cell": ["lstm", "gru"]})
    assert [p.key for p in space.params] == ["optim.lr", "model.dropout", "model.hidden_size", "model.num_layers",
                                             "model.cell"]
    space.check(load_config("smoke"))
    study = optuna.create_study()
    for _ in range(20):
        values = space.suggest(study.ask())
        assert 1e-4 <= values["optim.lr"] <= 1e-2 and 0 <= values["model.dropout"] <= 0.4
        assert isinstance(values["model.hidden_size"], int) and 16 <= values["model.hidden_size"] <= 32
        assert 1 <= values["model.num_layers"] <= 4 and values["model.cell"] in ("lstm", "gru")
    assert load_space(Path(__file__).resolve().parents[1] / "examples" / "space.yaml").params


@pytest.mark.parametrize(("raw", "message"), [
    ({"optim.lrr": "uniform(0, 1)"}, "search space s.yaml: unknown config key 'optim.lrr'; keys of 'optim': "
                                     "optimizer, lr, min_lr, schedule, warmup_steps, weight_decay, beta1, beta2, "
                                     "clip, alpha, beta, nonmono"),
    ({"optimizer.lr": "uniform(0, 1)"}, "search space s.yaml: unknown config section 'optimizer'; sections: data, "
                                        "model, optim, train, sample"),
    ({"lr": "uniform(0, 1)"}, "search space s.yaml: 'lr' is not a config key; write section.key, e.g. 'optim.lr'"),
    ({"optim.lr": "lognormal(1, 2)"}, "search space s.yaml: 'optim.lr: lognormal(1, 2)' is not a distribution; write "
                                      "uniform(low, high), loguniform(low, high), int(low, high), intlog(low, high) "
                                      "or a list of choices [a, b]"),
    ({"optim.lr": 0.01}, "search space s.yaml: 'optim.lr: 0.01' is not a distribution; write uniform(low, high), "
                         "loguniform(low, high), int(low, high), intlog(low, high) or a list of choices [a, b]"),
    ({"optim.lr": "uniform(0.1)"}, "search space s.yaml: 'optim.lr: uniform(0.1)' needs two finite numbers, "
                                   "uniform(low, high)"),
    ({"optim.lr": "uniform(a, b)"}, "search space s.yaml: 'optim.lr: uniform(a, b)' needs two finite numbers, "
                                    "uniform(low, high)"),
    ({"optim.lr": "uniform(0.1, 0.01)"}, "search space s.yaml: 'optim.lr: uniform(0.1, 0.01)' needs low < high"),
    ({"optim.lr": "loguniform(0, 0.01)"}, "search space s.yaml: 'optim.lr: loguniform(0, 0.01)' needs low > 0 (it is "
                                          "drawn in log space)"),
    ({"model.hidden_size": "int(16.5, 64)"}, "search space s.yaml: 'model.hidden_size: int(16.5, 64)' needs "
                                             "whole-number bounds"),
    ({"model.hidden_size": "uniform(16, 64)"}, "search space s.yaml: 'model.hidden_size' takes whole numbers; use "
                                               "int(low, high) or intlog(low, high)"),
    ({"model.cell": "int(1, 3)"}, "search space s.yaml: 'model.cell' takes no numbers; list its choices, e.g. [a, b]"),
    ({"model.cell": []}, "search space s.yaml: 'model.cell' has an empty list of choices"),
    ({"model.cell": ["lstm", "lstm"]}, "search space s.yaml: 'model.cell' lists a choice twice"),
    ({"model.hidden_size": [16, "big"]}, "search space s.yaml: config key 'model.hidden_size' must be int, got 'big'"),
    ({"train.name": ["a", "b"]}, "search space s.yaml: 'train.name' cannot be searched (each trial's run folder is "
                                 "named after it)"),
    ([], "search space s.yaml must map config keys to distributions, e.g. 'optim.lr: loguniform(1e-4, 1e-2)'"),
])
def test_a_bad_space_is_one_sentence_naming_the_key(raw: object, message: str) -> None:
    with pytest.raises(CharlmError) as info:
        parse_space(raw, "s.yaml")
    assert str(info.value) == message


@pytest.mark.parametrize(("raw", "message"), [
    ({"model.dropout": "uniform(0, 1)"}, "search space s.yaml: 'model.dropout: uniform(0, 1)': config key "
                                         "'model.dropout' must be in [0, 1), got 1.0"),
    ({"model.cell": ["lstm", "lsmt"]}, "search space s.yaml: 'model.cell: [lstm, lsmt]': unknown cell 'lsmt'; "
                                       "valid cells: "),
])
def test_a_bound_or_choice_the_config_refuses_is_caught_before_training(raw: object, message: str) -> None:
    space = parse_space(raw, "s.yaml")
    with pytest.raises(CharlmError) as info:
        space.check(load_config("smoke"))
    assert str(info.value).startswith(message)


def test_bad_space_file_fails_before_anything_is_made(tmp_path: Path, corpus_file: Path) -> None:
    space = write_space(tmp_path, "optim.lr: loguniform(1e-4, 1e-2)\nmodel.hidden: int(16, 32)\n")
    result = CliRunner().invoke(app, tune_args(space, corpus_file, tmp_path / "runs"))
    assert result.exit_code == 2
    assert "unknown config key 'model.hidden'" in result.output
    assert not (tmp_path / "runs").exists()


def test_without_optuna_the_command_says_what_to_install(tmp_path: Path, corpus_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    space = write_space(tmp_path, "optim.lr: loguniform(1e-4, 1e-2)\n")
    result = CliRunner().invoke(app, tune_args(space, corpus_file, tmp_path / "runs"))
    assert result.exit_code == 2
    assert 'charlm tune needs Optuna: pip install "charlm[tune]"' in result.output


# --- studies ------------------------------------------------------------------------------------------------

def test_two_workers_share_one_storage_and_run_each_trial_once(tmp_path: Path, corpus_file: Path) -> None:
    space = write_space(tmp_path, "optim.lr: loguniform(1e-3, 3e-2)\nmodel.dropout: uniform(0, 0.3)\n"
                                  "model.cell: [lstm, gru]\n")
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, tune_args(space, corpus_file, out, "--workers", "2", "--pruner", "none"))
    assert result.exit_code == 0, result.output
    trials = load(out).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    pids = {t.user_attrs["pid"] for t in trials}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # run by the worker processes
    study_dir = out / "s"
    assert sorted(p.name for p in study_dir.glob("trial-*")) == [f"trial-{n:04d}" for n in range(6)]
    for t in trials:  # each folder is its trial's run, trained with its values
        run = yaml.safe_load((study_dir / f"trial-{t.number:04d}" / "config.yaml").read_text())
        assert run["optim"]["lr"] == t.params["optim.lr"] and run["model"]["cell"] == t.params["model.cell"]
        assert run["train"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
        assert (study_dir / f"trial-{t.number:04d}" / "best.ckpt").is_file()
    best = min(trials, key=lambda t: t.value)
    config = load_config(str(study_dir / "best.yaml"))  # what `charlm train --config` reads
    assert config.optim.lr == best.params["optim.lr"] and config.model.cell == best.params["model.cell"]
    assert config.model.dropout == best.params["model.dropout"] and config.model.hidden_size == 16
    assert config.sample.enabled and config.train.threads == 0  # the user's settings, not the workers'
    assert (study_dir / "importance.png").stat().st_size > 0
    assert f"best trial {best.number}: val loss {best.value:.4f}" in result.output


def test_a_pruner_prunes_and_the_pruned_run_ends_cleanly(tmp_path: Path, corpus_file: Path) -> None:
    space = write_space(tmp_path, "optim.lr: loguniform(1e-3, 3e-2)\n")
    out = tmp_path / "runs"
    # every validation loss is above 0: each trial is pruned at its first report (step 3 of 9)
    result = CliRunner().invoke(app, tune_args(space, corpus_file, out, "--pruner", "threshold:0", trials=2, steps=9))
    assert result.exit_code == 0, result.output
    trials = load(out).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert list(t.intermediate_values) == [3] and t.user_attrs["steps"] == 3
        run = out / "s" / f"trial-{t.number:04d}"
        assert (run / "last.ckpt").is_file() and (run / "best.ckpt").is_file()
        FileLock(run / ".lock", timeout=0).acquire()  # released
    assert "no trial completed" in result.output
    assert "it needs at least 2 completed trials, the study has 0" in result.output

    other = write_space(tmp_path, "optim.lr: loguniform(1e-4, 3e-2)\n")  # the same study, another space
    again = CliRunner().invoke(app, tune_args(other, corpus_file, out, trials=3, steps=9))
    assert again.exit_code == 2
    assert ("study 's' was started with another search space; run it with the same --space, --config, --set and "
            "budget as before, or give a new --study") in again.output


def test_a_trial_whose_process_is_gone_is_marked_failed_and_others_are_left_alone() -> None:
    from charlm.tools.tune.objective import counts
    from charlm.tools.tune.study import fail_orphans

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = [(socket.gethostname(), int(gone.stdout)), (socket.gethostname(), os.getpid()),
              ("another-machine", int(gone.stdout))]
    for host, pid in owners:
        trial = study.ask()
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
    study.ask()  # a trial whose process never said it was its own
    assert fail_orphans(study, storage) == [0]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.RUNNING]
    assert study.trials[0].user_attrs["stopped"] == f"its process ({int(gone.stdout)}) ended without finishing it"
    assert [counts(t) for t in study.trials] == [False, True, True, True]  # an interrupted trial is replaced
    assert fail_orphans(study, storage, unowned=True) == [3]  # the study folder's lock says it is no one's
    assert study.trials[3].user_attrs["stopped"] == "its process ended before it started"


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid``, deepest first (the workers are forked by a fork server under the command)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, level = [], [pid]
    while level:
        level = [p for p, parent in parents.items() if parent in level]
        found = level + found
    return found


def _study_made(db: Path) -> bool:
    """Whether the run has made study "s" in ``db``, read without writing: a storage opened on a database still
    being made would race the run to make its tables, and one of the two would fail."""
    if not db.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)) as con:
            return con.execute("SELECT 1 FROM studies WHERE study_name = 's'").fetchone() is not None
    except sqlite3.OperationalError:  # no tables yet
        return False


def _wait_for(out: Path, proc: subprocess.Popen[str], ready: object, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if _study_made(out / "s" / "study.db"):
            try:
                if ready(load(out).trials):  # type: ignore[operator]
                    return
            except (KeyError, optuna.exceptions.OptunaError):
                pass  # the study is being made
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the study did not reach the state in time")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_study_continues_after_sigkill_and_after_sigterm(tmp_path: Path, corpus_file: Path) -> None:
    space = write_space(tmp_path, "optim.lr: loguniform(1e-3, 3e-2)\n")
    out = tmp_path / "runs"
    args = tune_args(space, corpus_file, out, "--workers", "2", "--pruner", "none", trials=5, steps=36)
    command = [sys.executable, "-m", "charlm", *args]

    def running(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
        return [t for t in trials if t.state == TrialState.RUNNING and "pid" in t.user_attrs]

    # 1. everything killed at once (SIGKILL: a crash) while a trial runs and one is done
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out, first, lambda ts: running(ts) and any(t.state == TrialState.COMPLETE for t in ts))
    for pid in [*_descendants(first.pid), first.pid]:
        os.kill(pid, signal.SIGKILL)
    first.communicate()
    before = load(out).trials
    orphans = {t.number for t in running(before)}  # (empty if the trial seen running finished before the kill)
    done = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    assert done

    # 2. the same command again, stopped by SIGTERM while a trial runs: the workers stop, one line, exit 143
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out, second, lambda ts: any(t.number >= len(before) for t in running(ts)))
    under_way = {t.number for t in running(load(out).trials)} - orphans
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("stopped: charlm tune interrupted by SIGTERM; trials under way are "
                                               "marked FAIL and will be replaced; run the same command to continue "
                                               "study 's'")
    middle = load(out).trials
    assert not [t for t in middle if t.state == TrialState.RUNNING]
    for t in middle:
        if t.number in orphans:  # found dead by the second run's workers
            assert t.state == TrialState.FAIL and "ended without finishing it" in t.user_attrs["stopped"]
        elif t.state == TrialState.FAIL and not t.user_attrs.get("pid"):  # killed before it said whose it was
            assert t.user_attrs["stopped"] == "its process ended before it started"
        elif t.number in under_way:  # stopped, or finished first if it was about to
            assert t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL
                                                      and "interrupted" in t.user_attrs["stopped"])

    # 3. and again, to the end: 5 finished trials, the earlier ones kept, none run twice
    result = CliRunner().invoke(app, tune_args(space, corpus_file, out, "--pruner", "none", trials=5, steps=36))
    assert result.exit_code == 0, result.output
    trials = load(out).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 5
    assert all(t.state == TrialState.FAIL for t in trials if t.state not in FINISHED)
    assert {n: v for n, v in ((t.number, t.value) for t in trials) if n in done} == done
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    folders = {p.name for p in (out / "s").glob("trial-*")}  # a trial killed early may have made none
    assert folders <= {f"trial-{t.number:04d}" for t in trials}
    assert {f"trial-{t.number:04d}" for t in finished} <= folders


def test_processes_opening_a_new_storage_together_all_get_it(tmp_path: Path) -> None:
    """Four processes open one new SQLite study storage at the same moment (machines joining a study, a reader):
    each makes the tables or finds them made, none fails."""
    code = ("import sys, time; from charlm.tools.tune.study import open_storage\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); open_storage(sys.argv[1]); print('ok')")
    url, start = f"sqlite:///{tmp_path / 'study.db'}", time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in results]


def test_the_report_waits_for_trials_still_running_elsewhere(tmp_path: Path, corpus_file: Path) -> None:
    """A study of 2 trials: one complete, one RUNNING in another live process of this machine (a command killed
    just before left its worker running, say). The command runs no trial, waits for that one, and its table
    and best.yaml then hold it (its loss is the better one)."""
    from charlm.tools.tune.study import default_storage, open_storage

    space = write_space(tmp_path, "optim.lr: loguniform(1e-3, 3e-2)\n")
    out = tmp_path / "runs"
    args = tune_args(space, corpus_file, out, trials=2, steps=3)
    first = CliRunner().invoke(app, [*args[:args.index("--trials") + 1], "1", *args[args.index("--trials") + 2:]])
    assert first.exit_code == 0, first.output
    storage = open_storage(default_storage(out / "s"))
    study = optuna.load_study(study_name="s", storage=storage)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        running = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
        running.set_user_attr("host", socket.gethostname())
        running.set_user_attr("pid", other.pid)
        finisher = threading.Timer(3.0, lambda: study.tell(running, 0.125))
        finisher.start()
        result = CliRunner().invoke(app, args)
        finisher.join()
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "waiting for 1 trial still running in other processes (trial 1) before the report" in output
    assert "RUNNING" not in output and "best trial 1: val loss 0.1250" in output
    assert [t.state for t in load(out).trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert (out / "s" / "best.yaml").read_text().startswith("# charlm tune, study s: trial 1, val loss 0.1250")
