"""Beyond one machine: DDP sharding and exact validation over ranks, and the mixed-precision / GPU path.

The DDP test runs ``charlm train --accelerator cpu --devices 2 --strategy ddp`` for real (two gloo
processes, smoke config) in a subprocess. The subprocess is a small script that runs the CLI with one
extra callback which saves, per rank, what that rank read (train windows, every validation window)
and its local, not yet summed validation NLL; the test then checks the rank layout against the split,
and the logged validation loss against a single-process evaluation of the same checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import launch_env
from typer.testing import CliRunner

from charlm.cli import app
from charlm.data.bptt import window_schedule
from charlm.data.datamodule import eval_streams, split_ids
from charlm.data.streams import StreamLayout, WindowSampler
from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids, score_batch
from charlm.model.char_lm import CharLM, States
from charlm.model.checkpoint import load_model

REPO = Path(__file__).resolve().parents[1]
WORLD, BATCH, EVAL_BATCH, BPTT, STEPS, SEED = 2, 8, 8, 32, 40, 1234  # configs/smoke.yaml, 2 processes

# Runs the CLI (so `python script.py train ...` is `python -m charlm train ...`) with a recording callback.
# Lightning's DDP launcher re-runs this same script for local rank 1; the folder travels in the environment.
RECORDER = '''
import os
from pathlib import Path

import lightning as L
import torch

import charlm.training.fit as train_module
from charlm.cli import main

OUT = Path(os.environ["CHARLM_TEST_RECORD"])


class Record(L.Callback):
    def __init__(self):
        self.train, self.val, self.validations, self.layout = [], [], [], {}

    def on_train_start(self, trainer, pl_module):
        layout = trainer.train_dataloader.sampler.layout
        self.layout = {"row_length": layout.row_length, "batch_size": layout.batch_size,
                       "threads": torch.get_num_threads()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((batch.x.clone(), batch.y.clone()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self.validations:  # every window of the first validation
            self.val.append((batch.x.clone(), batch.y.clone(), batch.tail))

    def on_validation_epoch_end(self, trainer, pl_module):  # before Lightning computes the metric: local sums
        metric = pl_module.val_metrics["loss"]
        self.validations.append({"step": trainer.global_step, "nll_sum": float(metric.nll_sum),
                                 "chars": int(metric.chars)})

    def on_validation_end(self, trainer, pl_module):
        self.validations[-1]["val_loss"] = float(trainer.callback_metrics["val_loss"])
        self.validations[-1]["val_chars"] = float(trainer.callback_metrics["val_chars"])

    def on_train_end(self, trainer, pl_module):
        torch.save({"rank": trainer.global_rank, "world_size": trainer.world_size, "layout": self.layout,
                    "train": self.train, "val": self.val, "validations": self.validations},
                   OUT / f"rank{trainer.global_rank}.pt")


_train = train_module.train


def train(*args, **kwargs):  # `charlm train` imports charlm.training.fit.train when it runs
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Record()]
    return _train(*args, **kwargs)


train_module.train = train
main()
'''


# ------------------------------------------------------------------------------------- layout math
@pytest.mark.parametrize(("n", "batch", "world"), [(1000, 4, 2), (1001, 3, 4), (97, 2, 3), (50, 1, 7), (64, 8, 1)])
def test_rank_shards_are_contiguous_disjoint_and_cover_the_split(n: int, batch: int, world: int) -> None:
    ids = torch.arange(n)  # ids are positions: a row is contiguous iff its values step by one
    for keep_tail in (False, True):
        layouts = [StreamLayout(ids, batch, rank=r, world_size=world, keep_tail=keep_tail) for r in range(world)]
        length = layouts[0].row_length
        assert {lay.row_length for lay in layouts} == {(n - 1) // (batch * world)}
        for r, lay in enumerate(layouts):
            assert lay.inputs.shape == (batch, length)
            for i in range(batch):  # rank r owns global rows [r B, (r + 1) B), in order
                start = (r * batch + i) * length
                assert torch.equal(lay.inputs[i], torch.arange(start, start + length))
                assert torch.equal(lay.targets[i], lay.inputs[i] + 1)
            assert (lay.tail_inputs is not None) == (keep_tail and r == world - 1 and n - 1 > world * batch * length)
        inputs = torch.cat([lay.inputs.reshape(-1) for lay in layouts]
                           + [lay.tail_inputs.reshape(-1) for lay in layouts if lay.tail_inputs is not None])
        if keep_tail:  # evaluation: every position exactly once
            assert torch.equal(inputs, ids[:-1])
            assert sum(lay.chars for lay in layouts) == n - 1
        else:  # training drops fewer than one column of rows
            assert torch.equal(inputs, ids[:inputs.numel()]) and n - 1 - inputs.numel() < batch * world
        # one process with world * B streams reads the same rows and tail (how train.py and the test
        # below score a split the way a DDP validation does)
        per_rank = eval_streams(n, batch, world)
        if keep_tail and per_rank == batch:
            single = StreamLayout(ids, per_rank * world, keep_tail=True)
            assert torch.equal(single.inputs, torch.cat([lay.inputs for lay in layouts]))
            tail = layouts[-1].tail_inputs
            assert (single.tail_inputs is None and tail is None) or torch.equal(single.tail_inputs, tail)


def test_every_rank_cuts_the_same_windows() -> None:
    ids = torch.arange(20_000)
    for epoch in (0, 1, 5):
        per_rank = []
        for r in range(3):
            sampler = WindowSampler(StreamLayout(ids, 4, rank=r, world_size=3, keep_tail=True), 40, variable=True,
                                    seed=7)
            sampler.set_epoch(epoch)
            per_rank.append(sampler.windows())
        rows = [[w for w in ws if not w.tail] for ws in per_rank]
        assert rows[0] == rows[1] == rows[2]
        assert len({w.length for w in rows[0]}) > 3  # variable lengths, cut identically
        assert not any(w.tail for w in per_rank[0] + per_rank[1]) and any(w.tail for w in per_rank[2])
    assert [w.start for w in rows[0]] != [w.start for w in WindowSampler(
        StreamLayout(ids, 4, world_size=3), 40, variable=True, seed=7).windows()]  # epoch 5 != epoch 0


# ------------------------------------------------------------------------------------ the DDP run
@dataclass
class DDPRun:
    run_dir: Path
    output: str
    ranks: list[dict[str, Any]]
    seconds: float
    vocab: Vocab
    train_ids: torch.Tensor
    val_ids: torch.Tensor


def _clean_env(record: Path) -> dict[str, str]:
    return {**launch_env(), "CHARLM_TEST_RECORD": str(record)}


@pytest.fixture(scope="module")
def ddp_corpus(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """The shipped text with the second half of its validation split in capitals. Capitals are rare in the
    training text, so the last rank (that half and the tail) scores a far higher mean loss than rank 0; as
    the tail makes the ranks' character counts differ, the mean of the ranks' means is then far from the
    mean over characters, and a validation that logged the one instead of the other is told apart."""
    text = corpus_file.read_text(encoding="utf-8")
    n_val, n_test = int(len(text) * 0.05), int(len(text) * 0.05)
    val_start = len(text) - n_val - n_test
    half = val_start + n_val // 2
    path = tmp_path_factory.mktemp("ddp-corpus") / "ddp.txt"
    path.write_text(text[:half] + text[half:val_start + n_val].upper() + text[val_start + n_val:], encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["lstm", "lstm-bn"])
def ddp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ddp_corpus: Path) -> DDPRun:
    """One 2-process run per cell: ``lstm`` (native kernel) and ``lstm-bn``, whose per-step running
    statistics grow (new tensors) after DDP wrapped the model; DDP re-reads the buffers before each
    forward and broadcasts rank 0's, so both ranks validate with one set, the one the checkpoint keeps."""
    import time

    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "record_ranks.py"
    script.write_text(RECORDER, encoding="utf-8")
    args = [sys.executable, str(script), "train", "--config", "smoke", "--data", str(ddp_corpus),
            "--out", str(tmp / "runs"), "--name", "ddp", "--cell", request.param, "--accelerator", "cpu",
            "--devices", str(WORLD),
            "--strategy", "ddp", "--num-nodes", "1", "--set", "data.variable_bptt=true",
            "--set", "sample.enabled=false", "--precision", "32-true"]  # float32 sums, compared bit for bit
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=tmp, env=_clean_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own process group: rank 0 and the rank it launched
        output, _ = proc.communicate()
        pytest.fail(f"2-process DDP training did not finish in 240 s:\n{output[-3000:]}")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, output[-5000:]
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    text = ddp_corpus.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    splits = split_ids(vocab.encode(text), 0.05, 0.05)
    return DDPRun(tmp / "runs" / "ddp", output, ranks, seconds, vocab, splits.train, splits.val)


