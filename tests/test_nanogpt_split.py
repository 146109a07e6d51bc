"""The literature's yardstick: nanoGPT's split (``data.split=nanogpt``: the first 90 % to train, the last 10 %
scored, every character once) and its evaluation (``charlm eval --windowed``: random blocks, each from a zero
state, averaged)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import invoke, smoke_args, write_model_checkpoint

from charlm.config import Config, load_config
from charlm.data.datamodule import CharDataModule, splits_for
from charlm.evaluation.scoring import evaluate_blocks, evaluate_ids
from charlm.model.checkpoint import load_model
from charlm.util.errors import CharlmError


# ------------------------------------------------------------------------------------------------- the split
def test_nanogpt_split_is_the_first_90_percent_and_the_rest_scored_as_val_and_test() -> None:
    ids = torch.arange(1_115_394)  # tiny Shakespeare's length: nanoGPT's prepare.py gives 1,003,854 / 111,540
    splits = splits_for(ids, load_config("default", ["data.split=nanogpt"]).data)
    assert (splits.train.numel(), splits.val.numel()) == (1_003_854, 111_540)
    assert torch.equal(torch.cat([splits.train, splits.val]), ids)
    assert splits.test is splits.val  # nanoGPT has no test split: its figure is this one's
    default = splits_for(ids, Config().data)  # 90/5/5 unchanged
    assert (default.train.numel(), default.val.numel(), default.test.numel()) == (1_003_856, 55_769, 55_769)


def test_nanogpt_split_refuses_fractions_it_would_ignore() -> None:
    with pytest.raises(CharlmError) as caught:
        load_config("default", ["data.split=nanogpt", "data.test_fraction=0.1"])
    assert str(caught.value) == (
        "config key 'data.split' is nanogpt, which fixes the split at 90 % train and 10 % val (= test); leave "
        "data.val_fraction and data.test_fraction at their defaults (0.05, 0.05), or use data.split=fractions")
    with pytest.raises(CharlmError) as caught:
        load_config("default", ["data.split=gpt"])
    assert str(caught.value) == "config key 'data.split' must be 'fractions' | 'nanogpt', got 'gpt'"


def test_a_nanogpt_split_run_validates_on_every_character_of_the_last_10_percent(corpus_file: Path,
                                                                                tmp_path: Path) -> None:
    """Training validates on the last 10 % (the logged val_loss is that split's, all of it once), `charlm eval`
    scores the same ids for val and test, and `charlm data` shows the split."""
    code, output = invoke(*smoke_args(corpus_file, tmp_path, "nano", "--max-steps", "6", "--set",
                                      "data.split=nanogpt", "--set", "train.val_every_steps=3",
                                      "--precision", "32-true"))  # its logged loss is compared with float32's
    assert code == 0, output
    text = corpus_file.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9):]
    with (tmp_path / "nano" / "metrics.csv").open() as fh:
        rows = [row for row in csv.DictReader(fh) if row["val_loss"]]
    assert {int(float(row["val_chars"])) for row in rows} == {len(held_out) - 1}
    model, vocab, cfg, _ = load_model(tmp_path / "nano" / "best.ckpt")
    assert cfg.data.split == "nanogpt"
    direct = evaluate_ids(model, vocab.encode(held_out), batch_size=cfg.data.eval_batch_size, bptt=cfg.data.bptt)
    assert min(float(row["val_loss"]) for row in rows) == pytest.approx(direct["loss"], abs=1e-5)
    results = {}
    for split in ("val", "test"):
        code, output = invoke("eval", "--checkpoint", str(tmp_path / "nano" / "best.ckpt"), "--split", split, "--json")
        assert code == 0, output
        results[split] = json.loads(output)
    assert results["val"]["loss"] == results["test"]["loss"] == pytest.approx(direct["loss"], abs=1e-6)
    assert results["val"]["chars"] == len(held_out) - 1
    data = CharDataModule(cfg.data, corpus=None)
    assert data.layout("val").chars == len(held_out) - 1
    code, output = invoke("data", "--data", str(corpus_file), "--set", "data.split=nanogpt")
    assert code == 0 and f"val split │ {len(held_out):,}" in output
    assert f"test split │ {len(held_out):,} (the val split: nanoGPT's split has no test split)" in output


# ------------------------------------------------------------------------------------ the windowed evaluation
def small_model(tmp_path: Path, text: str) -> Path:
    return write_model_checkpoint(tmp_path / "m.ckpt", text, scale=3.0, seed=1)


def test_windowed_score_is_the_mean_over_blocks_each_read_from_a_zero_state(tmp_path: Path) -> None:
    """Each block scored on its own by the exact scorer (one stream, zero state, the block as its one window):
    the mean over the blocks nanoGPT's draw picks is the windowed figure, whatever the blocks per forward."""
    text = "the quick brown fox jumps over the lazy dog; " * 40
    model, vocab, _, _ = load_model(small_model(tmp_path, text))
    ids = vocab.encode(text)
    block, blocks, seed = 24, 30, 5
    result = evaluate_blocks(model, ids, block=block, blocks=blocks, seed=seed, batch_size=7)
    # nanoGPT's get_batch: ix = torch.randint(len(data) - block_size, (batch_size,)), x = data[i : i + block_size]
    starts = torch.randint(len(ids) - block, (blocks,), generator=torch.Generator().manual_seed(seed))
    alone = [evaluate_ids(model, ids[s : s + block + 1], batch_size=1, bptt=block) for s in starts.tolist()]
    assert all(a["chars"] == block for a in alone)
    assert result["chars"] == blocks * block
    assert result["loss"] == pytest.approx(sum(a["loss"] for a in alone) / blocks, abs=1e-6)
    assert evaluate_blocks(model, ids, block=block, blocks=blocks, seed=seed, batch_size=64)["loss"] == pytest.approx(
        result["loss"], abs=1e-6)
    assert evaluate_blocks(model, ids, block=block, blocks=blocks, seed=seed + 1)["loss"] != result["loss"]


def test_eval_windowed_on_the_command_line(tmp_path: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog; " * 40
    checkpoint = str(small_model(tmp_path, text))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    base = ["eval", "--checkpoint", checkpoint, "--text", str(tmp_path / "t.txt")]
    code, output = invoke(*base, "--windowed", "32", "--blocks", "20", "--seed", "3", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["windowed"] == {"block": 32, "blocks": 20, "seed": 3} and result["chars"] == 640
    model, vocab, _, _ = load_model(Path(checkpoint))
    expected = evaluate_blocks(model, vocab.encode(text), block=32, blocks=20, seed=3)
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    code, output = invoke(*base, "--windowed", "32", "--blocks", "20", "--seed", "3")
    assert code == 0 and "20 random blocks of 32 characters, each from a zero state, seed 3" in output
    assert f"{expected['loss']:.4f} nats/char" in output


@pytest.mark.parametrize(("extra", "message"), [
    (["--blocks", "5"], "--blocks sets up the windowed evaluation; add --windowed 256"),
    (["--seed", "5"], "--seed sets up the windowed evaluation; add --windowed 256"),
    (["--windowed", "0"], "--windowed must be at least 1, got 0"),
    (["--windowed", "8", "--blocks", "0"], "--blocks must be at least 1, got 0"),
    (["--windowed", "8", "--dynamic"], "--windowed scores random blocks, not the text in order; leave out --dynamic"),
    (["--windowed", "5000"], "too few for one block of 5000 and its last target; give a smaller --windowed"),
])
def test_eval_windowed_refuses_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    text = "the quick brown fox jumps over the lazy dog; " * 40
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    code, output = invoke("eval", "--checkpoint", str(small_model(tmp_path, text)), "--text", str(tmp_path / "t.txt"),
                          *extra)
    assert code == 2 and message in output and "Traceback" not in output

