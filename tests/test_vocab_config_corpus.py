"""Vocabulary, config and corpus resolution: round trips and exact error messages."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from charlm.cells.registry import cell_names
from charlm.cli import app
from charlm.config import SEED_MAX, ModelConfig, load_config, parse_override
from charlm.data import corpus as corpus_mod
from charlm.data.vocab import Vocab
from charlm.util.errors import CharlmError


def test_vocab_round_trip_and_sorted() -> None:
    text = "To be, or not to be: that is the question.\n"
    vocab = Vocab.from_text(text)
    assert vocab.chars == "".join(sorted(set(text)))
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert vocab.decode(ids) == text


def test_vocab_names_unknown_characters() -> None:
    vocab = Vocab.from_text("abc")
    with pytest.raises(CharlmError, match=r"prime has 3 character\(s\) outside the model's 3-character "
                                          r"vocabulary: 'z' \(2x\), 'Q' \(1x\)"):
        vocab.encode("azzQ", what="prime")


def test_default_and_smoke_configs_load() -> None:
    default = load_config("default")
    assert default.model.cell == "lstm" and default.train.max_steps == 4200 and default.train.max_time is None
    smoke = load_config("smoke")
    assert smoke.train.max_steps == 40 and smoke.train.max_time is None
    assert load_config("awd-lstm").model.num_layers == 3


def test_override_parses_yaml_values() -> None:
    assert parse_override("model.hidden_size=512") == {"model": {"hidden_size": 512}}
    assert parse_override("train.name=run 1") == {"train": {"name": "run 1"}}
    cfg = load_config("default", ["model.hidden_size=512", "optim.lr=1", "train.max_time=null",
                                  "train.max_steps=5"])
    assert cfg.model.hidden_size == 512 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(("override", "message"), [
    ("model.hiden_size=3", "unknown config key 'model.hiden_size'; keys of 'model': cell, embedding_size"),
    ("modle.hidden_size=3", "unknown config section 'modle'; sections: data, model, optim, train, sample"),
    ("model.hidden_size=big", "config key 'model.hidden_size' must be int, got 'big'"),
    ("model.dropout=1.0", "config key 'model.dropout' must be in [0, 1), got 1.0"),
    ("data.batch_size=0", "config key 'data.batch_size' must be at least 1, got 0"),
    ("model.tie_weights=3", "config key 'model.tie_weights' must be bool, got 3"),
    ("model.cell=lstmm", "unknown cell 'lstmm'; valid cells: "),
    ("hidden_size", "--set expects section.key=value, got 'hidden_size'"),
    ("optim.lr=.nan", "config key 'optim.lr' must be a finite number, got nan"),
    ("sample.temperature=.nan", "config key 'sample.temperature' must be a finite number, got nan"),
    ("train.max_time=.inf", "config key 'train.max_time' must be a finite number, got inf"),
    ("model.dropout=-.inf", "config key 'model.dropout' must be a finite number, got -inf"),
    ("train.seed=-1", "config key 'train.seed' must be a whole number from 0 to 4294967295, got -1"),
    ("train.seed=4294967296", "config key 'train.seed' must be a whole number from 0 to 4294967295, got 4294967296"),
])
def test_bad_config_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(CharlmError) as info:
        load_config("default", [override])
    assert str(info.value).startswith(message)


def test_seed_bounds_are_lightnings() -> None:
    from lightning.fabric.utilities.seed import max_seed_value, min_seed_value

    assert (min_seed_value, max_seed_value) == (0, SEED_MAX)
    assert load_config("default", ["train.seed=0"]).train.seed == 0
    assert load_config("default", [f"train.seed={SEED_MAX}"]).train.seed == SEED_MAX


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", "-1"], "config key 'train.seed' must be a whole number from 0 to 4294967295, got -1"),
    (["--seed", str(2**70)], f"config key 'train.seed' must be a whole number from 0 to 4294967295, got {2**70}"),
    (["--set", "optim.lr=.nan"], "config key 'optim.lr' must be a finite number, got nan"),
    (["--set", "sample.temperature=.nan"], "config key 'sample.temperature' must be a finite number, got nan"),
])
def test_train_refuses_bad_values_before_anything_is_made(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", "smoke", "--out", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert " ".join(result.output.split()) == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def test_cell_names_follow_one_rule_in_train_and_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    from charlm.tools.compare.plan import resolve_entries
    from charlm.training import fit as train_module

    seen: list[str] = []

    def record(config: Any, **kwargs: Any) -> Any:
        seen.append(config.model.cell)
        raise CharlmError("recorded")

    monkeypatch.setattr(train_module, "train", record)
    result = CliRunner().invoke(app, ["train", "--config", "smoke", "--cell", "LSTM"])
    assert result.exit_code == 2 and "recorded" in result.output and seen == ["lstm"]  # the registry's name
    assert [e.cell for e in resolve_entries("LSTM,Gru", None)] == ["lstm", "gru"]  # as compare --cells
    valid = ", ".join(sorted(cell_names()))
    with pytest.raises(CharlmError) as train_error:
        load_config("default", ["model.cell=LSTMX"])
    with pytest.raises(CharlmError) as compare_error:
        resolve_entries("LSTMX", None)
    assert str(train_error.value) == f"unknown cell 'LSTMX'; valid cells: {valid}"
    assert str(compare_error.value) == f"unknown cell 'LSTMX' in --cells; valid cells: {valid}"


def test_forget_bias_has_one_default() -> None:
    from charlm.model.char_lm import CharLM
    from charlm.model.recurrent_layer import RecurrentLayer

    default = ModelConfig().forget_bias
    layer = RecurrentLayer("lstm", 4, 8)  # no forget_bias given: the config's default
    assert bool((layer.bias_ih_l0[8:16] == default).all())  # gate order i, f, g, o
    model = CharLM(5, load_config("smoke", ["model.hidden_size=8", "model.embedding_size=8"]).model)
    assert bool((model.layers[0].bias_ih_l0[8:16] == default).all())
    assert bool((RecurrentLayer("lstm-b", 4, 8).bias_ih_l0[8:16] == 1.0).all())  # lstm-b forces 1


def test_unknown_config_name_lists_known() -> None:
    with pytest.raises(CharlmError, match="config 'nope' not found; give a YAML file or one of: "
                                          "awd-lstm, default, smoke"):
        load_config("nope")


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--data FILE, then $CHARLM_DATA_DIR, then ./data/ of the working directory, then the cache folder."""
    explicit = tmp_path / "mine.txt"
    explicit.write_text("hello world\n")
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "tinyshakespeare.txt").write_text("from env\n")
    local_dir = tmp_path / "work"
    (local_dir / "data").mkdir(parents=True)
    (local_dir / "data" / "tinyshakespeare.txt").write_text("from data/\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tinyshakespeare.txt").write_text("from the cache\n")
    monkeypatch.chdir(local_dir)
    monkeypatch.setenv("CHARLM_DATA_DIR", str(env_dir))
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(cache))
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _no_network)
    assert corpus_mod.resolve_corpus_path(explicit) == explicit
    assert corpus_mod.resolve_corpus_path() == env_dir / "tinyshakespeare.txt"
    monkeypatch.delenv("CHARLM_DATA_DIR")
    assert corpus_mod.resolve_corpus_path() == Path("data") / "tinyshakespeare.txt"
    monkeypatch.chdir(tmp_path)  # no data/ here
    assert corpus_mod.resolve_corpus_path() == cache / "tinyshakespeare.txt"


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network")


