"""A step budget is told in steps and characters up front, and its time once the first steps are timed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from charlm.config import Config, load_config
from charlm.training.fit import describe_budget, train
from charlm.training.progress import format_minutes

TIME_LINE = re.compile(r"^time: ([\d,]+) steps to go at ([\d.]+) s a step \(([\d,]+) chars/s\): about (.+) here, "
                       r"done near \d\d:\d\d \(validations not counted\)(.*)$", re.MULTILINE)


def smoke_run(corpus_file: Path, out: Path, *, max_steps: int, max_time: str) -> Config:
    """Train the smoke config quietly under the given stopping rules; return its config."""
    cfg = load_config("smoke", [f"data.path={corpus_file}", f"train.out={out}", "train.name=t",
                                f"train.max_steps={max_steps}", f"train.max_time={max_time}", "train.progress=false",
                                "sample.enabled=false", "train.val_every_steps=0"])
    train(cfg)
    return cfg


def test_the_default_budget_is_steps_and_characters() -> None:
    assert describe_budget(load_config("default")) == (
        "4,200 steps (17.2 M chars; the time it takes is shown once the first steps are timed)")


@pytest.mark.parametrize(("overrides", "world", "said"), [
    (["train.max_steps=-1", "train.max_time=840"], 1, "840 s"),
    (["train.max_steps=10", "train.max_time=null", "data.batch_size=4", "data.bptt=8"], 2,
     "10 steps (640 chars; the time it takes is shown once the first steps are timed)"),
    (["train.max_steps=-1", "train.max_epochs=3", "train.max_time=60"], 1, "3 epochs, or 60 s, whichever comes first"),
])
def test_every_stopping_rule_is_named(overrides: list[str], world: int, said: str) -> None:
    assert describe_budget(load_config("default", overrides), world) == said


def test_minutes_read_as_a_person_says_them() -> None:
    assert [format_minutes(s) for s in (40, 89, 840, 3900)] == ["40 s", "1 min", "14 min", "1 h 05 min"]


def test_a_step_budget_prints_the_time_the_rest_will_take(corpus_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = smoke_run(corpus_file, tmp_path, max_steps=40, max_time="null")
    found = TIME_LINE.findall(capsys.readouterr().out)
    assert len(found) == 1, "one estimate, printed once"
    left, per_step, chars_per_s, _, limit = found[0]
    assert limit == "", "no time limit, nothing said of one"
    assert int(left.replace(",", "")) == 40 - 25  # 5 warm-up steps left out, 20 timed
    chars = cfg.data.batch_size * cfg.data.bptt
    assert float(chars_per_s.replace(",", "")) == pytest.approx(chars / float(per_step), rel=0.01)


def test_a_time_budget_prints_no_estimate(corpus_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    smoke_run(corpus_file, tmp_path, max_steps=-1, max_time="4")
    assert not TIME_LINE.search(capsys.readouterr().out)


def test_a_time_limit_that_comes_first_is_said(corpus_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    smoke_run(corpus_file, tmp_path, max_steps=1000000, max_time="3")
    found = TIME_LINE.findall(capsys.readouterr().out)
    assert len(found) == 1
    limit = re.fullmatch(r"; the time limit stops it first, in (\d+) s, near step ([\d,]+)", found[0][4])
    assert limit is not None, found[0][4]
    assert int(limit.group(1)) <= 3 and 25 < int(limit.group(2).replace(",", "")) < 1_000_000
