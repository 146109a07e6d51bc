"""`charlm eval` and `charlm sample`: the run's own streams, option limits, flat memory, NaN weights, a
closed pipe, and what a vocabulary mismatch says."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke
from typer.testing import CliRunner

from charlm.cli import app
from charlm.evaluation.scoring import validation_streams

runner = CliRunner()




def altered_copy(source: Path, dest: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, dest)
    return dest


def strict_json(text: str) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------ eval
def test_eval_default_gives_the_logged_val_loss(trained_run: Path) -> None:
    """No --batch-size: the run's data.eval_batch_size (8 in smoke), as its validation cut the split."""
    with (trained_run / "metrics.csv").open() as fh:
        logged = min(float(row["val_loss"]) for row in csv.DictReader(fh) if row["val_loss"])
    kept = torch.load(trained_run / "best.ckpt", weights_only=True)["callbacks"]
    best_score = next(float(v["best_model_score"]) for k, v in kept.items() if k.startswith("ModelCheckpoint"))
    code, output = invoke("eval", "--checkpoint", str(trained_run / "best.ckpt"), "--json")
    assert code == 0, output
    result = strict_json(output)
    assert abs(result["loss"] - logged) < 1e-5
    assert abs(result["loss"] - best_score) < 1e-5
    assert result["streams"] == 8


def test_validation_streams_follow_the_run() -> None:
    assert validation_streams({"resume_state": {"world_size": 1}}, 10_000, 64) == 64
    assert validation_streams({"resume_state": {"world_size": 2}}, 10_000, 8) == 16  # 8 per process
    assert validation_streams({"resume_state": {"world_size": 2}}, 7, 8) == 6  # a short split: fewer
    assert validation_streams({}, 10_000, 8) == 8  # no record of the processes: one


def test_nan_weights_json_is_valid_and_sample_refuses(trained_run: Path, tmp_path: Path) -> None:
    def poison(ckpt: dict[str, Any]) -> None:
        for value in ckpt["state_dict"].values():
            value.fill_(float("nan"))

    bad = altered_copy(trained_run / "best.ckpt", tmp_path / "nan.ckpt", poison)
    result = runner.invoke(app, ["eval", "--checkpoint", str(bad), "--json"])
    assert result.exit_code == 0, result.output
    figures = strict_json(result.stdout)
    assert figures["loss"] is None and figures["bpc"] is None and figures["perplexity"] is None
    assert figures["reason"] == (f"loss, bpc, perplexity are not a finite number: checkpoint {bad} has weights "
                                 "that are NaN or inf (10 tensor(s), e.g. encoder.weight)")
    code, output = invoke("sample", "--checkpoint", str(bad), "--length", "5")
    assert code == 2 and "Traceback" not in output
    assert output == (f"error: checkpoint {bad} has weights that are NaN or inf (10 tensor(s), e.g. encoder.weight), "
                      "so it cannot generate text; use an earlier checkpoint of that run or retrain")


# ---------------------------------------------------------------------------------------------- sample
class Overran(Exception):
    """The command ran past the test's deadline."""


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail, not hang, where a limit is not enforced (``--length 10**12`` would run for days)."""

    def expire(signum: int, frame: object) -> None:
        raise Overran("still running after 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("args", "message"), [
    (("--temperature", "nan"), "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (("--temperature", "inf"), "--temperature must be a finite number >= 0 (0 is greedy), got inf"),
    (("--seed", str(2**64)), "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got 18446744073709551616"),
    (("--seed", "-1"), "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got -1"),
    (("--length", "1000000000000"), "--length must be at most 100,000,000, got 1,000,000,000,000"),
    (("--num-samples", "20000"), "--num-samples must be at most 10,000, got 20,000"),
    (("--num-samples", "3", "--length", "40000000"),
     "--num-samples x --length must be at most 100,000,000 characters (several samples are kept in memory until "
     "all are done), got 3 x 40,000,000; ask for fewer or shorter samples, or stream one long sample"),
], ids=["temperature-nan", "temperature-inf", "seed-2**64", "seed-negative", "length-huge", "num-samples-huge",
        "samples-x-length"])
def test_sample_option_limits(trained_run: Path, args: tuple[str, ...], message: str, deadline: None) -> None:
    code, output = invoke("sample", "--checkpoint", str(trained_run / "best.ckpt"), *args)
    assert code == 2 and output == f"error: {message}"


def test_extreme_temperatures_and_seeds_work(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    base = ("sample", "--checkpoint", ckpt, "--prime", "ROMEO:", "--length", "40")
    code, greedy = invoke(*base, "--temperature", "0")
    assert code == 0, greedy
    assert invoke(*base, "--temperature", "1e-300", "--seed", "1") == (0, greedy)  # no NaN from logits / T
    code, wild = invoke(*base, "--temperature", "1e300", "--seed", str(2**32 - 1))
    assert code == 0 and wild.startswith("ROMEO:")


MEMORY_PROBE = textwrap.dedent("""
    import json, os, re, sys
    import torch
    from typer.main import get_command
    from charlm.cli import app

    def peak_kb():  # this process's peak resident memory (ru_maxrss would start at the parent's peak)
        with open("/proc/self/status") as fh:
            return int(re.search(r"VmHWM:\\s*(\\d+) kB", fh.read()).group(1))

    torch.set_num_threads(1)
    command = get_command(app)
    sys.stdout = open(os.devnull, "w")
    runs = [["sample", "--checkpoint", sys.argv[1], "--seed", "1", *extra] for extra in json.loads(sys.argv[3])]
    for run in runs:  # warm-up: allocator, caches
        assert command.main([*run, "--length", "500"], standalone_mode=False) is None
    peaks = [peak_kb()]
    for length in (int(sys.argv[2]), 2 * int(sys.argv[2])):  # a leak raises the peak in both stretches
        for run in runs:
            assert command.main([*run, "--length", str(length)], standalone_mode=False) is None
        peaks.append(peak_kb())
    print(peaks[1] - peaks[0], peaks[2] - peaks[1], file=sys.stderr)
