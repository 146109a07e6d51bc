"""Training throughput of every cell against native nn.LSTM of the same size, in one run.

Each model is a small char LM (embedding -> recurrent layers -> linear decoder) trained with
AdamW on random characters (or windows of a real text file with --data). The models take turns,
one training step each, so a busy shared CPU slows them all alike; the figure per model is the
median step time over --steps steps after --warmup steps (``--stat min`` takes the fastest step
instead, the better estimate when other jobs share the CPU).

    python benchmarks/cells.py                                  # every cell at the default config's shape
    python benchmarks/cells.py --cells lstm,gru --steps 5       # a quick look
    python benchmarks/cells.py --cells lstm,mingru,minlstm,slstm --match-params   # at nn.LSTM's parameter count

Besides chars/s and its ratio to ``nn.LSTM``, each row's speed is given per FLOP (``per FLOP``): its training FLOPs
per character (3 x 2 multiply-adds per weight of every matrix but the embedding, used once per character:
forward, and the two products of the backward; a factorised Mogrifier round at its full size, as the step
multiplies by it) times its chars/s, over ``nn.LSTM``'s. Cells of different widths
or gate counts then compare by how fast they do their arithmetic, and ``--match-params`` gives every row the
hidden size whose model has the parameter count nearest ``nn.LSTM``'s at ``--hidden`` (equal parameters: about
equal FLOPs too), as ``charlm compare --match-params`` does.

Extra rows, the steps from a textbook loop to the engine's custom LSTM path:
``lstm[naive]`` (autograd; per step: ``x[:, t]``, its own input matmul, chunk, five activations),
``lstm[autograd]`` (the engine's generic loop: one input projection for all steps, ``unbind``,
``addmm``), ``lstm[compile]`` (that loop with the step through ``torch.compile``, as
``model.compile=true`` runs it; the first warm-up step pays the compilation), ``lstm[no-onednn]`` (the
hand-written forward/backward-through-time kernel with PyTorch's own matmuls), ``lstm[custom]`` (that
kernel with oneDNN's products, as charlm runs it). ``lstm-ln[python]`` / ``lstm-bn[python]`` run the
normalised LSTMs' Python kernel instead of their C++ one (path ``c++``, :mod:`charlm.cells.norm_lstm_cpp`).
``mingru`` and ``minlstm`` train by a parallel scan over the window (path ``scan``,
:mod:`charlm.cells.min_rnn`), ``slstm`` by the autograd loop.
``CELL[key=value,...]`` sets the cell's own config keys (``model.CELL_key``): ``mogrifier[rank=32]``,
``mogrifier[rounds=0]`` (``mogrifier`` alone: the config's defaults).
``nn.LSTM`` is the reference; ``CELL[autograd]`` runs any cell with a kernel through the engine's
autograd loop instead. ``gru`` trains through its hand-written kernel on a CPU (``CellSpec.kernel_first_on_cpu``);
``gru[aten]`` runs nn.GRU's ATen op instead. The shape is the default config's (``configs/default.yaml``:
2 x 384, batch 32, bptt 128) unless ``--hidden`` / ``--layers`` / ``--batch`` / ``--bptt`` say otherwise. The
header names the CPU, its features and torch's capability. Paths: ``torch`` (a torch RNN kernel: nn.LSTM's
ATen op), ``kernel`` (a hand-written forward/backward-through-time kernel), ``c++``, ``scan``, ``compiled``,
``autograd``, ``naive``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe_cpu
from charlm.cells import norm_lstm_cpp
from charlm.cells.onednn_matmul import onednn_off
from charlm.cells.registry import CELLS
from charlm.config import load_config
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.native.build import cpp_off

REFERENCE = "nn.LSTM"
NORM_CELLS = ("lstm-ln", "lstm-bn")  # the cells with a C++ kernel


class NaiveLSTM(nn.Module):
    """The textbook Python LSTM loop, for the speed ablation only (same math as nn.LSTM)."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.cells = nn.ModuleList(nn.LSTMCell(hidden, hidden) for _ in range(layers))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        for cell in self.cells:
            h = x.new_zeros(x.shape[0], cell.hidden_size)
            c = torch.zeros_like(h)
            outs = []
            for t in range(x.shape[1]):
                gates = x[:, t] @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh
                i, f, g, o = gates.chunk(4, 1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            x = torch.stack(outs, 1)
        return x, None


class Stack(nn.Module):
    """``layers`` RecurrentLayers of one cell, hidden -> hidden, run one after another."""

    def __init__(self, cell: str, hidden: int, layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RecurrentLayer(cell, hidden, hidden, **layer_kwargs) for _ in range(layers))

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        for layer in self.layers:
            x, _ = layer(x)
        return x, None


class CharLM(nn.Module):
    """Embedding -> recurrent layers -> linear decoder."""

    def __init__(self, rnn: nn.Module, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = rnn
        self.decode = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(self.embed(x))[0]
        return self.decode(out)


def build(row: str, args: argparse.Namespace, hidden: int | None = None) -> tuple[nn.Module, str]:
    """The model for one table row (at ``hidden``, default ``--hidden``) and a word on which path it runs."""
    h, layers = hidden or args.hidden, args.layers
    if row == REFERENCE:
        return CharLM(nn.LSTM(h, h, layers, batch_first=True), args.vocab, h), "torch"
    if row == "lstm[naive]":
        return CharLM(NaiveLSTM(h, layers), args.vocab, h), "naive"
    cell, _, variant = row.partition("[")
    # [key=value,...]: the cell's own config keys, model.<cell>_<key> (mogrifier[rank=32]); else their defaults
    pairs = [o.partition("=") for o in variant.rstrip("]").split(",") if "=" in o]
    options = {f"{cell}_{k}": int(v) for k, _, v in pairs}
    if options:
        variant = ""
    stack = Stack(cell, h, layers, torch_rnn=variant in ("", "aten]"), compile=variant == "compile]",
                  cell_options=options)
    for layer in stack.layers:
        layer.cell.kernel_on = variant not in ("autograd]", "compile]")
        layer.kernel_first_on_cpu &= variant != "aten]"
    first = stack.layers[0]
    rows = torch.empty(args.batch, 1, h, device="cpu")  # float32 outside autocast, as the rows run
    kernel = not first.runs_torch_rnn(rows) and first.cell.uses_kernel(rows)
    compiled = first.cell.step_compiled
    scan = hasattr(first.cell, "scan_terms")  # the min cells' parallel scan (charlm.cells.min_rnn)
    path = "torch" if first.runs_torch_rnn(rows) else "kernel" if kernel else "scan" if scan else (
        "compiled" if compiled else "autograd")
    if kernel and cell in NORM_CELLS and variant != "python]" and norm_lstm_cpp.available():
        path = "c++"
    return CharLM(stack, args.vocab, h), path


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_char(model: nn.Module) -> int:
    """Multiply-adds per character of one forward step through the model's weight matrices: every 2-D
    parameter but the embedding's (a row lookup), a factorised Mogrifier round counted at its full size (the
    step multiplies by the product of its factors). Training costs about three times this, for every row."""
    total = 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or name.startswith("embed"):
            continue
        if name.endswith("_left_l0"):  # a Mogrifier round's factors: its full matrix, once
            right = dict(model.named_parameters())[name.replace("_left_l0", "_right_l0")]
            total += p.shape[0] * right.shape[1]
        elif not name.endswith("_right_l0"):
            total += p.numel()
    return total


def train_flops_per_char(model: nn.Module) -> int:
    """Training FLOPs per character: 3 x 2 per multiply-add of :func:`macs_per_char`, each weight used once per
    character by the forward product and by the backward's two (its input's gradient and its own)."""
    return 6 * macs_per_char(model)


def matched_hidden(row: str, args: argparse.Namespace, target: int) -> int:
    """The hidden size whose model for ``row`` has the parameter count nearest ``target`` (ties: the smaller),
    counted on the meta device (nothing allocated)."""
    def count(h: int) -> int:
        with torch.device("meta"):
            return parameter_count(build(row, args, h)[0])

    lo, hi = 1, max(2, args.hidden)
    while count(hi) < target:
        hi *= 2
    while lo < hi:  # the smallest size with at least the target count
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    return lo - 1 if lo > 1 and target - count(lo - 1) <= count(lo) - target else lo


def switch_off(row: str) -> AbstractContextManager[None]:
    """What a row runs without: oneDNN's products (``[no-onednn]``) or the C++ kernel (``[python]``)."""
    if row.endswith("[no-onednn]"):
        return onednn_off()
    return cpp_off() if row.endswith("[python]") else nullcontext()


def batches(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    if args.data:
        text = Path(args.data).read_text(encoding="utf-8")
        vocab = sorted(set(text))
        ids = torch.tensor([vocab.index(ch) for ch in text[: 200_000]])
        args.vocab = len(vocab)
        start = torch.randint(0, ids.numel() - args.bptt - 1, (args.batch,), generator=g)
        window = torch.stack([ids[s : s + args.bptt + 1] for s in start.tolist()])
        return window[:, :-1], window[:, 1:]
    x = torch.randint(0, args.vocab, (args.batch, args.bptt + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="all", help="comma-separated rows (default: all)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    default = load_config("default")
    ap.add_argument("--hidden", type=int, default=default.model.hidden_size)
    ap.add_argument("--layers", type=int, default=default.model.num_layers)
    ap.add_argument("--batch", type=int, default=default.data.batch_size)
    ap.add_argument("--bptt", type=int, default=default.data.bptt)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--data", default="", help="train on windows of this text file instead of random chars")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="step time per model")
    ap.add_argument("--match-params", action="store_true",
                    help="give each row the hidden size nearest nn.LSTM's parameter count at --hidden")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `charlm train` does, for every row alike
    torch.manual_seed(0)

    if args.cells == "all":
        rows = ["lstm[naive]", "lstm[autograd]", "lstm[compile]", "lstm[no-onednn]", "lstm[custom]", *CELLS,
                "mogrifier[rank=32]",
                *(f"{cell}[python]" for cell in NORM_CELLS)]
    else:
        rows = [c.strip() for c in args.cells.split(",") if c.strip()]
    rows = [REFERENCE, *[r for r in rows if r != REFERENCE]]
    x, y = batches(args)
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer, str]] = {}
    target = parameter_count(build(REFERENCE, args)[0])
    for row in rows:
        hidden = matched_hidden(row, args, target) if args.match_params and row != REFERENCE else args.hidden
        model, path = build(row, args, hidden)
        models[row] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), path)
    times: dict[str, list[float]] = {row: [] for row in rows}
    loss_fn = nn.CrossEntropyLoss()
    for it in range(args.warmup + args.steps):
        for row, (model, opt, _) in models.items():
            t0 = time.perf_counter()
            with switch_off(row):
                loss = loss_fn(model(x).reshape(-1, args.vocab), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            if it >= args.warmup:
                times[row].append(time.perf_counter() - t0)
    chars = args.batch * args.bptt
    stat = statistics.median if args.stat == "median" else min
    ref = chars / stat(times[REFERENCE])
    ref_flops = ref * train_flops_per_char(models[REFERENCE][0])
    matched = ", hidden sizes matched to nn.LSTM's parameter count" if args.match_params else ""
    print(
        f"# {describe_cpu()}; {args.layers} x {args.hidden}{matched}, batch {args.batch}, bptt {args.bptt}, "
        f"{torch.get_num_threads()} threads, {args.stat} of {args.steps} timed steps, torch {torch.__version__}"
    )
    print(f"{'cell':<20} {'path':<8} {'hidden':>6} {'params':>9} {'chars/s':>9} {'vs nn.LSTM':>10} {'per FLOP':>8}")
    for row, (model, _, path) in models.items():
        rate = chars / stat(times[row])
        hidden = model.embed.embedding_dim
        per_flop = rate * train_flops_per_char(model) / ref_flops
        print(f"{row:<20} {path:<8} {hidden:>6} {parameter_count(model):>9,} {rate:>9,.0f} {rate / ref:>10.2f} "
              f"{per_flop:>8.2f}")


if __name__ == "__main__":
    main()
