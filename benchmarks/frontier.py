"""The frontier: best validation bpc per CPU-minute, charlm against a plain nn.LSTM and a transformer.

    python -m benchmarks.frontier --budgets 2,5,15                 # every system at 2, 5 and 15 minutes
    python -m benchmarks.frontier --budgets 2,5,15 --jobs 2        # two runs at a time, one thread each
    python -m benchmarks.frontier --budgets 0.2 --systems charlm,transformer --out /tmp/f   # a quick check
    python -m benchmarks.frontier --budgets 2,5,15 --tune --jobs 2 --resume   # after a stop: only the runs missing
    python -m benchmarks.frontier --budgets 15 --carry 5 --jobs 2   # each system's 5-minute winner, given 15

Every system trains on the same 90 % split of the same corpus for the same wall time and is scored by
the same code (:func:`charlm.evaluation.scoring.evaluate_ids`, every character of the 5 % validation split once):

- ``charlm``: ``charlm train`` with the default recipe (an LSTM), sized per budget (``CHARLM_SIZES``);
- ``mogrifier``, ``mingru``, ``minlstm``, ``slstm``: the same recipe and candidates with ``model.cell`` set to
  that cell (``CELL_SYSTEMS``);
- ``plain``: the hand-written nn.LSTM of ``benchmarks/baseline.py`` (Adam, no schedule), sized per budget
  (``PLAIN_SIZES``);
- ``transformer``: the nanoGPT-style decoder of ``benchmarks/transformer.py``, sized per budget
  (``TRANSFORMER_SIZES``).

The candidates per budget are written below (``CHARLM_SIZES``, ``PLAIN_SIZES``, ``TRANSFORMER_SIZES``), three
per system and budget; ``--tune`` runs them all, for every system alike, and keeps the best of each, the others
listed as the tuning's record (``benchmarks/results/frontier/frontier.md``); without it each system runs its
first. A candidate whose training diverged (charlm stops on a non-finite loss or gradient) is kept as a row that
says so and loses to every finite one. Prints a table, writes ``frontier.json`` (as each run finishes) and
``frontier.png`` (val bpc against minutes, log x; needs matplotlib) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import train_plain
from benchmarks.transformer import TransformerConfig, train_transformer
from charlm.config import load_config
from charlm.data.datamodule import CharDataModule
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.checkpoint import load_model
from charlm.training.fit import train
from charlm.util.errors import TrainingDiverged

# Each table: minutes at most -> the candidates for that budget, the first of them the pick (the smallest budget
# that fits is used). Without --tune only the pick runs; with --tune every candidate runs and the best is the
# figure, the others are kept as the tuning's record. charlm validates once, after its budget (as the other
# systems do), rather than every few hundred steps inside it.
ONCE = "train.val_every_steps=1000000"
NO_DROPOUT = ["model.dropout=0", "model.dropouth=0", "model.dropoute=0", "model.weight_drop=0"]


def _charlm(width: int, lr: float, dropout: bool = False) -> list[str]:
    """A charlm candidate: 2 layers of ``width`` (tied embedding), AdamW at ``lr``; the default's
    regularizers where ``dropout``, none of them otherwise."""
    return [f"model.hidden_size={width}", f"model.embedding_size={width}", f"optim.lr={lr:g}",
            *([] if dropout else NO_DROPOUT), ONCE]


def _gpt(layers: int, width: int, lr: float) -> TransformerConfig:
    return TransformerConfig(layers=layers, width=width, heads=width // 32, block=128, lr=lr)


@dataclass(frozen=True)
class PlainConfig:
    """A candidate of the plain nn.LSTM (``benchmarks/baseline.py``): its size and Adam's learning rate."""

    layers: int = 2
    hidden: int = 256
    lr: float = 2e-3