def test_ddp_run_finishes_and_reports_once(ddp_run: DDPRun) -> None:
    out = ddp_run.output
    assert [r["rank"] for r in ddp_run.ranks] == [0, 1] and {r["world_size"] for r in ddp_run.ranks} == {WORLD}
    assert {len(r["train"]) for r in ddp_run.ranks} == {STEPS}  # both ranks ran every step
    assert out.count("effective batch") == 1 and out.count("done in") == 1, out
    assert f"effective batch {BATCH * WORLD} streams x {BPTT} chars = {BATCH * WORLD * BPTT:,} chars per step" in out
    assert f"({BATCH} per process x {WORLD} processes)" in out and "lr 0.01" in out
    assert (ddp_run.run_dir / "best.ckpt").is_file() and (ddp_run.run_dir / "last.ckpt").is_file()


def test_ddp_ranks_train_on_contiguous_disjoint_streams_with_the_same_windows(ddp_run: DDPRun) -> None:
    ids = ddp_run.train_ids
    length = (ids.numel() - 1) // (BATCH * WORLD)
    assert {r["layout"]["row_length"] for r in ddp_run.ranks} == {length}
    assert {r["layout"]["batch_size"] for r in ddp_run.ranks} == {BATCH}
    assert ids.numel() - 1 - BATCH * WORLD * length < BATCH * WORLD  # the streams cover the split
    lengths = [[x.size(1) for x, _ in r["train"]] for r in ddp_run.ranks]
    assert lengths[0] == lengths[1]  # same variable-length cuts on both ranks ...
    expected = [n for _, n in window_schedule(length, BPTT, variable=True, seed=SEED, epoch=0)][:STEPS]
    assert lengths[0] == expected and len(set(expected)) > 3  # ... seeded by (seed, epoch)
    for r, rank in enumerate(ddp_run.ranks):
        x = torch.cat([x for x, _ in rank["train"]], dim=1)  # what this rank read, stream by stream
        y = torch.cat([y for _, y in rank["train"]], dim=1)
        assert x.shape == (BATCH, sum(expected))
        for i in range(BATCH):
            start = (r * BATCH + i) * length  # global stream r B + i: a block of its own
            assert torch.equal(x[i], ids[start:start + x.size(1)]), (r, i)
            assert torch.equal(y[i], ids[start + 1:start + 1 + x.size(1)]), (r, i)


