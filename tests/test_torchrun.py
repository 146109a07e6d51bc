"""Beyond one machine, rehearsed on one (issue #30, 14): two ``torchrun --nnodes 2 --nproc-per-node 1
--node-rank 0|1 --master-addr 127.0.0.1`` launches of ``charlm train --config smoke`` (CPU, gloo, a free port
of localhost) make one run folder, written by global rank 0 alone; they validate as the 2-process DDP run of
one node does, and the run resumed through torchrun goes on as that run did."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_env

COMMON = ["--config", "smoke", "--accelerator", "cpu", "--strategy", "ddp", "--set", "train.val_every_steps=4",
          "--set", "sample.enabled=false", "--set", "optim.schedule=constant"]  # (a rate that ignores the budget)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def finish(procs: list[subprocess.Popen[str]], what: str) -> list[str]:
    """Each process's output once all have ended (exit 0), or the test fails and none is left running."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)  # each launch's own session: its workers too
        pytest.fail(f"{what} did not finish in 300 s")
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(args, cwd=cwd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def torchrun(train_args: list[str], cwd: Path) -> list[str]:
    """The two nodes' launches, node 1 first (it waits for node 0's store); their outputs, node 0's first."""
    port = free_port()
    nodes = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    "-m", "charlm", "train", *train_args], cwd) for node in (1, 0)]
    return finish(nodes[::-1], "the two torchrun launches")


def val_losses(run: Path) -> list[tuple[int, float]]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_torchrun_on_two_nodes_is_the_two_process_run_and_resumes(corpus_file: Path, tmp_path: Path) -> None:
    data = ["--data", str(corpus_file)]
    one_node = start([sys.executable, "-m", "charlm", "train", *COMMON, *data, "--out", str(tmp_path / "one-node"),
                      "--name", "ddp", "--devices", "2", "--max-steps", "12"], tmp_path)
    finish([one_node], "the 2-process run of one node")
    reference = tmp_path / "one-node" / "ddp"

    runs = tmp_path / "runs"  # one file system for both "nodes", as a cluster's shared home
    node0, node1 = torchrun([*COMMON, *data, "--out", str(runs), "--name", "tr", "--devices", "1", "--num-nodes",
                             "2", "--max-steps", "8"], tmp_path)
    run = runs / "tr"
    assert "effective batch 16 streams x 32 chars" in node0 and "(8 per process x 2 processes)" in node0
    assert "done in" in node0 and "done in" not in node1 and "effective batch" not in node1  # rank 0 reports
    assert sorted(p.name for p in runs.iterdir()) == ["tr"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.ckpt", "config.yaml", "last.ckpt", "metrics.csv"]
    assert torch.load(run / "last.ckpt", weights_only=True)["resume_state"]["world_size"] == 2

    node0, node1 = torchrun(["--resume", str(run / "last.ckpt"), "--max-steps", "12"], tmp_path)
    assert "resuming from" in " ".join(node0.split()) and "done in" not in node1
    assert [s for s, _ in val_losses(run)] == [3, 7, 11]
    assert val_losses(run) == val_losses(reference)
    ours, theirs = weights(run / "last.ckpt"), weights(reference / "last.ckpt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 12
