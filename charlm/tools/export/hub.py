"""``charlm export --format safetensors``: a model folder in the Hugging Face Hub's layout, to hand to others.

The folder (read back by :mod:`charlm.model.weights_folder`, which documents its files) holds
``model.safetensors`` (the weights under the model's ``state_dict`` names, float32), ``config.json`` (the charlm
config, the vocabulary in id order, the sampling defaults, the run's record) and ``README.md``, the model card
(:mod:`charlm.tools.export.model_card`). A user can upload it to the Hub as it is, and anyone can read the weights
without a pickle.

The card's validation and test figures are computed here, with the code and settings of ``charlm eval`` (the
run's corpus cut as the run cut it, the run's validation streams and window), when the run's corpus is found
(``--data`` names it, else the config's ``data.path`` or the usual places; never downloaded); otherwise the card
says they were not computed. Everything is written in a temporary folder beside ``--out`` and moved in when
complete (:mod:`charlm.tools.export.staging`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charlm import __version__
from charlm.config import Config
from charlm.data.corpus import read_corpus, resolve_corpus_path
from charlm.data.datamodule import run_splits
from charlm.data.vocab import Vocab
from charlm.evaluation.scoring import evaluate_ids, validation_streams
from charlm.model.char_lm import CharLM
from charlm.model.weights_folder import (
    CARD_FILE,
    CONFIG_FILE,
    FOLDER_FORMAT,
    FOLDER_VERSION,
    WEIGHTS_FILE,
    folder_tensors,
)
from charlm.tools.export.model_card import Evaluation, model_card
from charlm.tools.export.staging import check_out_folder, move_in, staged_folder
from charlm.util.atomic import atomic_write_bytes, atomic_write_text
from charlm.util.errors import CharlmError

FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
INSTALL_HINT = 'safetensors export needs the safetensors package: pip install "charlm[export]"'


def require_safetensors() -> None:
    """Raise the one-sentence install hint when the export extra is missing."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise CharlmError(INSTALL_HINT) from None


def evaluate_run(model: CharLM, vocab: Vocab, config: Config, checkpoint: dict[str, Any],
                 data: str | None = None) -> Evaluation:
    """The run's val and test figures as ``charlm eval --split val|test`` computes them, on the run's corpus.

    ``data`` (``--data``) names the corpus; a problem with it is the user's to fix, so it is raised. Without it
    the config's corpus is looked for where training looks (no download), and a corpus not found or not
    matching the vocabulary gives an :class:`Evaluation` that says why the figures are missing."""
    try:
        corpus = read_corpus(resolve_corpus_path(data if data is not None else config.data.path,
                                                 allow_download=False))
        splits = run_splits(vocab, config.data, corpus)
    except CharlmError as exc:
        if data is not None:
            raise
        return Evaluation(corpus=None, figures={}, missing=str(exc))
    figures = {}
    for split in ("val", "test"):
        ids = getattr(splits, split)
        streams = validation_streams(checkpoint, ids.numel(), config.data.eval_batch_size)
        result = evaluate_ids(model, ids, batch_size=streams, bptt=config.data.bptt)
        figures[split] = {key: result[key] for key in ("loss", "bpc", "perplexity", "chars")} | {"streams": streams}
    return Evaluation(corpus=corpus, figures=figures, missing=None)


def run_record(checkpoint: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
    """config.json's ``run``: the steps and time the checkpoint recorded, its processes, and the card's figures
    with the corpus they came from."""
    resume = checkpoint.get("resume_state")
    world = resume.get("world_size") if isinstance(resume, dict) else None
    corpus = evaluation.corpus
    return {
        "global_step": checkpoint.get("global_step"),
        "elapsed_s": checkpoint.get("elapsed_s"),
        "world_size": world if isinstance(world, int) and world >= 1 else 1,
        "corpus": None if corpus is None else corpus.record(),
        "evaluation": evaluation.figures or None,
        "evaluation_missing": evaluation.missing,
    }


def folder_config(vocab: Vocab, config: Config, record: dict[str, Any]) -> dict[str, Any]:
    """config.json: what :func:`charlm.model.weights_folder.read_folder` reads, and the sampling defaults."""
    return {
        "format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "charlm_version": __version__,
        "library_name": "charlm",
        "vocab": list(vocab.chars),
        "sampling": {"temperature": config.sample.temperature, "top_k": None, "top_p": None,
                     "prime": config.sample.prime, "length": config.sample.length},
        "config": config.to_dict(),
        "run": record,
    }


def export_folder(model: CharLM, vocab: Vocab, config: Config, checkpoint: dict[str, Any], out: str | Path, *,
                  name: str, data: str | None = None, force: bool = False) -> list[Path]:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into the folder ``out``; returns their paths.

    ``checkpoint`` is what :func:`charlm.model.checkpoint.load_model` returned beside the model (its record:
    steps, time, processes); ``name`` titles the card. ``out`` may be missing or empty; a folder holding files
    is refused unless ``force``, which replaces these three and leaves anything else alone."""
    require_safetensors()
    from safetensors.torch import save

    out = Path(out)
    check_out_folder(out, FILES, force)
    evaluation = evaluate_run(model, vocab, config, checkpoint, data)
    record = run_record(checkpoint, evaluation)
    tensors = folder_tensors(model)
    with staged_folder(out) as staging:
        atomic_write_bytes(staging / WEIGHTS_FILE, save(tensors, metadata={
            "format": "pt", "charlm_format": FOLDER_FORMAT, "charlm_version": __version__}))
        atomic_write_text(staging / CONFIG_FILE, json.dumps(folder_config(vocab, config, record), indent=2,
                                                            ensure_ascii=False) + "\n")
        card = model_card(model, vocab, config, record, evaluation, tensors, name=name, folder=out.name)
        atomic_write_text(staging / CARD_FILE, card)
        move_in(staging, out, FILES)
    return [out / file for file in FILES]
