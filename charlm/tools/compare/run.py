"""The comparison's run loop: train (or continue) each planned run, score it, and write the results as it goes."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from charlm.config import Config, validate
from charlm.data.corpus import load_corpus
from charlm.data.datamodule import splits_for
from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.char_lm import count_parameters
from charlm.model.checkpoint import load_model, safe_load
from charlm.tools.compare.plan import Entry, PlannedRun, matched_hidden_sizes, plan_runs
from charlm.tools.compare.plot import plot_runs
from charlm.tools.compare.records import RunResult, finished_result, read_curve, write_record
from charlm.tools.compare.significance import significance_table
from charlm.tools.compare.summary import CellSummary, summarize
from charlm.tools.compare.tables import budget_text, print_table, render_table, write_results
from charlm.training.fit import train as run_training
from charlm.training.loggers import check_loggers
from charlm.util.errors import CharlmError, TrainingInterrupted


@dataclass
class Comparison:
    out: Path
    summaries: list[CellSummary]
    runs: list[RunResult]
    files: list[Path]
    plot_note: str | None  # why curves.png is missing, if it is
    trained: int  # runs trained (or resumed) by this call; the others were already finished


class CheckpointScorer:
    """Scores best checkpoints on the val and test splits of the corpus (encoded once per vocabulary)."""

    def __init__(self, corpus_text: str) -> None:
        self.text = corpus_text
        self._splits: dict[tuple[str, float, float, str], Any] = {}

    def __call__(self, checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int, int]:
        """Validation and test scores, the checkpoint itself, the model's parameter count and its vocabulary size."""
        model, vocab, cfg, ckpt = load_model(checkpoint)
        key = (vocab.chars, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split)
        if key not in self._splits:
            self._splits[key] = splits_for(vocab.encode(self.text, what="corpus"), cfg.data)
        splits = self._splits[key]
        kwargs = {"batch_size": cfg.data.eval_batch_size, "bptt": cfg.data.bptt}
        val = evaluate_ids(model, splits.val, **kwargs)
        test = evaluate_ids(model, splits.test, **kwargs)
        return val, test, ckpt, count_parameters(model), len(vocab)


def train_run(plan: PlannedRun, out: Path, scorer: CheckpointScorer, console: Console | None) -> RunResult:
    """Train one run, or continue it from its ``last.ckpt`` as ``charlm train --resume`` does, and score it.

    The record is saved before training (the folder is then known as compare's) and with the scores after.
    """
    last = plan.run_dir / "last.ckpt"
    write_record(plan, None)
    trained = run_training(plan.config, resume=last if last.is_file() else None, run_dir=plan.run_dir,
                           console=console)

    val, test, best_ckpt, parameters, vocab_size = scorer(trained.best_checkpoint)
    best_step = int(best_ckpt.get("global_step", 0))
    clock = safe_load(last).get("elapsed_s") if last.is_file() else None  # the run's clock, over resumes
    seconds = float(clock) if clock is not None else trained.seconds  # unknown: this session's time only
    steps = trained.steps
    points, speeds = read_curve(plan.run_dir)
    d = plan.config.data
    chars_per_s = statistics.median(speeds) if speeds else steps * d.batch_size * d.bptt / max(seconds, 1e-9)
    curve: list[dict[str, float | None]] = [
        {"step": s, "seconds": elapsed, "val_loss": loss, "val_bpc": bpc} for s, loss, bpc, elapsed in points]
    if best_step not in {p[0] for p in points}:  # the final weights were best (scored after the budget ran out)
        curve.append({"step": best_step, "seconds": best_ckpt.get("elapsed_s"), "val_loss": val["loss"],
                      "val_bpc": val["bpc"]})
        curve.sort(key=lambda p: p["step"])
    result = RunResult(
        cell=plan.entry.cell, name=plan.entry.name, seed=plan.seed, run_dir=str(plan.run_dir.relative_to(out)),
        hidden_size=plan.config.model.hidden_size, parameters=parameters,
        val_loss=val["loss"], val_bpc=val["bpc"], val_ppl=val["perplexity"],
        test_loss=test["loss"], test_bpc=test["bpc"], test_ppl=test["perplexity"],
        train_seconds=seconds, train_chars_per_s=chars_per_s, best_step=best_step, steps=steps, curve=curve,
        vocab_size=vocab_size)
    write_record(plan, result)
    return result


