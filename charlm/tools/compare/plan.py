"""What a comparison trains: its cells (``--cells`` or a paper's preset), seeds and budget, the hidden sizes
that match parameter counts (``--match-params``), and one planned run per (cell, seed).

Matched parameters: the first cell is the reference at the configured ``model.hidden_size``; every other
cell gets the hidden size whose total parameter count (embedding, recurrent layers, decoder) is nearest
the reference's, ties going to the smaller size. The count grows with the hidden size, so a binary search
over sizes finds it, counting on PyTorch's ``meta`` device (no memory is allocated). The embedding size
and the number of layers stay as configured; with tied weights the last layer is as wide as the
embedding, so only the inner layers change (with one tied layer nothing can change, and compare says so).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from charlm.cells.registry import cell_registry_names
from charlm.config import Config, ModelConfig, check_seed, logger_names, validate
from charlm.model.char_lm import CharLM, count_parameters
from charlm.training.precision import for_comparison
from charlm.util.errors import CharlmError

# The rows of the papers' tables, in their order (the reference row first: LSTM, vanilla V), cell name ->
# the name the paper gives it.
PRESETS: dict[str, dict[str, str]] = {
    "jozefowicz": {"lstm": "LSTM", "rnn": "Tanh", "lstm-f": "LSTM-f", "lstm-i": "LSTM-i", "lstm-o": "LSTM-o",
                   "lstm-b": "LSTM-b", "gru": "GRU", "mut1": "MUT1", "mut2": "MUT2", "mut3": "MUT3"},
    "greff": {"peephole": "V", "nig": "NIG", "nfg": "NFG", "nog": "NOG", "niaf": "NIAF", "noaf": "NOAF",
              "np": "NP", "cifg": "CIFG", "fgr": "FGR"},
    "modern": {"lstm": "LSTM", "gru": "GRU", "mingru": "minGRU", "minlstm": "minLSTM", "slstm": "sLSTM",
               "mogrifier": "Mogrifier"},
}
PRESET_SOURCES = {
    "jozefowicz": "Jozefowicz, Zaremba & Sutskever 2015: LSTM, Tanh, the LSTM ablations, GRU, MUT1-3",
    "greff": "Greff et al. 2017, 'LSTM: A Search Space Odyssey': vanilla (peephole) LSTM and its 8 variants",
    "modern": "the cells of 2024 beside the classics: LSTM, GRU, minGRU and minLSTM (Feng et al. 2024), sLSTM "
              "(Beck et al. 2024), Mogrifier (Melis et al. 2020), at matched parameter counts over 3 seeds",
}
# What a preset settles unless the command says otherwise: its seeds (without --seeds) and whether the hidden
# sizes are matched to the first row's parameter count (--match-params is then implied).
PRESET_SEEDS: dict[str, str] = {"modern": "1,2,3"}
PRESET_MATCH_PARAMS = frozenset({"modern"})
# Config overrides a preset applies before the user's --set. Jozefowicz et al. start every LSTM-family
# cell with a zero forget-gate bias and make the bias of 1 its own row (LSTM-b, which forces 1.0): the
# preset pins 0 whatever the config file says, so its LSTM and LSTM-b rows stay two models.
PRESET_OVERRIDES: dict[str, list[str]] = {"jozefowicz": ["model.forget_bias=0.0"], "greff": [], "modern": []}


# --------------------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Entry:
    """One cell of the comparison and the name the table shows for it."""

    cell: str
    name: str


def resolve_entries(cells: str | None, preset: str | None) -> list[Entry]:
    """The cells of ``--cells a,b,c`` (names as ``charlm cells`` lists them, any case) or of ``--preset``."""
    presets = "; ".join(f"{key} ({PRESET_SOURCES[key]})" for key in PRESETS)
    if cells is not None and preset is not None:
        raise CharlmError("give --cells or --preset, not both")
    if preset is not None:
        key = preset.strip().lower()
        if key not in PRESETS:
            raise CharlmError(f"unknown preset '{preset}'; presets: {presets}")
        return [Entry(cell, name) for cell, name in PRESETS[key].items()]
    if cells is None:
        raise CharlmError(f"say which cells to compare: --cells lstm,gru,peephole or --preset NAME; "
                          f"presets: {presets}")
    given = [c.strip() for c in cells.split(",") if c.strip()]
    if not given:
        raise CharlmError("--cells is empty; give comma-separated cell names, e.g. --cells lstm,gru")
    names = list(dict.fromkeys(cell_registry_names(given, where=" in --cells")))  # as `train --cell` spells them
    return [Entry(n, n) for n in names]


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (duplicates dropped); ``None`` -> the config's seed."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CharlmError(f"--seeds expects comma-separated integers, e.g. 1,2,3; got '{text}'") from None
    if not seeds:
        raise CharlmError(f"--seeds expects comma-separated integers, e.g. 1,2,3; got '{text}'")
    for seed in seeds:
        check_seed(seed, "each of --seeds")
    return list(dict.fromkeys(seeds))


def budget_overrides(max_steps: int | None, max_time: float | None) -> list[str]:
    """``--max-steps`` / ``--max-time`` as config overrides; one alone turns the other rule off.

    Every cell must get the same budget: with only a step budget a slow cell must not be cut short
    by the config's time limit, and with only a time budget a fast one must not stop at a step count.
    """
    if max_steps is not None and max_steps < 1:
        raise CharlmError(f"--max-steps must be at least 1, got {max_steps}")
    if max_time is not None and max_time <= 0:
        raise CharlmError(f"--max-time must be positive seconds, got {max_time}")
    out: list[str] = []
    if max_steps is not None:
        out.append(f"train.max_steps={max_steps}")
        if max_time is None:
            out += ["train.max_time=null", "train.max_epochs=-1"]
    if max_time is not None:
        out.append(f"train.max_time={max_time}")
        if max_steps is None:
            out += ["train.max_steps=-1", "train.max_epochs=-1"]
    return out


# ------------------------------------------------------------------------------- matched parameters
def parameter_count(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the language model ``model`` describes, built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            return count_parameters(CharLM(vocab_size, model))
    except (RuntimeError, NotImplementedError, TypeError):  # an initialiser without meta support
        return count_parameters(CharLM(vocab_size, model))


def match_hidden_size(model: ModelConfig, vocab_size: int, target: int,
                      count: Callable[[ModelConfig, int], int] = parameter_count) -> int | None:
    """The hidden size whose parameter count is nearest ``target`` (ties: the smaller size).

    ``None`` when the hidden size does not change the count (one layer with tied weights).
    """
    cache: dict[int, int] = {}

    def params(h: int) -> int:
        if h not in cache:
            cache[h] = count(dataclasses.replace(model, hidden_size=h), vocab_size)
        return cache[h]

    hi = max(2, model.hidden_size)
    if params(1) == params(hi):
        return None
    while params(hi) < target:
        if hi >= 1 << 16:
            raise CharlmError(f"--match-params: cell '{model.cell}' cannot reach {target:,} parameters "
                              f"below hidden size {hi:,}")
        hi *= 2
    lo = 1
    while lo < hi:  # smallest size with at least the target count
        mid = (lo + hi) // 2
        if params(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(params(lo - 1) - target) <= abs(params(lo) - target):
        return lo - 1
    return lo


def matched_hidden_sizes(base: Config, entries: Sequence[Entry], vocab_size: int,
                         console: Console | None = None) -> dict[str, int]:
    """``{cell: hidden_size}``: the first cell keeps the configured size, the others match its count."""
    reference = dataclasses.replace(base.model, cell=entries[0].cell)
    target = parameter_count(reference, vocab_size)
    sizes = {entries[0].cell: base.model.hidden_size}
    for entry in entries[1:]:
        size = match_hidden_size(dataclasses.replace(base.model, cell=entry.cell), vocab_size, target)
        if size is None:
            if console is not None:
                console.print(f"[yellow]note:[/] the hidden size does not change {entry.cell}'s parameter count "
                              f"(one layer with tied weights); it keeps hidden size {base.model.hidden_size}")
            size = base.model.hidden_size
        sizes[entry.cell] = size
    if console is not None:
        listed = ", ".join(f"{e.name} {sizes[e.cell]}" for e in entries)
        console.print(f"[bold]matched parameters[/] to {entries[0].name} ({target:,}): hidden sizes {listed}")
    return sizes


# ---------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class PlannedRun:
    """One training run of the comparison: a cell, a seed, its full config and its folder."""

    entry: Entry
    seed: int
    config: Config
    run_dir: Path


def plan_runs(base: Config, entries: Sequence[Entry], seeds: Sequence[int], hidden: dict[str, int],
              out: Path) -> list[PlannedRun]:
    """Every (cell, seed) as a run in ``<out>/<cell>-seed<seed>``, seed-major: a first full row of results
    comes early. Only ``model.cell``, ``model.hidden_size`` and ``train.seed`` differ from ``base`` (and
    ``train.loggers``, which always has ``csv``)."""
    plans: list[PlannedRun] = []
    for seed in seeds:
        for entry in entries:
            config = for_comparison(copy.deepcopy(base))  # one precision for every cell
            config.model.cell, config.model.hidden_size, config.train.seed = entry.cell, hidden[entry.cell], seed
            # metrics.csv is where the curves are read from: always written, TensorBoard too if asked
            config.train.loggers = ",".join(dict.fromkeys(["csv", *logger_names(base.train.loggers)]))
            validate(config)
            plans.append(PlannedRun(entry, seed, config, out / f"{entry.cell}-seed{seed}"))
    return plans