def test_offline_without_copy_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(cache))
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _no_network)
    with pytest.raises(CharlmError, match=rf"(?s)could not be downloaded.*save it as tinyshakespeare.txt in {cache}/, "
                                          r"set CHARLM_DATA_DIR to its folder, or pass --data FILE"):
        corpus_mod.resolve_corpus_path()
    assert list(cache.iterdir()) == []  # no partial file left behind
    assert list(tmp_path.iterdir()) == [cache]  # nothing written to the working directory


class _FakeResponse:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def read(self, n: int) -> bytes:
        chunk, self.payload = self.payload[:n], self.payload[n:]
        return chunk

    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_download_checks_sha256_and_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(payload))
    dest = tmp_path / "d" / "tinyshakespeare.txt"
    with pytest.raises(CharlmError, match=r"sha256 is .* expected abc; not saved"):
        corpus_mod.download("http://x", dest, "abc")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    good = hashlib.sha256(payload).hexdigest()
    assert corpus_mod.download("http://x", dest, good) == dest
    assert dest.read_bytes() == payload


def test_bad_corpus_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CharlmError, match="is empty"):
        corpus_mod.load_corpus(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CharlmError, match=r"is not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        corpus_mod.load_corpus(latin)
    with pytest.raises(CharlmError, match="does not exist; give --data an existing text file"):
        corpus_mod.load_corpus(tmp_path / "missing.txt")


def test_cache_folder_is_charlm_cache_dir_else_xdg_else_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHARLM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert corpus_mod.cache_dir() == tmp_path / "home" / ".cache" / "charlm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative path is ignored
    assert corpus_mod.cache_dir() == tmp_path / "home" / ".cache" / "charlm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpus_mod.cache_dir() == tmp_path / "xdg" / "charlm"
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path / "mine"))
    assert corpus_mod.cache_dir() == tmp_path / "mine"


