"""The model card of an exported folder: ``README.md``, in the Hugging Face Hub's form (YAML front matter, then
Markdown), from the template ``assets/model_card.md``.

It says what the model is (cell, size, parameters, vocabulary), what it was trained on (the corpus file and its
sha256) and how (the budget, the steps taken, the settings), its validation and test figures with where they came
from (or, plainly, that they were not computed), every tensor of ``model.safetensors``, how to load it with and
without charlm, and its limits.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from typing import Any

from torch import Tensor

from charlm.cells.registry import get_cell
from charlm.config import Config
from charlm.data.corpus import CORPUS_SHA256, Corpus
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM, count_parameters

_SHELL_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SPLIT_NAMES = {"val": "validation", "test": "test"}
_PARAMETERS = {  # a layer's tensor base name (before ``_l0``) -> what it is
    "weight_ih": "input weights, the gate blocks stacked",
    "weight_hh": "recurrent weights, the gate blocks stacked",
    "bias_ih": "input bias",
    "bias_hh": "recurrent bias",
    "peephole": "peephole weights (diagonal), blocks i, f, o",
    "weight_gg": "gate recurrence: the previous step's i, f, o into this step's",
}


@dataclass(frozen=True)
class Evaluation:
    """The card's figures: per split (``val``, ``test``) loss, bpc, perplexity, chars, streams, and the corpus
    they were computed on; or none, and why (``missing``)."""

    corpus: Corpus | None
    figures: dict[str, dict[str, float]]
    missing: str | None


def _template() -> str:
    return resources.files("charlm.tools.export").joinpath("assets", "model_card.md").read_text(encoding="utf-8")


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"| {name} | {value} |" for name, value in pairs)


def _figures(config: Config, evaluation: Evaluation) -> str:
    corpus = evaluation.corpus
    if corpus is None or not evaluation.figures:
        return (f"Not computed: the corpus the run trained on was not found when this folder was exported "
                f"({evaluation.missing}). With the corpus at hand, `charlm eval --checkpoint FOLDER --data FILE "
                "--split test` computes them.")
    lines = ["| split | characters | loss (nats/char) | bits per char | perplexity |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for split, f in evaluation.figures.items():
        lines.append(f"| {_SPLIT_NAMES[split]} | {int(f['chars']):,} | {f['loss']:.4f} | {f['bpc']:.4f} | "
                     f"{f['perplexity']:.3f} |")
    d = config.data
    streams = sorted({int(f["streams"]) for f in evaluation.figures.values()})
    lines.append("")
    lines.append(f"Computed when this folder was exported, by `charlm eval`'s code with the run's settings "
                 f"({' / '.join(map(str, streams))} streams side by side, windows of {d.bptt} characters, the state "
                 f"carried), on `{corpus.path.name}` ({len(corpus.text):,} characters, sha256 `{corpus.sha256}`) cut "
                 f"as the run cut it: the last {d.val_fraction + d.test_fraction:.0%} held out, {d.val_fraction:.0%} "
                 f"validation then {d.test_fraction:.0%} test. `charlm eval --checkpoint FOLDER --split test` gives "
                 "the same figures.")
    return "\n".join(lines)


def _corpus(config: Config, evaluation: Evaluation) -> tuple[str, str]:
    """The corpus as the card's first paragraph names it, and as its limits name it."""
    corpus = evaluation.corpus
    if corpus is not None:
        return (f"`{corpus.path.name}` ({len(corpus.text):,} characters, sha256 `{corpus.sha256}`)",
                f"`{corpus.path.name}`, {len(corpus.text):,} characters")
    if config.data.path is not None:
        return (f"`{config.data.path}` (not found when this folder was exported, so its sha256 is not known)",
                f"`{config.data.path}`")
    return (f"tiny Shakespeare (charlm's default corpus, sha256 `{CORPUS_SHA256}` when downloaded; the copy the run "
            "read was not found when this folder was exported, so it was not checked)", "tiny Shakespeare")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "not recorded"
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def _training(config: Config, record: dict[str, Any], corpus_line: str) -> list[tuple[str, str]]:
    d, o, t, m = config.data, config.optim, config.train, config.model
    budget = []
    if t.max_steps > 0:
        budget.append(f"{t.max_steps:,} steps")
    if t.max_time is not None:
        budget.append(f"{t.max_time:,.0f} s")
    if t.max_epochs > 0:
        budget.append(f"{t.max_epochs:,} epochs")
    step, world = record.get("global_step"), record.get("world_size", 1)
    schedule = f"cosine to {o.min_lr:g}" if o.schedule == "cosine" else "constant"
    return [
        ("corpus", corpus_line),
        ("split", f"contiguous: the first {1 - d.val_fraction - d.test_fraction:.0%} training, then "
                  f"{d.val_fraction:.0%} validation, {d.test_fraction:.0%} test"),
        ("budget", " or ".join(budget) + " (whichever came first)" if len(budget) > 1 else
                   budget[0] if budget else "none set"),
        ("steps at this checkpoint", f"{step:,}" if isinstance(step, int) else "not recorded"),
        ("training time to this checkpoint", _duration(record.get("elapsed_s"))),
        ("batch", f"{d.batch_size} streams x {d.bptt} characters" + (f" per process, {world} processes" if world > 1
                                                                     else "")),
        ("optimizer", f"{o.optimizer}, learning rate {o.lr:g} ({schedule}), weight decay {o.weight_decay:g}"),
        ("regularizers", f"dropout {m.dropout:g} (output), {m.dropouth:g} (between layers), {m.dropouti:g} (input), "
                         f"{m.dropoute:g} (embedding); weight drop {m.weight_drop:g}; AR {o.alpha:g}, TAR {o.beta:g}"),
        ("seed", str(t.seed)),
    ]