CHARLM_SIZES: list[tuple[float, list[list[str]]]] = [
    (3, [_charlm(128, 2e-2), _charlm(128, 3e-2), _charlm(192, 3e-2)]),
    (8, [_charlm(192, 2e-2), _charlm(128, 2e-2), _charlm(256, 1e-2)]),
    (float("inf"), [_charlm(256, 1e-2, dropout=True), _charlm(192, 2e-2), _charlm(192, 2e-2, dropout=True)]),
]
# The plain nn.LSTM: first the baseline as it always ran (2 x 256, Adam 2e-3), then charlm's sizes at the higher
# rates that won charlm's grid at these budgets (a constant rate, so a notch lower than charlm's peak).
PLAIN_SIZES: list[tuple[float, list[PlainConfig]]] = [
    (3, [PlainConfig(), PlainConfig(hidden=128, lr=1e-2), PlainConfig(hidden=128, lr=2e-2)]),
    (8, [PlainConfig(), PlainConfig(hidden=192, lr=1e-2), PlainConfig(hidden=128, lr=1e-2)]),
    (float("inf"), [PlainConfig(), PlainConfig(hidden=256, lr=5e-3), PlainConfig(hidden=192, lr=1e-2)]),
]
TRANSFORMER_SIZES: list[tuple[float, list[TransformerConfig]]] = [
    (3, [_gpt(2, 128, 4e-3), _gpt(3, 128, 4e-3), _gpt(2, 128, 8e-3)]),
    (8, [_gpt(4, 128, 3e-3), _gpt(2, 128, 4e-3), _gpt(3, 128, 3e-3)]),
    (float("inf"), [_gpt(4, 192, 2e-3), _gpt(2, 128, 4e-3), _gpt(3, 128, 3e-3)]),
]
CELL_SYSTEMS = ("mogrifier", "mingru", "minlstm", "slstm")  # charlm's recipe and candidates, model.cell changed
SYSTEMS = ("charlm", *CELL_SYSTEMS, "plain", "transformer")


def sized(table: list[tuple[float, Any]], minutes: float) -> Any:
    return next(value for limit, value in table if minutes <= limit)


Spec = list[str] | PlainConfig | TransformerConfig | None  # a charlm size (overrides), a plain nn.LSTM or a
# transformer; None: the table's first
Task = tuple[str, float, Spec]  # (system, minutes, spec)


def run_charlm(minutes: float, data: CharDataModule, extra: list[str], size: list[str] | None = None
               ) -> dict[str, Any]:
    size = sized(CHARLM_SIZES, minutes)[0] if size is None else size
    overrides = [*size, *extra, f"train.max_time={minutes * 60}", "train.max_steps=-1",
                 "train.progress=false", "sample.enabled=false",
                 "train.precision=32-true"]  # float32, as the plain loop and the transformer
    cfg = load_config("default", overrides)
    m = cfg.model
    dropouts = ", no dropout" if m.dropout == m.dropouth == m.dropoute == m.weight_drop == 0 else ""
    size_text = f"{m.cell} {m.num_layers}x{m.hidden_size}, lr {cfg.optim.lr:g}{dropouts}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.out, cfg.train.name = tmp, "frontier"
        try:
            result = train(cfg)
        except TrainingDiverged as e:  # a non-finite loss or gradient stopped it: a diverged row
            return {"size": size_text, "steps": None, "parameters": None, "val_loss": None, "val_bpc": None,
                    "diverged": f"training stopped: {e.what} at step {e.step}"}
        model, _, _, _ = load_model(result.best_checkpoint)
        val = evaluate_ids(model, data.splits.val, batch_size=16, bptt=128)
    return {"size": size_text, "steps": result.steps, "parameters": result.parameters, "val_loss": val["loss"],
            "val_bpc": val["bpc"]}