def test_ddp_validation_scores_every_char_once_tail_on_the_last_rank(ddp_run: DDPRun) -> None:
    ids = ddp_run.val_ids
    inputs, targets = [], []
    for r, rank in enumerate(ddp_run.ranks):
        rows = [(x, y) for x, y, tail in rank["val"] if not tail]
        tail = [(x, y) for x, y, is_tail in rank["val"] if is_tail]
        assert bool(tail) == (r == WORLD - 1)  # the leftover characters live on the last rank only
        inputs.append(torch.cat([x for x, _ in rows], 1).reshape(-1))
        targets.append(torch.cat([y for _, y in rows], 1).reshape(-1))
        if tail:
            inputs.append(torch.cat([x for x, _ in tail], 1).reshape(-1))
            targets.append(torch.cat([y for _, y in tail], 1).reshape(-1))
    assert torch.equal(torch.cat(inputs), ids[:-1]) and torch.equal(torch.cat(targets), ids[1:])
    for v0, v1 in zip(ddp_run.ranks[0]["validations"], ddp_run.ranks[1]["validations"], strict=True):
        total = v0["chars"] + v1["chars"]
        assert total == ids.numel() - 1 and v0["chars"] != v1["chars"]
        assert v0["val_chars"] == v1["val_chars"] == total  # logged: the sum over ranks, not rank 0's
        exact = (v0["nll_sum"] + v1["nll_sum"]) / total  # summed over ranks, not a mean of rank means
        assert v0["val_loss"] == v1["val_loss"] == torch.tensor(exact, dtype=torch.float32).item()
        mean_of_means = (v0["nll_sum"] / v0["chars"] + v1["nll_sum"] / v1["chars"]) / 2
        assert abs(mean_of_means - exact) > 1e-4  # the two would be told apart (see ddp_corpus)


