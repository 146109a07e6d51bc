"""Fine-tuning (``charlm train --init-from CKPT``): a new run that starts from a checkpoint's weights.

What comes from the checkpoint: the weights, the model section of the config and the vocabulary. What
comes from the command (its config file, flags and ``--set``): the data, optimizer, schedule, budget and
sampling. The optimizer and the schedule start fresh, at step 0, in a new run folder. The model section
of the command's config file is not used; ``--set model.KEY=VALUE`` (or ``--cell``) may change a key that
keeps the cell and every weight's name and shape (the dropout rates, ``weight_drop``, ``torch_rnn``,
``compile``), anything else is refused. Characters of the new text outside the checkpoint's vocabulary
refuse the run, unless ``data.drop_unknown`` (``--drop-unknown``) removes them from the text.

The new run's ``config.yaml`` records ``train.init_from`` (the path as given) and ``train.init_from_sha256``
(the checkpoint file's sha256); a config that gives the sha256 is refused for a checkpoint that no longer
has it, so re-running a fine-tuned run's ``config.yaml`` starts from the same weights or not at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from charlm.config import Config, apply, parse_override, validate
from charlm.data.corpus import sha256_of
from charlm.data.vocab import Vocab
from charlm.model.checkpoint import load_model
from charlm.training.resume import model_changes
from charlm.util.errors import CharlmError


def fine_tune_config(config: Config, overrides: list[str]) -> Config:
    """``config`` (the command's) with the model section of ``config.train.init_from``'s checkpoint, plus the
    ``model.*`` values of ``overrides`` (``section.key=value``, as ``--set`` takes them); checked."""
    path = Path(str(config.train.init_from))
    _, _, saved, ckpt = load_model(path)
    tuned = copy.deepcopy(config)
    tuned.model = copy.deepcopy(saved.model)
    for text in overrides:
        values = parse_override(text)
        if "model" in values:
            apply(tuned, {"model": values["model"]}, source="--set")
    validate(tuned)
    refuse_other_model(path, ckpt, saved, tuned)
    return tuned


def refuse_other_model(path: Path, ckpt: dict[str, Any], saved: Config, config: Config) -> None:
    """One sentence unless ``config.model`` has the checkpoint's cell and every one of its weights' shapes."""
    changed = model_changes(ckpt, saved, config)
    if changed is not None:
        raise CharlmError(f"cannot fine-tune {path} with {changed or 'the model its config describes'}: its weights "
                          "would not fit; fine-tuning keeps the checkpoint's cell and sizes (settings such as the "
                          "dropout rates may change)")


@dataclass(frozen=True)
class StartingPoint:
    """What a fine-tuned run takes from its checkpoint."""

    path: Path
    sha256: str
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]  # the CharLM's weights (and buffers)


def load_starting_point(config: Config) -> StartingPoint:
    """Read ``config.train.init_from`` (weights only), check its sha256 if the config gives one and that its
    weights fit ``config.model``."""
    path = Path(str(config.train.init_from))
    model, vocab, saved, ckpt = load_model(path)
    sha = sha256_of(path)
    expected = config.train.init_from_sha256
    if expected is not None and expected != sha:
        raise CharlmError(f"checkpoint {path} has sha256 {sha}, but the config (train.init_from_sha256) expects "
                          f"{expected}: it is another file now; give the checkpoint the config was made with, or "
                          "set train.init_from_sha256=null to start from this one")
    refuse_other_model(path, ckpt, saved, config)
    return StartingPoint(path, sha, vocab, model.state_dict())
