"""Sampling speed: charlm's generation loop against a plain loop a user writes by hand, with the same weights.

    python -m benchmarks.sampling                          # lstm, gru, peephole, lstm-ln, mogrifier; 1 and 16 streams
    python -m benchmarks.sampling --threads 1,2 --repeats 9 --out benchmarks/results/sampling.json

Each model is a random-init model of the default config (its shape: 2 x 384, tied weights; 65 characters).
The prime is read as one sequence (one ``model(prime)`` forward), then charlm draws as ``charlm sample`` does
(a :class:`charlm.generation.continuation.Continuation`: where the fused C++ route of
:mod:`charlm.model.fused_step` takes the model, runs of characters drawn and stepped per call; else ``pick`` and
one step through the ATen op of :mod:`charlm.model.fast_step`, or in Python); the ``route`` column says which.
The reference is the loop a user writes by hand: embedding -> nn.LSTMCell -> nn.LSTMCell -> nn.Linear -> the
same ``pick``, loaded with the same weights (nn.GRUCell for ``gru``; nn.LSTMCell for ``peephole`` too: a fresh
peephole LSTM has zero peepholes, so it computes the same thing). A cell torch has no module for (the other
LSTM variants, ``lstm-ln``, ``mogrifier``) is stepped by hand in plain torch ops, as charlm's Python step
(``CharLM.step``) does. ``charlm (python)`` is charlm with its C++ code turned off: pick and the Python step.
The header names the CPU and the features its kernels use. The rows take turns,
one chunk of ``--length`` characters each per repeat, so a busy machine slows them alike; the figures are
the medians over the repeats and the ratio's spread is its range over the repeats. ``--clock cpu`` times
with the process's CPU time instead of the wall clock: on a machine shared with other work, the time this
process computed rather than the time it waited for a core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.machine import describe_cpu
from charlm.config import load_config
from charlm.generation.continuation import Continuation, read_prime
from charlm.generation.options import pick
from charlm.model import fast_step, fused_step
from charlm.model.char_lm import CharLM
from charlm.native.build import cpp_off

VOCAB = 65
PRIME = torch.tensor([30, 27, 25, 17, 27, 10])  # "ROMEO:" in tiny Shakespeare's vocabulary
TEMPERATURE = 0.8
Loop = Callable[[int], None]


TORCH_CELLS = {"lstm": nn.LSTMCell, "lstm-b": nn.LSTMCell, "np": nn.LSTMCell, "peephole": nn.LSTMCell,
               "gru": nn.GRUCell}  # the cells torch has a module for (a fresh peephole LSTM: zero peepholes)


class PlainLoop(nn.Module):
    """embedding -> one torch cell per layer -> decoder, stepped by hand, with ``model``'s weights."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        kind = TORCH_CELLS[model.config.cell]
        self.cells = nn.ModuleList()
        for layer in model.layers:
            cell = kind(layer.input_size, layer.hidden_size)
            weights = {k.removesuffix("_l0"): v for k, v in layer.state_dict().items() if k != "peephole_l0"}
            cell.load_state_dict(weights)
            self.cells.append(cell)

    def step(self, x: Tensor, states: list[Tensor | tuple[Tensor, Tensor] | None]) -> Tensor:
        h = self.encoder(x)
        for i, cell in enumerate(self.cells):
            states[i] = cell(h, states[i])
            out = states[i]
            h = out[0] if isinstance(out, tuple) else out
        return self.decoder(h)


def charlm_loop(model: CharLM, streams: int, seed: int, fast: bool) -> Loop:
    """What ``charlm sample`` runs: the prime read as one sequence, then a Continuation's draws (runs of
    characters per C++ call where the fused route takes the model, else pick + CharLM.step)."""
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def run(length: int) -> None:
        with nullcontext() if fast else cpp_off():
            logits, states = read_prime(model, PRIME, streams)
            for _ in Continuation(model, logits, states, length, temperature=TEMPERATURE, top_k=None, top_p=None,
                                  generator=gen):
                pass

    return run


class PythonStepLoop:
    """A cell torch has no module for, stepped by hand in plain torch ops: the model's own Python step."""

    def __init__(self, model: CharLM) -> None:
        self.model = model
        self.cells = model.layers

    def step(self, x: Tensor, states: list[Tensor | tuple[Tensor, Tensor] | None]) -> Tensor:
        with cpp_off():
            logits, new = self.model.step(x, None if states[0] is None else states)  # type: ignore[arg-type]
        states[:] = new
        return logits


