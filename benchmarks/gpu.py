"""The GPU path, measured: charlm's AWD-LSTM recipe against a plain cuDNN ``nn.LSTM`` loop, same run.

    python -m benchmarks.gpu                                  # configs/awd-lstm.yaml, 300 s per system
    python -m benchmarks.gpu --seconds 120 --json gpu.json
    python -m benchmarks.gpu --set model.cell=peephole --set model.compile=true   # torch.compile'd cell
    python -m benchmarks.gpu --plain-fp32                      # also the plain loop without autocast

charlm trains through Lightning exactly as ``charlm train`` does (the config's precision, bf16-mixed for
``awd-lstm``; the native LSTM kernel is cuDNN, weight drop included; batches pinned), for a fixed wall
clock. The plain loop (``benchmarks.baseline.train_plain``: Embedding -> nn.LSTM -> Linear, Adam, the
whole split on the GPU) gets the same hidden size, layers, batch, bptt and time, under the same
autocast. For each it records training chars/s (warm-up steps and validations not counted), peak GPU
memory (``torch.cuda.max_memory_allocated``) and the exact validation loss reached, both scored the
same way (same streams, fp32).

Without a CUDA device it exits with code 2 and says so; nothing is measured on CPU here.
``--cpu-check`` runs the same code on the CPU (use ``--config smoke --seconds 5``) only to check the
script where no GPU is at hand; its figures mean nothing (peak memory is not tracked there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _no_cuda_message() -> str:
    return (f"benchmarks/gpu.py needs a CUDA GPU and none is visible (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none: this is a CPU-only torch'}). Run it on a machine with an NVIDIA GPU "
            "and a CUDA build of PyTorch; for CPU figures use benchmarks/throughput.py.")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="awd-lstm", help="charlm config (name in configs/ or a YAML file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, as `charlm train --set`")
    p.add_argument("--seconds", type=float, default=300.0, help="training wall clock per system")
    p.add_argument("--warmup-steps", type=int, default=20, help="first steps left out of the chars/s figure")
    p.add_argument("--data", default=None, help="corpus file (default: the config's, i.e. tiny Shakespeare)")
    p.add_argument("--plain-fp32", action="store_true", help="also run the plain loop without autocast")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--cpu-check", action="store_true",
                   help="run the same code on the CPU to check the script (no meaningful figures)")
    return p.parse_args(argv)


def _autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype Lightning uses for ``precision`` (bf16-mixed, 16-mixed), else None."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def run_charlm(args: argparse.Namespace, out_dir: Path, cuda: bool = True) -> dict[str, Any]:
    """Train charlm for ``args.seconds`` on one GPU; speed, peak memory and the val loss reached."""
    import lightning as L

    from charlm.config import load_config
    from charlm.data.datamodule import CharDataModule
    from charlm.evaluation.scoring import evaluate_ids
    from charlm.model.char_lm import count_parameters
    from charlm.training.fit import build_trainer, quiet_lightning
    from charlm.training.lightning_module import CharLMModule
    from charlm.training.precision import precision_of

    class TrainClock(L.Callback):
        """Chars/s of the training steps after the warm-up, validations left out (synchronised edges)."""

        def __init__(self, skip: int) -> None:
            self.skip, self.steps, self.chars, self.seconds = skip, 0, 0, 0.0
            self._since: float | None = None

        def _now(self) -> float:
            _sync(cuda)
            return time.perf_counter()

        def _pause(self) -> None:
            if self._since is not None:
                self.seconds += self._now() - self._since
                self._since = None

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.steps += 1
            if self.steps == self.skip:
                self._since = self._now()
            elif self.steps > self.skip and self._since is not None:
                self.chars += batch.y.numel()

        def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._pause()

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.steps >= self.skip:
                self._since = self._now()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._pause()

    overrides = [*args.overrides, f"train.max_time={args.seconds}", "train.max_steps=-1", "train.max_epochs=-1",
                 f"train.accelerator={'gpu' if cuda else 'cpu'}", "train.devices=1", "train.strategy=auto",
                 "train.num_nodes=1", "train.progress=false", "sample.enabled=false", f"train.out={out_dir}"]
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(args.data)}")
    cfg = load_config(args.config, overrides)
    quiet_lightning()
    L.seed_everything(cfg.train.seed, verbose=False)
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    module = CharLMModule(cfg.to_dict(), data.vocab.chars)
    clock = TrainClock(args.warmup_steps)
    run_dir = out_dir / "charlm"
    run_dir.mkdir(parents=True)  # the run folder that charlm train would make (metrics.csv, checkpoints)
    trainer, best = build_trainer(cfg, run_dir, extra_callbacks=[clock])
    _reset_peak(cuda)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    peak = _peak_gib(cuda)
    d = cfg.data
    final = evaluate_ids(module.model, data.splits.val, batch_size=d.eval_batch_size, bptt=d.bptt, device=module.device)
    m = cfg.model
    return {
        "system": f"charlm {m.cell} {m.num_layers}x{m.hidden_size} ({precision_of(cfg)})",
        "parameters": count_parameters(module.model), "steps": trainer.global_step, "seconds": wall,
        "chars_per_s": clock.chars / max(clock.seconds, 1e-9), "peak_memory_gib": peak,
        "val_loss": final["loss"], "val_bpc": final["bpc"],
        "best_validated_loss": None if best.best_model_score is None else float(best.best_model_score),
        "config": cfg.to_dict(),
    }


def run_plain(args: argparse.Namespace, precision: str, cuda: bool = True) -> dict[str, Any]:
    """The plain cuDNN nn.LSTM loop at the config's size, batch, bptt and time, under ``precision``."""
    from benchmarks.baseline import PlainLSTM, train_plain
    from charlm.config import load_config
    from charlm.data.datamodule import CharDataModule

    overrides = list(args.overrides) + ([f"data.path={json.dumps(args.data)}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    d, m = cfg.data, cfg.model
    data = CharDataModule(d, seed=cfg.train.seed)
    _reset_peak(cuda)
    result = train_plain(data.splits.train, data.splits.val, len(data.vocab), seconds=args.seconds,
                         hidden=m.hidden_size, layers=m.num_layers, batch=d.batch_size, bptt=d.bptt, lr=cfg.optim.lr,
                         dropout=m.dropout, seed=cfg.train.seed, device="cuda" if cuda else "cpu",
                         eval_batch=d.eval_batch_size, eval_bptt=d.bptt, autocast=_autocast_dtype(precision))
    peak = _peak_gib(cuda)
    params = sum(p.numel() for p in PlainLSTM(len(data.vocab), m.hidden_size, m.num_layers).parameters())
    return {"system": f"plain nn.LSTM {m.num_layers}x{m.hidden_size} ({precision})", "parameters": params,
            "steps": result["steps"], "seconds": result["seconds"], "chars_per_s": result["chars_per_s"],
            "peak_memory_gib": peak, "val_loss": result["val_loss"], "val_bpc": result["val_bpc"],
            "best_validated_loss": None}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    cuda = torch.cuda.is_available() and not args.cpu_check
    if not cuda and not args.cpu_check:
        print(f"error: {_no_cuda_message()}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    from charlm.config import load_config

    console = Console()
    from charlm.training.precision import precision_of

    # what charlm's own run trains in (train.precision: auto resolved), so that the plain loop runs in it too
    precision = precision_of(load_config(args.config, [*args.overrides,
                                                       f"train.accelerator={'gpu' if cuda else 'cpu'}"]))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        name, memory = props.name, props.total_memory / 2**30
    else:
        name, memory = "CPU (--cpu-check: these figures are not GPU figures)", float("nan")
    env = {"device": name, "memory_gib": memory, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None, "seconds_each": args.seconds}
    console.print(f"[bold]{name}[/], torch {torch.__version__}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
                  f"{args.seconds:g} s per system")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run_charlm(args, Path(tmp), cuda))
    if cuda:
        torch.cuda.empty_cache()
    rows.append(run_plain(args, precision, cuda))
    if args.plain_fp32 and precision != "32-true":
        if cuda:
            torch.cuda.empty_cache()
        rows.append(run_plain(args, "32-true", cuda))
    table = Table("system", "params", "steps", "chars/s", "peak GiB", "val loss", "val bpc",
                  title=f"{name}: {args.seconds:g} s each, val = exact loss over the whole split")
    for r in rows:
        table.add_row(r["system"], f"{r['parameters']:,}", f"{r['steps']:,}", f"{r['chars_per_s']:,.0f}",
                      f"{r['peak_memory_gib']:.2f}", f"{r['val_loss']:.4f}", f"{r['val_bpc']:.4f}")
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=2), encoding="utf-8")
        console.print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