@torch.no_grad()
def _shard_sums(model: CharLM, ids: torch.Tensor) -> list[tuple[float, int]]:
    """Each rank's (NLL sum, chars) on ``ids``, computed here in one process, rank after rank."""
    per_rank = eval_streams(ids.numel(), EVAL_BATCH, WORLD)
    sums = []
    for rank in range(WORLD):
        layout = StreamLayout(ids, per_rank, rank=rank, world_size=WORLD, keep_tail=True)
        states: States | None = None
        nll_sum, chars = torch.zeros((), dtype=torch.float64), 0
        for window in WindowSampler(layout, BPTT):
            batch = layout.batch(window)
            nll, states = score_batch(model, batch, states)
            nll_sum += nll.to(torch.float64)  # as CharNLL.update
            chars += batch.y.numel()
        sums.append((float(nll_sum), chars))
    return sums


def test_ddp_val_loss_equals_a_single_process_evaluation_of_the_checkpoint(ddp_run: DDPRun) -> None:
    best = ddp_run.run_dir / "best.ckpt"
    model, _, cfg, ckpt = load_model(best)
    step = ckpt["global_step"]
    v0, v1 = (next(v for v in rank["validations"] if v["step"] == step) for rank in ddp_run.ranks)
    logged = v0["val_loss"]
    rows = list(csv.DictReader((ddp_run.run_dir / "metrics.csv").open()))
    assert logged in [float(r["val_loss"]) for r in rows if r.get("val_loss")]  # what metrics.csv holds
    # exact by design: the two shards evaluated here one after the other give the same sums, bit for bit
    sums = _shard_sums(model, ddp_run.val_ids)
    assert sums == [(v0["nll_sum"], v0["chars"]), (v1["nll_sum"], v1["chars"])]
    exact = sum(s for s, _ in sums) / sum(c for _, c in sums)
    assert torch.tensor(exact, dtype=torch.float32).item() == logged
    # `charlm eval` in one process with WORLD * eval_batch_size streams reads the same streams (windows
    # of bptt, 16 rows at a time: float32 sums in another order, so equal to ~1e-7, the logged float32's step)
    runner = CliRunner()
    same = runner.invoke(app, ["eval", "--checkpoint", str(best), "--split", "val", "--json",
                               "--batch-size", str(EVAL_BATCH * WORLD)])
    assert same.exit_code == 0, same.output
    result = json.loads(same.output)
    assert result["chars"] == ddp_run.val_ids.numel() - 1
    assert abs(result["loss"] - exact) < 2e-6 and abs(result["loss"] - logged) < 2e-6
    default = json.loads(runner.invoke(app, ["eval", "--checkpoint", str(best), "--split", "val", "--json"]).output)
    assert default["streams"] == EVAL_BATCH * WORLD and default["loss"] == result["loss"]  # the run's, unasked
    other = json.loads(runner.invoke(app, ["eval", "--checkpoint", str(best), "--split", "val", "--json",
                                           "--batch-size", str(EVAL_BATCH)]).output)
    assert abs(other["loss"] - exact) > 1e-5  # another stream layout is visibly another number (5x the tolerance)
    assert cfg.train.devices == WORLD and cfg.train.strategy == "ddp"  # the run's config says how it ran


