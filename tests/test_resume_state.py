"""What a resume restores besides the run itself: the model it must match (another one is refused before
anything is written, other regularisation is allowed), and each process's streams and random state."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke

from charlm.config import load_config


@pytest.mark.parametrize(("change", "message"), [
    (["--cell", "gru"], "model.cell='gru' (the checkpoint's: 'lstm')"),
    (["--set", "model.hidden_size=128"], "model.hidden_size=128 (the checkpoint's: 64)"),
], ids=["cell", "size"])
def test_resuming_with_another_model_is_refused_before_anything_is_written(tmp_path: Path, trained_run: Path,
                                                                            change: list[str], message: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, output = invoke("train", "--resume", str(run / "last.ckpt"), "--max-steps", "45", *change)
    assert code == 2, output
    assert output == (
        f"error: cannot resume {run / 'last.ckpt'} with {message}: the checkpoint holds another model; resume "
        "without changing the model, or train a new run under another --name")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.yaml included


def test_resuming_with_other_regularisation_is_allowed(tmp_path: Path, trained_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    code, output = invoke("train", "--resume", str(run / "last.ckpt"), "--max-steps", "42",
                          "--set", "model.dropout=0.3")
    assert code == 0, output
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 42
    assert "dropout: 0.3" in (run / "config.yaml").read_text()


def test_each_ddp_process_gets_its_own_streams_and_random_state() -> None:
    """What a 2-process checkpoint holds per process, restored into process 1 (a row of the stacked
    states: a view at an offset, which torch.set_rng_state once read wrongly and crashed on)."""
    from types import SimpleNamespace

    from charlm.training.lightning_module import CharLMModule

    module = CharLMModule(load_config("smoke").to_dict(), "abcdefgh")
    rngs = [torch.Generator().manual_seed(seed).get_state() for seed in (10, 11)]
    hidden = torch.stack([torch.full((8, 64), 1.0), torch.full((8, 64), 2.0)])
    python = [torch.tensor(random.Random(seed).getstate()[1], dtype=torch.int64) for seed in (10, 11)]
    state = {"world_size": 2, "python_rng_version": 3,
             "rng": {"torch": torch.stack(rngs), "python": torch.stack(python)},
             "train_states": [[hidden, hidden + 10]]}
    module._trainer = SimpleNamespace(world_size=2, global_rank=1)  # type: ignore[assignment]
    module._restore_resume_state(state)
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(11)))
    assert random.random() == random.Random(11).random()
    assert module._train_states is not None
    assert torch.equal(module._train_states[0][0], torch.full((8, 64), 2.0))
    assert torch.equal(module._train_states[0][1], torch.full((8, 64), 12.0))

    module._train_states = None  # a different number of processes: the streams start from zero
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True,  # type: ignore[assignment]
                                      progress_bar_callback=None)
    module._restore_resume_state(state)
    assert module._train_states is None


def test_resume_state_round_trips_in_one_process() -> None:
    from charlm.training.lightning_module import CharLMModule

    module = CharLMModule(load_config("smoke").to_dict(), "abcdefgh")
    module._train_states = [(torch.randn(8, 64), torch.randn(8, 64)) for _ in range(2)]
    saved = module._resume_state()
    ahead = torch.rand(3)
    carried = module._train_states
    module._train_states = None
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(world_size=1, global_rank=0)  # type: ignore[assignment]
    module._restore_resume_state(saved)
    assert torch.equal(torch.rand(3), ahead)  # the random stream continues from the save point
    for restored, original in zip(module._train_states, carried, strict=True):
        for a, b in zip(restored, original, strict=True):
            assert torch.equal(a, b)