def run_comparison(base: Config, entries: Sequence[Entry], *, seeds: Sequence[int], out: Path,
                   match_params: bool = False, console: Console | None = None,
                   settings: dict[str, Any] | None = None) -> Comparison:
    """Train every (cell, seed) not yet finished under ``out``, then write the results and the figure."""
    if not entries:
        raise CharlmError("no cells to compare")
    validate(base)
    check_loggers(base)  # before any run folder is made
    corpus = load_corpus(base.data.path)
    hidden = {e.cell: base.model.hidden_size for e in entries}
    if match_params:
        hidden = matched_hidden_sizes(base, entries, len(Vocab.from_text(corpus.text)), console)
    t = base.train
    if console is not None and t.max_steps > 0 and t.val_every_steps > t.max_steps:
        console.print(f"[yellow]note:[/] validation every {t.val_every_steps} steps never fires within "
                      f"{t.max_steps} steps; the curves will have one point per run "
                      "(lower it with --set train.val_every_steps=N)")
    plans = plan_runs(base, entries, seeds, hidden, out)
    settings = {**(settings or {}), "cells": [dataclasses.asdict(e) for e in entries], "seeds": list(seeds),
                "match_params": match_params, "hidden_sizes": hidden, "corpus": corpus.record(),
                "budget": {"max_steps": t.max_steps, "max_time": t.max_time, "max_epochs": t.max_epochs},
                "config_values": base.to_dict()}
    out.mkdir(parents=True, exist_ok=True)

    done: dict[int, RunResult] = {}
    for i, plan in enumerate(plans):
        result = finished_result(plan)
        if result is not None:
            done[i] = result
    scorer = CheckpointScorer(corpus.text)

    def results() -> list[RunResult]:
        return [done[i] for i in sorted(done)]

    def show(running: str | None) -> None:
        if console is not None:
            summaries = summarize(entries, seeds, hidden, results())
            print_table(console, lambda width: render_table(summaries, show_hidden=match_params, running=running,
                                                            title=f"charlm compare: {escape(str(out))}", width=width))

    if console is not None:
        todo = len(plans) - len(done)
        console.print(f"[bold]compare[/] {len(entries)} cells x {len(seeds)} seed(s), {budget_text(base)}; "
                      f"{len(done)} run(s) already finished, {todo} to train. Results in {escape(str(out))} "
                      f"(re-run with --out {escape(str(out))} to resume).")
    trained = 0
    for i, plan in enumerate(plans):
        if i in done:
            continue
        show(plan.entry.cell)
        if console is not None:
            console.rule(f"[{i + 1}/{len(plans)}] {plan.entry.name} ({plan.entry.cell}), seed {plan.seed}")
        try:
            done[i] = train_run(plan, out, scorer, console)
        except TrainingInterrupted as exc:  # last.ckpt saved: say how to resume the comparison, not the run
            raise TrainingInterrupted(
                f"comparison interrupted while training {plan.run_dir.name}; {len(done)} run(s) finished and "
                f"recorded. Run the same command with --out {out} to resume", exc.exit_code) from None
        except (KeyboardInterrupt, SystemExit):
            if console is not None:
                console.print(f"[yellow]interrupted[/]: finished runs are recorded; run the same command "
                              f"with --out {escape(str(out))} to resume")
            raise
        trained += 1
        write_results(out, base, summarize(entries, seeds, hidden, results()), results(), settings,
                      show_hidden=match_params, curves=None, complete=False)
    show(None)
    runs = results()
    png, note = plot_runs(out, runs, entries)
    summaries = summarize(entries, seeds, hidden, runs)
    files = write_results(out, base, summaries, runs, settings, show_hidden=match_params,
                          curves=png.name if png else None, complete=True)
    if png is not None:
        files.append(png)
    if console is not None:
        against = significance_table(summaries, settings.get("preset"))
        if against is not None:
            console.print(against)
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}")
    return Comparison(out, summaries, runs, files, note, trained)