def plain_loop(plain: PlainLoop | PythonStepLoop, streams: int, seed: int) -> Loop:
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def run(length: int) -> None:
        states: list[Tensor | tuple[Tensor, Tensor] | None] = [None] * len(plain.cells)
        logits = torch.empty(0)
        for char in PRIME.tolist():
            logits = plain.step(torch.full((streams,), char), states)
        for _ in range(length):
            logits = plain.step(pick(logits, TEMPERATURE, None, gen), states)

    return run


def measure(cell: str, streams: int, length: int, repeats: int, clock: Callable[[], float]) -> dict[str, object]:
    torch.manual_seed(0)
    model = CharLM(VOCAB, load_config("default", [f"model.cell={cell}"]).model).eval()
    plain = PlainLoop(model).eval() if cell in TORCH_CELLS else PythonStepLoop(model)
    loops = {"plain": plain_loop(plain, streams, 0),
             "python": charlm_loop(model, streams, 0, fast=False),
             "charlm": charlm_loop(model, streams, 0, fast=True)}
    for loop in loops.values():
        loop(20)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            start = clock()
            loop(length)
            times[name].append(clock() - start)
    ratios = [p / c for p, c in zip(times["plain"], times["charlm"], strict=True)]
    rate = {name: streams * length / statistics.median(t) for name, t in times.items()}
    return {"cell": cell, "streams": streams, "threads": torch.get_num_threads(),
            "route": route(model, streams),
            "plain_chars_per_s": rate["plain"], "python_chars_per_s": rate["python"],
            "charlm_chars_per_s": rate["charlm"], "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def route(model: CharLM, streams: int) -> str:
    """Which C++ route charlm's loop takes for this model and stream count."""
    if streams <= fused_step.MAX_ROWS and fused_step.packed(model, fast_step.available) is not None:
        return "fused"
    return "aten op" if fast_step.plan_for(model) is not None and fast_step.available() else "python"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="lstm,gru,peephole,lstm-ln,mogrifier")
    ap.add_argument("--streams", default="1,16", help="comma-separated stream counts")
    ap.add_argument("--threads", default="2", help="comma-separated torch thread counts, one table each")
    ap.add_argument("--length", type=int, default=300, help="characters per timed chunk")
    ap.add_argument("--repeats", type=int, default=7, help="timed chunks per row, taking turns")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (on a shared machine: the work, not the waits)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # as charlm.training.fit.fast_cpu_math does, for every row alike
    fast_step.available()  # build (or load) the op before anything is timed
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    machine = describe_cpu()
    if not args.json:
        shape = load_config("default").model
        print(f"# {machine}; default config ({shape.num_layers} x {shape.hidden_size}, tied), random init, "
              f"temperature {TEMPERATURE}, prime read "
              f"as one sequence; median of {args.repeats} chunks of {args.length} chars, taking turns, "
              f"{args.clock} clock; torch {torch.__version__}")
        print(f"{'cell':<9} {'streams':>7} {'threads':>7} {'plain loop':>10} {'charlm (python)':>15} "
              f"{'charlm':>9} {'vs plain':>8} {'spread':>11}  route", flush=True)
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for cell in args.cells.split(","):
            for streams in (int(s) for s in args.streams.split(",")):
                r = measure(cell.strip(), streams, args.length, args.repeats, clock)
                results.append(r)
                if not args.json:  # each row as it comes: a long run cut short keeps what it measured
                    print(f"{r['cell']:<9} {r['streams']:>7} {r['threads']:>7} {r['plain_chars_per_s']:>10,.0f} "
                          f"{r['python_chars_per_s']:>15,.0f} {r['charlm_chars_per_s']:>9,.0f} {r['ratio']:>8.2f} "
                          f"{r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f}  {r['route']}", flush=True)
    report = {"machine": machine, "torch": torch.__version__, "clock": args.clock, "length": args.length,
              "repeats": args.repeats, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("chars/s = streams x characters / second; vs plain = charlm / plain loop, per repeat, median")


if __name__ == "__main__":
    main()