def run_system(system: str, minutes: float, data: CharDataModule, base: list[str], spec: Spec = None
               ) -> dict[str, Any] | None:
    """One system trained for ``minutes``; ``base``: config overrides every charlm run gets (the corpus);
    ``spec``: a candidate to run instead of the table's pick (``--tune``)."""
    size = spec if isinstance(spec, list) else None
    if system == "charlm":
        return run_charlm(minutes, data, base, size)
    if system in CELL_SYSTEMS:
        from charlm.cells.registry import CELLS

        return run_charlm(minutes, data, [*base, f"model.cell={system}"], size) if system in CELLS else None
    if system == "plain":
        p = spec if isinstance(spec, PlainConfig) else sized(PLAIN_SIZES, minutes)[0]
        r = train_plain(data.splits.train, data.splits.val, len(data.vocab), seconds=minutes * 60, hidden=p.hidden,
                        layers=p.layers, lr=p.lr)
        return {"size": f"nn.LSTM {p.layers}x{p.hidden}, lr {p.lr:g}", "steps": int(r["steps"]),
                "parameters": int(r["parameters"]), "val_loss": r["val_loss"], "val_bpc": r["val_bpc"]}
    c = spec if isinstance(spec, TransformerConfig) else sized(TRANSFORMER_SIZES, minutes)[0]
    r = train_transformer(data.splits.train, data.splits.val, len(data.vocab), c, seconds=minutes * 60)
    return {"size": f"{c.layers}x{c.width}, {c.heads} heads, block {c.block}, lr {c.lr:g}", "steps": int(r["steps"]),
            "parameters": int(r["parameters"]), "val_loss": r["val_loss"], "val_bpc": r["val_bpc"]}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_task(task: Task, base: list[str], data: CharDataModule | None = None) -> dict[str, Any] | None:
    """One task; in a worker process (``data`` None) the corpus is read again there (a second or so).

    A charlm candidate whose training stopped on a non-finite loss or gradient (:func:`run_charlm`) is a
    result, not a failure of the whole frontier: its row says ``diverged`` with charlm's message, and its val bpc
    is None (:func:`bpc`: infinite), so any finite candidate of the system beats it."""
    system, minutes, spec = task
    spec = candidate(system, minutes, spec)  # recorded as the candidate it is
    if data is None:
        cfg = load_config("default", base)
        data = CharDataModule(cfg.data, seed=cfg.train.seed)
    result = run_system(system, minutes, data, base, spec)
    return None if result is None else {"system": system, "minutes": minutes, "spec": repr(spec), **result}


def candidate(system: str, minutes: float, spec: Spec | str) -> Spec | str:
    """``spec``, or for None the budget's pick (its table's first candidate), which is what a task without it runs."""
    return sized(candidates_of(system), minutes)[0] if spec is None else spec


def task_key(system: str, minutes: float, spec: Spec | str) -> tuple[str, float, str]:
    """What names a run in ``frontier.json`` (``--resume`` skips a task whose key is there). A task without
    ``--tune`` (spec None) runs the budget's pick, so it is named as that candidate, as is a row that an earlier
    version recorded with spec ``None``: a later ``--tune`` keeps it."""
    spec = candidate(system, minutes, None if spec == "None" else spec)
    return system, float(minutes), spec if isinstance(spec, str) else repr(spec)


def candidates_of(system: str) -> list[tuple[float, list[Any]]]:
    """The table of a system's candidates per budget: charlm's for charlm and every cell system."""
    return {"plain": PLAIN_SIZES, "transformer": TRANSFORMER_SIZES}.get(system, CHARLM_SIZES)


def tasks_for(systems: list[str], budgets: list[float], tune: bool) -> list[Task]:
    """The runs: every system at every budget; with ``tune``, every candidate of every system (three each)."""
    tasks: list[Task] = []
    for minutes in budgets:
        for system in systems:
            candidates = sized(candidates_of(system), minutes) if tune else [None]
            tasks += [(system, minutes, spec) for spec in candidates]
    return tasks


