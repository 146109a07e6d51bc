"""``charlm train --resume``: which checkpoint, which config, which run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from charlm.config import Config, apply, from_dict, parse_override, validate
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import newest_run_checkpoint, safe_load
from charlm.util.errors import CharlmError

INIT_FROM_WITH_RESUME = ("--init-from (train.init_from) starts a new run from a checkpoint's weights and --resume "
                         "continues a run: give one of them, not both")


def resolve_resume(resume: str, cli_config: Config, overrides: list[str]) -> tuple[Config, Path, Path]:
    """The run's saved config plus this command's explicit overrides, the checkpoint and its folder.

    ``resume == "newest"`` picks ``last.ckpt`` of the newest run under ``train.out``. Overrides that change
    the model the checkpoint holds are refused here, before anything is written.
    """
    if resume == "":
        raise CharlmError("--resume is empty; give a checkpoint file, or --resume alone to continue the newest run")
    path = newest_run_checkpoint(cli_config.train.out, "last.ckpt", "--resume") if resume == "newest" else Path(resume)
    ckpt = safe_load(path)
    saved = from_dict(ckpt["hyper_parameters"]["config"])
    config = from_dict(ckpt["hyper_parameters"]["config"])
    for text in overrides:
        apply(config, parse_override(text), source="--set")
    validate(config)
    if config.train.init_from != saved.train.init_from:
        raise CharlmError(INIT_FROM_WITH_RESUME)
    check_same_model(path, ckpt, saved, config)
    return config, path, path.parent


def check_same_model(path: Path, ckpt: dict[str, Any], saved: Config, config: Config) -> None:
    """Refuse a resume whose model settings do not fit the checkpoint's weights (or change the cell).

    Settings that keep every weight's name and shape (dropout rates, for instance) may change.
    """
    changed = model_changes(ckpt, saved, config)
    if changed is None:
        return
    if not changed:
        raise CharlmError(f"{path} does not match this version of charlm (its weights do not fit the model its "
                          "config describes); retrain it")
    raise CharlmError(f"cannot resume {path} with {changed}: the checkpoint holds another model; resume without "
                      "changing the model, or train a new run under another --name")


def model_changes(ckpt: dict[str, Any], saved: Config, config: Config) -> str | None:
    """``None`` when ``config.model`` has the cell of ``ckpt`` (saved with config ``saved``) and every one of
    its weights' names and shapes; else the changed keys, ``"model.K=new (the checkpoint's: old), ..."``
    (empty when none changed: then the checkpoint itself does not fit its config)."""
    vocab_size = len(ckpt["hyper_parameters"]["vocab"])
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        wanted = {f"model.{k}": v.shape for k, v in CharLM(vocab_size, config.model).state_dict().items()}
    held = {k: v.shape for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if config.model.cell == saved.model.cell and wanted == held:
        return None
    old, new = saved.to_dict()["model"], config.to_dict()["model"]
    return ", ".join(f"model.{k}={new[k]!r} (the checkpoint's: {old[k]!r})" for k in new if new[k] != old[k])