""")


STREAM_CHARS = 5_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer of 8: the cheapest model to stream a long text from."""
    from conftest import shakespeare_text, write_model_checkpoint

    return write_model_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt", shakespeare_text(), num_layers=1,
                                  hidden_size=8, embedding_size=8)


def test_streaming_memory_stays_flat(tiny_checkpoint: Path) -> None:
    """One streamed sample keeps nothing (with stop strings and top-p too), several keep one byte per character:
    the peak memory of long runs hardly grows (it grew by about 1.2 KB per generated step when every step's
    tensor was kept). Ten million characters would take too long for the suite on a shared CPU; the bound
    catches a leak of 200 bytes a character in any of the runs, and the next test any Python object kept per
    character. Runs of N, then 2N characters: memory kept per character raises the peak in both stretches (by
    N x the leak at least), while a one-off allocation (an allocator taking a new megabyte, seen once in a
    busy CI run) raises it in one only."""
    runs = [[], ["--stop", "zzqqzz", "--stop", "~\\n", "--top-p", "0.9"], ["--num-samples", "4"]]
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tiny_checkpoint), str(STREAM_CHARS),
                            json.dumps(runs)], stderr=subprocess.PIPE, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    growth_kb = [int(kb) for kb in probe.stderr.strip().splitlines()[-1].split()]
    assert min(growth_kb) < STREAM_CHARS * 200 // 1024, growth_kb


def test_long_streams_keep_no_python_objects(tiny_checkpoint: Path) -> None:
    """The Python objects alive in the middle of a stream hardly grow from 600 to 1,300 to 2,000 characters:
    nothing is kept per character (the smallest object, 16 bytes, a character would add 11 KB to each of
    the two stretches), neither by a stream with stop strings nor by a session's continuation. One of the
    two stretches may hold a one-off allocation of the interpreter or torch (a cache filled once); a leak
    shows in both."""
    import gc
    import tracemalloc

    from charlm.generation.continuation import stream
    from charlm.generation.session import Session, Settings
    from charlm.model.checkpoint import load_model

    model, vocab, _, _ = load_model(tiny_checkpoint)
    stops = ("zzqqzz", "~\n")  # never found: "~" is not in the vocabulary
    session = Session(model, vocab, Settings(temperature=1.0, top_p=0.9, length=2000, stop=stops), seed=0)
    session.read("ROMEO:\n")
    runs = {"stream": lambda write: stream(model, vocab, "ROMEO:", 2000, write, top_k=20, top_p=0.9, seed=0,
                                           stop=stops),
            "session": session.continue_text}
    held: dict[str, list[int]] = {name: [] for name in runs}
    written = dict.fromkeys(runs, 0)
    for name, run in runs.items():
        def write(ch: str, name: str = name) -> None:
            written[name] += 1
            if written[name] in (600, 1300, 2000):
                gc.collect()
                held[name].append(tracemalloc.get_traced_memory()[0])

        tracemalloc.start()
        try:
            run(write)
        finally:
            tracemalloc.stop()
    assert all(len(h) == 3 and min(h[1] - h[0], h[2] - h[1]) < 8192 for h in held.values()), held


