"""``charlm train --resume``: which checkpoint, which config, which run folder."""

from __future__ import annotations

from pathlib import Path

from charlm.checkpoint import newest_run_checkpoint, safe_load
from charlm.config import Config, apply, from_dict, parse_override, validate


def resolve_resume(resume: str, cli_config: Config, overrides: list[str]) -> tuple[Config, Path, Path]:
    """The run's saved config plus this command's explicit overrides, the checkpoint and its folder.

    ``resume == "newest"`` picks ``last.ckpt`` of the newest run under ``train.out``.
    """
    path = newest_run_checkpoint(cli_config.train.out, "last.ckpt", "--resume") if resume == "newest" else Path(resume)
    ckpt = safe_load(path)
    config = from_dict(ckpt["hyper_parameters"]["config"])
    for text in overrides:
        apply(config, parse_override(text), source="--set")
    validate(config)
    return config, path, path.parent