def test_two_nodes_with_separate_file_systems(corpus_file: Path, tmp_path: Path) -> None:
    """``--num-nodes 2 --devices 1``, launched by hand on each "node" as on a cluster (MASTER_ADDR, MASTER_PORT,
    NODE_RANK, WORLD_SIZE), each with its own output folder: only node 0 writes, and both finish."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for node in range(2):
        env = {**_clean_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "WORLD_SIZE": "2"}
        args = [sys.executable, "-m", "charlm", "train", "--config", "smoke", "--data", str(corpus_file), "--out",
                str(tmp_path / f"node{node}"), "--name", "mn", "--accelerator", "cpu", "--devices", "1",
                "--num-nodes", "2", "--strategy", "ddp", "--max-steps", "4", "--set", "train.val_every_steps=4",
                "--set", "sample.enabled=false"]
        procs.append(subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the two-node run did not finish in 240 s")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "effective batch 16 streams" in outputs[0] and "done in" in outputs[0]
    assert "effective batch" not in outputs[1] and "done in" not in outputs[1]  # one report, from global rank 0
    assert (tmp_path / "node0" / "mn" / "best.ckpt").is_file()
    assert not list((tmp_path / "node1" / "mn").glob("*.ckpt"))  # other nodes write no checkpoint
    rows = list(csv.DictReader((tmp_path / "node0" / "mn" / "metrics.csv").open()))
    text = corpus_file.read_text(encoding="utf-8")
    n_val = split_ids(Vocab.from_text(text).encode(text), 0.05, 0.05).val.numel()
    assert [float(r["val_chars"]) for r in rows if r.get("val_chars")] == [n_val - 1]


# --------------------------------------------------------------------------------- precision / GPU
def test_bf16_mixed_trains_on_cpu_and_validates_in_float32(corpus_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", "smoke", "--data", str(corpus_file), "--out",
                                      str(tmp_path), "--name", "bf16", "--accelerator", "cpu", "--precision",
                                      "bf16-mixed", "--max-steps", "6", "--set", "train.val_every_steps=6",
                                      "--set", "sample.enabled=false"])
    assert result.exit_code == 0, result.output
    assert "precision bf16-mixed" in result.output
    run = tmp_path / "bf16"
    logged = [float(r["val_loss"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val_loss")]
    assert len(logged) == 1 and math.isfinite(logged[0])
    model, vocab, _, ckpt = load_model(run / "best.ckpt")
    assert ckpt["global_step"] == 6
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed: fp32 master weights
    text = corpus_file.read_text(encoding="utf-8")
    val = split_ids(vocab.encode(text), 0.05, 0.05).val
    fp32 = evaluate_ids(model, val, batch_size=8, bptt=32)["loss"]  # the validation's streams and windows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = evaluate_ids(model, val, batch_size=8, bptt=32)["loss"]
    assert abs(logged[0] - mixed) < 1e-6  # Lightning validated under bf16 autocast ...
    assert 1e-6 < abs(logged[0] - fp32) < 0.02  # ... visibly not in fp32, yet close to it


def test_eval_under_autocast_scores_in_float32(trained_run: Path) -> None:
    from charlm.data.streams import Batch

    model, vocab, _, _ = load_model(trained_run / "best.ckpt")
    ids = vocab.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 4)
    batch = Batch(ids[:-1].view(1, -1), ids[1:].view(1, -1))
    with torch.no_grad():
        full, _ = score_batch(model, batch, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(batch.x).logits.dtype == torch.bfloat16  # autocast is really on
            mixed, _ = score_batch(model, batch, None)
    assert full.dtype == mixed.dtype == torch.float32  # cross-entropy of float32 logits
    assert abs(float(mixed) - float(full)) / batch.y.numel() < 0.02


def test_gpu_benchmark_says_clearly_that_it_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--seconds", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert "needs a CUDA GPU and none is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_benchmark_runs_on_the_cpu_with_cpu_check(corpus_file: Path, tmp_path: Path) -> None:
    """``--cpu-check`` runs the benchmark's whole path (charlm through ``build_trainer``, the plain loop, the table
    and the JSON) on the CPU, at a size that takes seconds."""
    out = tmp_path / "gpu.json"
    small = [f"--set={s}" for s in ("model.num_layers=1", "model.hidden_size=16", "model.embedding_size=16",
                                     "data.batch_size=4", "data.eval_batch_size=4", "data.bptt=16")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu-check", "--seconds", "2", "--warmup-steps",
                           "2", "--data", str(corpus_file), "--json", str(out), *small], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert [r["system"].split()[0] for r in rows] == ["charlm", "plain"]
    assert all(math.isfinite(r["val_loss"]) and r["steps"] > 0 for r in rows)