@pytest.mark.parametrize("args", [("sample", "--length", "1000000"), ("sample", "--num-samples", "2", "--length", "20"),
                                  ("eval", "--json", "--text", "{text}")], ids=["stream", "several", "eval"])
def test_closed_pipe_is_a_normal_end(trained_run: Path, corpus_file: Path, tmp_path: Path,
                                     args: tuple[str, ...]) -> None:
    """``charlm sample | head``: the reader leaving is no error (exit 0, nothing on stderr)."""
    text = tmp_path / "text.txt"
    text.write_text(corpus_file.read_text()[:200])
    command = [sys.executable, "-m", "charlm", *(a.format(text=text) for a in args),
               "--checkpoint", str(trained_run / "best.ckpt")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if args[1] == "--length":
        assert len(proc.stdout.read(10)) == 10  # read a little of the stream, then stop reading
    proc.stdout.close()  # the others: gone before the command writes anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert stderr == ""


# ------------------------------------------------------------------------------------------ vocabulary
def test_unknown_characters_name_the_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "best.ckpt"
    code, output = invoke("sample", "--checkpoint", str(ckpt), "--prime", "ROMEO~")
    assert code == 2
    assert output == (f"error: --prime has 1 character(s) outside the model's {vocab_size(ckpt)}-character "
                      f"vocabulary: '~' (1x); checkpoint {ckpt} knows only the characters of the text it was "
                      "trained on")
    text = tmp_path / "text.txt"
    text.write_text("ROMEO: ~~ §\n")
    code, output = invoke("eval", "--checkpoint", str(ckpt), "--text", str(text))
    assert code == 2 and output.endswith(f"'~' (2x), '§' (1x); checkpoint {ckpt} knows only the characters of "
                                         "the text it was trained on")


def vocab_size(ckpt: Path) -> int:
    return len(torch.load(ckpt, weights_only=True)["hyper_parameters"]["vocab"])


def test_checkpoint_mismatch_says_what_mismatched(trained_run: Path, tmp_path: Path) -> None:
    source = trained_run / "best.ckpt"
    n = vocab_size(source)

    def drop_last_char(ckpt: dict[str, Any]) -> None:
        ckpt["hyper_parameters"]["vocab"] = ckpt["hyper_parameters"]["vocab"][:-1]

    short = altered_copy(source, tmp_path / "short-vocab.ckpt", drop_last_char)
    code, output = invoke("sample", "--checkpoint", str(short), "--length", "5")
    assert code == 2
    assert output == (f"error: checkpoint {short} was trained with a vocabulary of {n} characters, but the "
                      f"vocabulary stored with it has {n - 1}; the file was altered or damaged: use another "
                      "checkpoint or retrain")

    def halve_hidden(ckpt: dict[str, Any]) -> None:
        ckpt["hyper_parameters"]["config"]["model"]["hidden_size"] = 32

    narrow = altered_copy(source, tmp_path / "narrow.ckpt", halve_hidden)
    code, output = invoke("eval", "--checkpoint", str(narrow))
    assert code == 2
    assert output.startswith(f"error: checkpoint {narrow} holds weights that do not fit the model its config "
                             "describes (cell lstm, 2 layer(s) of 32, embedding 32): 5 of another shape (e.g. ")
    assert output.endswith("the file was altered, or written by a charlm whose models differ from this one (0.1.0)")

    def repeat_a_char(ckpt: dict[str, Any]) -> None:
        vocab = ckpt["hyper_parameters"]["vocab"]
        ckpt["hyper_parameters"]["vocab"] = vocab[:-1] + vocab[0]

    repeated = altered_copy(source, tmp_path / "repeated.ckpt", repeat_a_char)
    code, output = invoke("sample", "--checkpoint", str(repeated))
    assert code == 2
    assert output == (f"error: checkpoint {repeated} holds a damaged vocabulary (vocabulary has repeated "
                      "characters: '\\n'); use another checkpoint or retrain")


def test_training_prime_outside_the_vocabulary_is_said_once(corpus_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--config", "smoke", "--data", str(corpus_file), "--out", str(tmp_path),
                                 "--name", "prime", "--set", 'sample.prime="ROMEO~§"'])
    assert result.exit_code == 0, result.output
    n = len(set(corpus_file.read_text()))
    warning = (f"warning: sample.prime 'ROMEO~§' has 2 character(s) outside the model's {n}-character "
               "vocabulary: '~' (1x), '§' (1x); the samples printed during training start from 'ROMEO' instead "
               "(set sample.prime to choose another)")
    output = " ".join(result.output.split())
    assert output.count(warning) == 1, result.output
    assert result.output.count("--- sample at step") == 2
    assert "---\nROMEO" in result.output
