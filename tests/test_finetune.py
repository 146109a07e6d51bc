"""``charlm train --init-from CKPT``: a new run from a checkpoint's weights, model and vocabulary onto another text."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import shakespeare_text
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config
from charlm.data.datamodule import CharDataModule
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.checkpoint import load_model, safe_load
from charlm.training.finetune import fine_tune_config, load_starting_point
from charlm.util.errors import CharlmError

runner = CliRunner()
LISTED = "'{' (2x), '}' (2x), 'é' (1x), '#' (1x), '1' (1x)"
UNKNOWN = "{café} #1 {x}\n"  # '{', '}' twice each, 'é', '#', '1' once: outside the excerpt's 65 characters


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def new_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another text in the same alphabet (the excerpt's lines in reverse order), plus characters the
    checkpoint's vocabulary lacks."""
    lines = shakespeare_text().splitlines()
    path = tmp_path_factory.mktemp("new") / "new.txt"
    path.write_text(UNKNOWN + "\n".join(reversed(lines)) + "\n", encoding="utf-8")
    return path


def fine_tune_args(checkpoint: Path, text: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--config", "smoke", "--data", str(text), "--out", str(out), "--name", name,
            "--init-from", str(checkpoint), *extra]


def val_losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        return [float(r["val_loss"]) for r in csv.DictReader(fh) if r.get("val_loss")]


def test_fine_tuning_starts_from_the_checkpoints_loss_and_lowers_it(
        trained_run: Path, new_text: Path, tmp_path: Path) -> None:
    best = trained_run / "best.ckpt"
    result = runner.invoke(app, fine_tune_args(best, new_text, tmp_path, "ft", "--drop-unknown", "--max-steps", "20",
                                               "--set", "train.val_every_steps=2", "--no-samples",
                                               "--precision", "32-true"))  # logged and evaluated losses alike
    assert result.exit_code == 0, result.output
    assert flat(f"dropped from the text (data.drop_unknown): corpus {new_text} has 7 character(s) outside the "
                f"model's 65-character vocabulary: {LISTED}") in flat(result.output)
    run = tmp_path / "ft"
    # the checkpoint's loss on the new text's validation split (cut as the run cut it: unknown chars dropped)
    model, vocab, _, _ = load_model(best)
    cfg = load_config("smoke", [f"data.path={new_text}", "data.drop_unknown=true"])
    data = CharDataModule(cfg.data, vocab=vocab)
    before = evaluate_ids(model, data.splits.val, batch_size=cfg.data.eval_batch_size, bptt=cfg.data.bptt)["loss"]
    losses = val_losses(run)
    assert len(losses) == 10
    assert before < math.log(len(vocab)) - 0.5  # the checkpoint learned something: far from a uniform guess
    assert losses[0] == pytest.approx(before, abs=0.1)  # two small steps (warm-up) from the checkpoint's weights
    assert min(losses[-3:]) < losses[0] - 0.02  # and training lowers it
    saved = safe_load(run / "best.ckpt")
    assert saved["hyper_parameters"]["vocab"] == vocab.chars
    assert saved["global_step"] == 20  # a new run: its own steps, not the checkpoint's 40 plus these
    recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]
    assert recorded["init_from"] == str(best)
    assert recorded["init_from_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()

    # `charlm eval --split` cuts the text as the run did (the unknown characters dropped)
    evaluated = runner.invoke(app, ["eval", "--checkpoint", str(run / "best.ckpt"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["loss"] == pytest.approx(min(losses), abs=1e-4)

    # and the fine-tuned run resumes (with the checkpoint's vocabulary, not its text's)
    resumed = runner.invoke(app, ["train", "--resume", str(run / "last.ckpt"), "--max-steps", "24", "--no-samples"])
    assert resumed.exit_code == 0, resumed.output
    assert safe_load(run / "last.ckpt")["global_step"] == 24


def test_characters_outside_the_vocabulary_are_refused_without_drop_unknown(
        trained_run: Path, new_text: Path, tmp_path: Path) -> None:
    best = trained_run / "best.ckpt"
    result = runner.invoke(app, fine_tune_args(best, new_text, tmp_path, "ft"))
    assert result.exit_code == 2
    assert flat(result.output) == flat(
        f"error: corpus {new_text} has 7 character(s) outside the model's 65-character vocabulary: {LISTED} "
        f"(checkpoint {best}); pass --drop-unknown (data.drop_unknown=true) to remove them from the text")
    assert not (tmp_path / "ft").exists()


def test_the_model_is_the_checkpoints_and_only_shape_keeping_keys_change(trained_run: Path, new_text: Path) -> None:
    best = trained_run / "best.ckpt"
    base = load_config("default", [f"train.init_from={best}", "optim.lr=0.001"])  # default: 2x384, not the smoke's
    tuned = fine_tune_config(base, ["model.dropout=0.25", "optim.lr=0.001"])
    _, _, saved, _ = load_model(best)
    assert (tuned.model.hidden_size, tuned.model.num_layers) == (saved.model.hidden_size, saved.model.num_layers)
    assert tuned.model.dropout == 0.25 and tuned.optim.lr == 0.001 and tuned.data.batch_size == base.data.batch_size
    with pytest.raises(CharlmError) as caught:
        fine_tune_config(base, ["model.hidden_size=32"])
    assert str(caught.value) == (f"cannot fine-tune {best} with model.hidden_size=32 (the checkpoint's: 64): its "
                                 "weights would not fit; fine-tuning keeps the checkpoint's cell and sizes (settings "
                                 "such as the dropout rates may change)")
    with pytest.raises(CharlmError) as caught:
        load_starting_point(load_config("smoke", [f"train.init_from={best}", f"train.init_from_sha256={'a' * 64}"]))
    sha = hashlib.sha256(best.read_bytes()).hexdigest()
    assert str(caught.value).startswith(f"checkpoint {best} has sha256 {sha}, but the config (train.init_from_sha256) "
                                        f"expects {'a' * 64}")


def test_init_from_with_resume_is_refused(trained_run: Path, new_text: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, fine_tune_args(trained_run / "best.ckpt", new_text, tmp_path, "ft",
                                               "--resume", str(trained_run / "last.ckpt")))
    assert result.exit_code == 2
    assert flat(result.output) == ("error: --init-from (train.init_from) starts a new run from a checkpoint's weights "
                                   "and --resume continues a run: give one of them, not both")