def spec_named(system: str, text: str) -> Spec:
    """The candidate of ``system`` that ``frontier.json`` names ``text`` (its ``repr``), from any budget's table."""
    for _, specs in candidates_of(system):
        for spec in specs:
            if repr(spec) == text:
                return spec
    raise ValueError(f"{system} has no candidate {text}: benchmarks/frontier.py's tables have changed since that run")


def carried_tasks(systems: list[str], budgets: list[float], recorded: list[dict[str, Any]], carry: float,
                  place: int = 1) -> list[Task]:
    """Each system once per budget, with the candidate that won at ``carry`` minutes in ``recorded`` (``--carry``):
    one run per system where ``--tune`` would take three, chosen by the same rule for every system. ``place`` 2
    takes the runner-up instead (``--carry-place``: for a system whose winner diverged when carried)."""
    ranked: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(recorded, key=bpc):
        if float(r["minutes"]) == carry and r["system"] in systems and math.isfinite(bpc(r)):
            ranked.setdefault(r["system"], []).append(r)
    missing = [s for s in systems if len(ranked.get(s, [])) < place]
    if missing:
        raise ValueError(f"no finite run at {carry:g} minutes in place {place} to carry for {', '.join(missing)}: "
                         f"run --budgets {carry:g} --tune first")
    return [(s, m, spec_named(s, ranked[s][place - 1]["spec"])) for m in budgets for s in systems]


def bpc(row: dict[str, Any]) -> float:
    """A run's val bpc; a diverged run's (None, or not finite) is infinite."""
    value = math.inf if row.get("val_bpc") is None else float(row["val_bpc"])
    return value if math.isfinite(value) else math.inf


def bpc_text(row: dict[str, Any]) -> str:
    return f"{row['val_bpc']:.4f}" if math.isfinite(bpc(row)) else "diverged"


def steps_text(row: dict[str, Any]) -> str:
    """A run's steps; none for a diverged run (its row says where it stopped)."""
    return "" if row.get("steps") is None else str(row["steps"])