def test_download_lands_in_the_cache_folder_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in the working directory's data/, not beside the installed package: in the user's cache."""
    import hashlib

    import charlm

    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(corpus_mod, "CORPUS_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", lambda *a, **k: _FakeResponse(payload))
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CHARLM_CACHE_DIR")
    package = Path(charlm.__file__).parent
    before = sorted(package.parent.iterdir())
    path = corpus_mod.resolve_corpus_path()
    assert path == tmp_path / "xdg" / "charlm" / "tinyshakespeare.txt" and path.read_bytes() == payload
    assert list((work / "data").iterdir()) == [] and sorted(package.parent.iterdir()) == before
    assert not list(package.rglob("tinyshakespeare.txt"))
    assert not (package.parent / "data" / "tinyshakespeare.txt").exists()
    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", _no_network)
    assert corpus_mod.resolve_corpus_path() == path  # found there next time, offline


@pytest.mark.parametrize("option", ["--data", "--text"])
def test_a_folder_or_a_device_is_not_called_missing(tmp_path: Path, option: str) -> None:
    (tmp_path / "tinyshakespeare.txt").write_text("a corpus in the folder is not used\n")
    with pytest.raises(CharlmError) as info:
        corpus_mod.resolve_corpus_path(tmp_path, option=option)
    assert str(info.value) == f"{option} {tmp_path} is a folder; give a text file"
    with pytest.raises(CharlmError) as info:
        corpus_mod.resolve_corpus_path("/dev/null", option=option)
    assert str(info.value) == f"{option} /dev/null is not a regular file; give a text file"
    with pytest.raises(CharlmError) as info:
        corpus_mod.resolve_corpus_path(tmp_path / "nope.txt", option=option)
    what = "corpus file" if option == "--data" else "--text file"
    assert str(info.value) == f"{what} {tmp_path / 'nope.txt'} does not exist; give {option} an existing text file"


def test_the_cli_says_what_a_folder_or_a_device_given_as_corpus_is(tmp_path: Path, sharp_checkpoint: Path) -> None:
    from typer.testing import CliRunner

    from charlm.cli import app

    runner = CliRunner()
    for args, message in [
        (["train", "--config", "smoke", "--data", str(tmp_path), "--out", str(tmp_path / "runs")],
         f"error: --data {tmp_path} is a folder; give a text file"),
        (["data", "--data", "/dev/null"], "error: --data /dev/null is not a regular file; give a text file"),
        (["eval", "--checkpoint", str(sharp_checkpoint), "--text", str(tmp_path)],
         f"error: --text {tmp_path} is a folder; give a text file"),
        (["eval", "--checkpoint", str(sharp_checkpoint), "--text", "/dev/null"],
         "error: --text /dev/null is not a regular file; give a text file"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.strip() == message, (args, result.output)
    assert not (tmp_path / "runs").exists()  # no run folder made for a bad corpus


def test_named_configs_are_found_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config NAME`` reads the checkout's configs/NAME.yaml (this suite runs on a source tree or an editable
    install; a regular install's copy inside the package: tests/test_packaging.py), whatever the working
    directory; ``--config PATH`` reads any file."""
    import charlm
    from charlm.config import resolve_config_path

    monkeypatch.chdir(tmp_path)
    package_configs = Path(charlm.__file__).resolve().parent.parent / "configs"
    for name in ("default", "smoke", "awd-lstm"):
        assert resolve_config_path(name) == package_configs / f"{name}.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  hidden_size: 48\n")
    assert load_config(str(mine)).model.hidden_size == 48
    assert load_config("mine.yaml").model.hidden_size == 48  # relative to the working directory
    with pytest.raises(CharlmError, match="config 'sub/smoke' not found"):
        load_config("sub/smoke")  # a path is a path, not a name