def _model(model: CharLM, vocab: Vocab, config: Config) -> list[tuple[str, str]]:
    m = config.model
    sizes = [layer.hidden_size for layer in model.layers]
    rows = [
        ("cell", f"`{m.cell}`: {get_cell(m.cell).summary}"),
        ("layers", f"{m.num_layers}, of {' / '.join(map(str, sizes))} units"),
        ("embedding", f"{m.embedding_size} per character"),
        ("decoder", "tied to the embedding (one matrix)" if m.tie_weights else "its own matrix"),
        ("layer norm", "on each layer's output" if m.layer_norm else "none"),
        ("parameters", f"{count_parameters(model):,}"),
        ("vocabulary", f"{len(vocab)} characters, in id order in `config.json` (`vocab`)"),
    ]
    if m.cell == "mogrifier":
        rows.append(("mogrifier", f"{m.mogrifier_rounds} rounds, rank {m.mogrifier_rank or 'full'}"))
    return rows


def _tensor_meaning(name: str, tied: bool) -> str:
    if name == "encoder.weight":
        return "the embedding: row i is character i's vector" + (" (also the decoder's matrix: tied)" if tied else "")
    if name == "decoder.weight":
        return "the decoder's matrix: row i scores character i"
    if name == "decoder.bias":
        return "the decoder's bias"
    norm = re.fullmatch(r"norms\.(\d+)\.(weight|bias)", name)
    if norm:
        return f"LayerNorm of layer {norm[1]}'s output: {'gain' if norm[2] == 'weight' else 'shift'}"
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)_l0", name)
    if layer:
        return f"layer {layer[1]}: {_PARAMETERS.get(layer[2], layer[2].replace('_', ' '))}"
    return ""


def model_card(model: CharLM, vocab: Vocab, config: Config, record: dict[str, Any], evaluation: Evaluation,
               tensors: dict[str, Tensor], *, name: str, folder: str) -> str:
    """README.md of the exported folder ``folder`` (its name, for the commands it shows); ``name`` titles it."""
    corpus_line, corpus_short = _corpus(config, evaluation)
    m = config.model
    tensor_rows = "\n".join(f"| `{key}` | {' x '.join(map(str, t.shape))} | {_tensor_meaning(key, m.tie_weights)} |"
                            for key, t in tensors.items())
    values = {
        "name": name, "cell": m.cell,
        "size": f"{m.num_layers} layer{'s' if m.num_layers > 1 else ''} of {m.hidden_size} units",
        "parameters": f"{count_parameters(model):,}", "vocab_size": str(len(vocab)),
        "corpus": corpus_line, "corpus_short": corpus_short,
        "figures": _figures(config, evaluation),
        "training": _rows(_training(config, record, corpus_line)),
        "model": _rows(_model(model, vocab, config)),
        "tensors": tensor_rows, "folder": folder,
        "prime": _shell_word(config.sample.prime), "temperature": f"{config.sample.temperature:g}",
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match[1]], _template())  # one pass: no value is read again


def _shell_word(text: str) -> str:
    """``text`` quoted for the shell (bash), on one line: ``$'...'`` with escapes where it holds a control
    character (a prime often ends in a newline)."""
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_SHELL_ESCAPES.get(c) or (c if c.isprintable() else f"\\U{ord(c):08x}") for c in text) + "'"