def best_per_system(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the best run of each system and budget, the other runs)."""
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for r in rows:
        key = (r["system"], r["minutes"])
        if key not in best or bpc(r) < bpc(best[key]):
            best[key] = r
    kept = list(best.values())
    return kept, [r for r in rows if all(r is not k for k in kept)]


def run_all(tasks: list[Task], data: CharDataModule, base: list[str], jobs: int, done: Any,
            rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every (system, minutes) task, ``jobs`` at a time, after ``rows`` (runs already recorded); ``done(rows)``
    as each one finishes, so that a stop loses only the runs in flight.

    With ``jobs`` > 1 each run gets one thread in its own process (``spawn``: a fresh torch), and the
    longest runs start first so that the last to finish are short ones."""
    rows = list(rows or [])
    if jobs <= 1:
        for task in tasks:
            result = _run_task(task, base, data)
            if result is not None:
                rows.append(result)
                done(rows)
        return rows
    ordered = sorted(tasks, key=lambda t: -t[1])
    one_thread = [*base, "train.threads=1"]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = [pool.submit(_run_task, task, one_thread) for task in ordered]
        try:
            for future in as_completed(futures):
                result = future.result()
                if result is not None:
                    rows.append(result)
                    done(rows)
        except BaseException:
            for future in futures:
                future.cancel()  # the runs not started; the ones in flight end with their process
            raise
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for system in SYSTEMS:
        points = sorted((r["minutes"], bpc(r)) for r in rows if r["system"] == system and math.isfinite(bpc(r)))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    ax.set_xscale("log")
    budgets = sorted({r["minutes"] for r in rows})
    ax.set_xticks(budgets, [f"{m:g}" for m in budgets])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training minutes (wall time, CPU)")
    ax.set_ylabel("validation bits per character")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden under it
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2,5,15", help="comma-separated minutes")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--data", default=None, help="corpus (default: tiny Shakespeare, as `charlm data` finds it)")
    parser.add_argument("--out", default="frontier", help="folder for frontier.json and frontier.png")
    parser.add_argument("--tune", action="store_true",
                        help="run every candidate size (and lr) of every system; keep the best of each")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs --out's frontier.json already holds and run only the others")
    parser.add_argument("--carry", type=float, default=None, metavar="MINUTES",
                        help="run each system once per budget with its best candidate at MINUTES in --out's "
                             "frontier.json (implies --resume)")
    parser.add_argument("--carry-place", type=int, default=1, metavar="N",
                        help="with --carry: each system's N-th best candidate (2: the runner-up)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time; above 1 each gets one thread of its own (default: 1, torch's threads)")
    args = parser.parse_args()
    if args.carry_place < 1 or (args.carry_place > 1 and args.carry is None):
        parser.error(f"--carry-place takes a place from 1 (the winner) and goes with --carry, got {args.carry_place}")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    out = Path(args.out)
    recorded: list[dict[str, Any]] = []
    tuned = args.tune  # whether any budget in frontier.json ran every candidate
    if (args.resume or args.carry is not None) and (out / "frontier.json").is_file():
        old = json.loads((out / "frontier.json").read_text())
        recorded = old["rows"] + old["other_candidates"]  # all kept, other budgets and systems too
        tuned = tuned or bool(old.get("tune"))
    have = {task_key(r["system"], r["minutes"], r["spec"]) for r in recorded}
    try:
        planned = (tasks_for(systems, budgets, args.tune) if args.carry is None
                   else carried_tasks(systems, budgets, recorded, args.carry, args.carry_place))
    except ValueError as e:
        parser.error(str(e))
    tasks = [t for t in planned if task_key(*t) not in have]
    carried = {task_key(*t) for t in tasks} if args.carry is not None else set()  # this call's runs, if carried

    base = [] if args.data is None else [f"data.path={json.dumps(args.data)}"]
    cfg = load_config("default", base)
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    out.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    setting = f"{threads} thread{'s' if threads > 1 else ''}"
    setting += f", {args.jobs} runs at a time" if args.jobs > 1 else ""

    def save(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        for r in runs:
            if task_key(r["system"], r["minutes"], r["spec"]) in carried:  # say how the run was chosen
                r.setdefault("carried_from", args.carry)
        runs.sort(key=lambda r: (r["minutes"], SYSTEMS.index(r["system"]), bpc(r)))
        rows, tried = best_per_system(runs)
        (out / "frontier.json").write_text(json.dumps({"threads": threads, "jobs": args.jobs, "tune": tuned,
                                                       "rows": rows, "other_candidates": tried}, indent=1) + "\n")
        return rows, tried

    if recorded:
        Console().print(f"{len(recorded)} run(s) already in {out / 'frontier.json'}; {len(tasks)} to go")
    rows, tried = save(run_all(tasks, data, base, args.jobs, save, recorded))
    table = Table(title=f"val bpc at equal wall time ({setting})")
    for col in ("minutes", "system", "size", "steps", "val bpc", "best at this budget"):
        table.add_column(col)
    for minutes in budgets:
        here = [r for r in rows if r["minutes"] == minutes]
        best = min(here, key=bpc)["system"] if here else None
        for r in here:
            table.add_row(f"{minutes:g}", r["system"], r["size"], steps_text(r), bpc_text(r),
                          "★" if r["system"] == best else "")
    Console().print(table)
    if tried:
        others = Table(title="the other candidates tried (--tune)")
        for col in ("minutes", "system", "size", "steps", "val bpc"):
            others.add_column(col)
        for r in tried:
            others.add_row(f"{r['minutes']:g}", r["system"], r["size"], steps_text(r), bpc_text(r))
        Console().print(others)
    if not plot(rows, out / "frontier.png"):
        Console().print("matplotlib is not installed: no frontier.png (pip install \"charlm[plot]\")")


if __name__ == "__main__":
    main()
