"""Every rule of :func:`charlm.config.validate` at its boundary: the value just past it refused with its whole
message, the value on it accepted; and the config's parsing, types and YAML, message for message. (Which
configs load and how the CLI reports them: ``test_vocab_config_corpus.py``.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml

import charlm
from charlm.config import (
    RENAMED_KEYS,
    Config,
    apply,
    config_dir,
    dump_yaml,
    from_dict,
    key_type,
    load_config,
    logger_names,
    parse_override,
    resolve_config_path,
)
from charlm.util.errors import CharlmError
from charlm.util.yaml_text import joined_surrogates, read_yaml

KNOWN = "awd-lstm, default, smoke"  # the named configs in configs/
MODEL_KEYS = ("cell, embedding_size, hidden_size, num_layers, tie_weights, dropout, dropouth, dropouti, dropoute, "
              "weight_drop, weight_drop_variational, layer_norm, torch_rnn, init, forget_bias, compile, "
              "mogrifier_rounds, mogrifier_rank")


def refused(message: str) -> AbstractContextManager[Any]:
    """Expect this exact message, whole."""
    return pytest.raises(CharlmError, match=f"^{re.escape(message)}$")


def loads(*overrides: str) -> Config:
    return load_config(None, list(overrides))


# --------------------------------------------------------------------------------------------- validate
POSITIVE = ["data.batch_size", "data.bptt", "data.eval_batch_size", "model.embedding_size", "model.hidden_size",
            "model.num_layers", "train.num_nodes", "train.log_every_steps", "optim.nonmono"]
DROPOUTS = ["model.dropout", "model.dropouth", "model.dropouti", "model.dropoute", "model.weight_drop"]
FRACTIONS = ["data.val_fraction", "data.test_fraction"]
NOT_NEGATIVE = ["optim.lr", "optim.min_lr", "optim.weight_decay", "optim.clip", "optim.alpha", "optim.beta",
                "optim.warmup_steps", "train.val_every_steps", "train.checkpoint_every_steps", "train.threads",
                "sample.length", "sample.temperature", "model.mogrifier_rounds", "model.mogrifier_rank"]


@pytest.mark.parametrize("key", POSITIVE)
def test_sizes_must_be_at_least_one(key: str) -> None:
    with refused(f"config key '{key}' must be at least 1, got 0"):
        loads(f"{key}=0")
    assert loads(f"{key}=1") is not None


def test_layers_at_most_a_hundred() -> None:
    assert loads("model.num_layers=100").model.num_layers == 100
    with refused("config key 'model.num_layers' must be at most 100 (a deeper stack takes minutes just to build), "
                 "got 100,001"):
        loads("model.num_layers=100001")


# (key, the interval as the message writes it, values just outside it, values on its edges)
INTERVALS = ([(key, "[0, 1)", ("1.0", "-0.5"), ("0", "0.99")) for key in DROPOUTS]
             + [(key, "(0, 0.5)", ("0", "0.5"), ("0.001", "0.49")) for key in FRACTIONS])


@pytest.mark.parametrize(("key", "interval", "outside", "inside"), INTERVALS)
def test_dropouts_and_split_fractions_in_their_interval(key: str, interval: str, outside: tuple[str, ...],
                                                       inside: tuple[str, ...]) -> None:
    for bad in outside:
        with refused(f"config key '{key}' must be in {interval}, got {float(bad)}"):
            loads(f"{key}={bad}")
    for good in inside:
        assert loads(f"{key}={good}") is not None


def test_nanogpt_split_fixes_the_fractions() -> None:
    assert loads("data.split=nanogpt").data.split == "nanogpt"
    for key in FRACTIONS:
        with refused("config key 'data.split' is nanogpt, which fixes the split at 90 % train and 10 % val (= test); "
                     "leave data.val_fraction and data.test_fraction at their defaults (0.05, 0.05), or use "
                     "data.split=fractions"):
            loads("data.split=nanogpt", f"{key}=0.1")


@pytest.mark.parametrize("key", NOT_NEGATIVE)
def test_rates_and_counts_not_negative(key: str) -> None:
    shown = "-1.0" if key_type(key) is float else "-1"
    with refused(f"config key '{key}' must not be negative, got {shown}"):
        loads(f"{key}=-1")
    if key != "optim.lr":
        assert loads(f"{key}=0") is not None


def test_learning_rate_positive() -> None:
    with refused("config key 'optim.lr' must be positive, got 0"):
        loads("optim.lr=0")
    assert loads("optim.lr=1e-9").optim.lr == 1e-9


@pytest.mark.parametrize("key", ["train.max_steps", "train.max_epochs"])
def test_step_and_epoch_limits(key: str) -> None:
    for bad in (0, -2):
        with refused(f"config key '{key}' must be at least 1 (or -1: no limit), got {bad}"):
            loads(f"{key}={bad}")
    assert loads(f"{key}=-1") is not None and loads(f"{key}=1") is not None


def test_time_limit_positive_or_null() -> None:
    for bad in ("0", "-5"):
        with refused(f"config key 'train.max_time' must be positive seconds or null, got {float(bad)}"):
            loads(f"train.max_time={bad}")
    assert loads("train.max_time=0.5").train.max_time == 0.5
    with refused("no stopping rule: set train.max_epochs, train.max_steps or train.max_time"):
        loads("train.max_time=null")
    for limit in ("train.max_steps=1", "train.max_epochs=1"):
        assert loads("train.max_time=null", limit).train.max_time is None


def test_not_finite_is_named_in_any_section() -> None:
    for key in ("data.val_fraction", "model.forget_bias", "optim.beta1", "train.max_time", "sample.temperature"):
        with refused(f"config key '{key}' must be a finite number, got nan"):
            loads(f"{key}=.nan")


def test_cell_and_loggers_take_their_registry_spelling() -> None:
    config = loads("model.cell= LSTM ", "train.loggers=CSV, tensorboard,csv")
    assert (config.model.cell, config.train.loggers) == ("lstm", "csv,tensorboard")


def test_init_from_sha256_is_64_lowercase_hex() -> None:
    digest = "0123456789abcdef" * 4
    assert loads(f"train.init_from_sha256={digest}").train.init_from_sha256 == digest
    for bad in (digest.upper(), digest[:-1], digest + "0"):
        with refused("config key 'train.init_from_sha256' must be 64 lowercase hex digits (a sha256) or null, "
                     f"got '{bad}'"):
            loads(f"train.init_from_sha256={bad}")


@pytest.mark.parametrize(("text", "names"), [("csv", ["csv"]), (" CSV , TensorBoard ,csv,", ["csv", "tensorboard"])])
def test_logger_names(text: str, names: list[str]) -> None:
    assert logger_names(text) == names


@pytest.mark.parametrize("text", ["", " , ", "csv tensorboard", "csv,wandb"])
def test_logger_names_refused(text: str) -> None:
    with refused("config key 'train.loggers' (--logger) must name one or more of csv, tensorboard (comma-separated), "
                 f"got {text!r}"):
        logger_names(text)


# --------------------------------------------------------------------------------------------- types and keys
@pytest.mark.parametrize(("override", "message"), [
    ("model.hidden_size=1.5", "config key 'model.hidden_size' must be int, got 1.5"),
    ("model.hidden_size=true", "config key 'model.hidden_size' must be int, got True"),
    ("optim.lr=true", "config key 'optim.lr' must be float, got True"),
    ("optim.lr=fast", "config key 'optim.lr' must be float, got 'fast'"),
    ("model.tie_weights=1", "config key 'model.tie_weights' must be bool, got 1"),
    ("train.name=[1]", "config key 'train.name' must be str or null, got [1]"),
    ("train.max_time=soon", "config key 'train.max_time' must be float or null, got 'soon'"),
    ("train.devices=1.5", "config key 'train.devices' must be int or str, got 1.5"),
    ("optim.optimizer=sgd", "config key 'optim.optimizer' must be 'adamw' | 'ntasgd', got 'sgd'"),
    ("model.native=false", "config key 'model.native' is now called 'model.torch_rnn'; use that name"),
    ("model.size=3", f"unknown config key 'model.size'; keys of 'model': {MODEL_KEYS}"),
    ("modle.size=3", "unknown config section 'modle'; sections: data, model, optim, train, sample"),
])
def test_a_wrong_type_or_key_names_the_key(override: str, message: str) -> None:
    with refused(message):
        loads(override)


def test_values_are_coerced_only_where_safe() -> None:
    config = loads("optim.lr=1", "train.devices=2", "train.name=null", "train.max_time=90")
    assert isinstance(config.optim.lr, float) and config.optim.lr == 1.0
    assert config.train.devices == 2 and config.train.name is None and config.train.max_time == 90.0
    assert loads("train.devices=cpu").train.devices == "cpu"
    assert loads("model.init=kaiming").model.init == "kaiming"
    assert loads("model.tie_weights=false").model.tie_weights is False


@pytest.mark.parametrize(("text", "value"), [("1e-4", 1e-4), ("3E-4", 3e-4), ("+.5e-3", 5e-4), ("2.e-3", 2e-3)])
def test_a_float_with_an_exponent_and_no_dot_is_a_float(text: str, value: float, tmp_path: Path) -> None:
    # PyYAML reads 1e-4 as the string '1e-4' (YAML 1.1 wants a dot); a float key takes it as the number
    assert loads(f"optim.lr={text}").optim.lr == value
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  min_lr: {text}\n", encoding="utf-8")
    assert load_config(str(path)).optim.min_lr == value
    if isinstance(yaml.safe_load(text), str):
        assert loads(f"train.name={text}").train.name == text  # a string key keeps the text
    with refused("config key 'optim.nonmono' must be int, got '1e3'"):
        loads("optim.nonmono=1e3")
    with refused("config key 'optim.lr' must be float, got '1e'"):
        loads("optim.lr=1e")


def test_key_types() -> None:
    assert key_type("model.hidden_size") is int
    assert key_type("optim.lr") is float
    assert key_type("train.name") == (str | None)
    with refused("unknown config section 'x'; sections: data, model, optim, train, sample"):
        key_type("x.y")


@pytest.mark.parametrize(("text", "parsed"), [
    ("model.hidden_size=512", {"model": {"hidden_size": 512}}),
    ("train.name=a=b", {"train": {"name": "a=b"}}),
    ("train.name=", {"train": {"name": ""}}),
    ("train.name=  ", {"train": {"name": ""}}),
    (" train.name =x", {"train": {"name": "x"}}),
    ("train.name=[unclosed", {"train": {"name": "[unclosed"}}),  # not YAML: the text as it is
])
def test_overrides_parse(text: str, parsed: dict[str, Any]) -> None:
    assert parse_override(text) == parsed


@pytest.mark.parametrize("text", ["hidden_size", "model=3", "model.hidden.size=3", ".x=1", "model.=1"])
def test_overrides_refused(text: str) -> None:
    with refused(f"--set expects section.key=value, got '{text}'"):
        parse_override(text)


def test_apply_refuses_what_is_not_a_mapping() -> None:
    with refused("my.yaml: expected a mapping of sections (data, model, optim, train, sample)"):
        apply(Config(), ["model"], source="my.yaml")  # type: ignore[arg-type]
    with refused("my.yaml: section 'model' must be a mapping of keys to values"):
        apply(Config(), {"model": 3}, source="my.yaml")
    assert apply(Config(), {"model": None, "optim": {"lr": 0.5}}).optim.lr == 0.5  # an empty section, then more
    with refused(f"unknown config key 'model.hidden.size'; keys of 'model': {MODEL_KEYS}"):
        apply(Config(), {"model": {"hidden.size": 8}})  # a file's key with a dot in it is a key, not a section
    with refused("config: section 'model' must be a mapping of keys to values"):
        apply(Config(), {"model": [1]})


def test_surrogate_pairs_are_joined_and_lone_ones_kept() -> None:
    assert joined_surrogates("a\ud83c\udfadb") == "a\U0001f3adb"
    assert joined_surrogates("x\ud83c") == "x\ud83c"
    assert joined_surrogates("plain") == "plain"
    assert loads('train.name="\\ud83c\\udfad"').train.name == "\U0001f3ad"


# --------------------------------------------------------------------------------------------- files
def test_named_configs_and_files(tmp_path: Path) -> None:
    assert config_dir() / "smoke.yaml" == resolve_config_path("smoke")
    assert (config_dir() / "default.yaml").is_file()
    mine = tmp_path / "smoke"  # a file named like a config is the file
    mine.write_text("model:\n  hidden_size: 8\n", encoding="utf-8")
    assert resolve_config_path(str(mine)) == mine
    with refused(f"config 'nope' not found; give a YAML file or one of: {KNOWN}"):
        resolve_config_path("nope")
    with refused(f"config '{tmp_path / 'smoke.yaml'}' not found; give a YAML file or one of: {KNOWN}"):
        resolve_config_path(str(tmp_path / "smoke.yaml"))  # a path is never a named config
    with refused(f"config {tmp_path} is a folder, not a YAML file; give a YAML file or one of: {KNOWN}"):
        resolve_config_path(str(tmp_path))


def test_a_key_given_twice_is_refused_with_its_lines() -> None:
    with refused("f.yaml gives 'model.hidden_size' twice (lines 2 and 4); a key given twice is a mistake: keep one"):
        read_yaml("model:\n  hidden_size: 8\n  cell: gru\n  hidden_size: 9\n", "f.yaml")
    with refused("f.yaml gives 'a' twice (lines 2 and 3); a key given twice is a mistake: keep one"):
        read_yaml("- x: 1\n- a: 1\n  a: 2\n", "f.yaml")
    assert read_yaml("model:\n  hidden_size: 8\noptim:\n  hidden_size: 8\n", "f.yaml") == {
        "model": {"hidden_size": 8}, "optim": {"hidden_size": 8}}


def test_load_config_order_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 8\n  cell: gru\n", encoding="utf-8")
    config = load_config(str(path), ["model.hidden_size=16"])
    assert (config.model.hidden_size, config.model.cell) == (16, "gru")
    path.write_text("", encoding="utf-8")
    assert load_config(str(path)).model == Config().model
    path.write_text("model: [\n", encoding="utf-8")
    with pytest.raises(CharlmError, match=f"^config file {re.escape(str(path))} is not valid YAML: "):
        load_config(str(path))
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(CharlmError, match=f"^config file {re.escape(str(path))} is not valid YAML: "):
        load_config(str(path))
    path.write_text("model:\n  hidden_size: 0\n", encoding="utf-8")
    with refused("config key 'model.hidden_size' must be at least 1, got 0"):
        load_config(str(path))


def test_a_checkpoints_config_reads_renamed_keys() -> None:
    (old, new), = RENAMED_KEYS.items()
    section, old_key = old.split(".")
    new_key = new.split(".")[1]
    saved = Config().to_dict()
    saved[section].pop(new_key)
    saved[section][old_key] = False
    assert getattr(from_dict(saved).model, new_key) is False
    assert saved[section][old_key] is False and new_key not in saved[section]  # the caller's mapping is unchanged
    saved[section][new_key] = True  # both: the new name wins
    assert getattr(from_dict(saved).model, new_key) is True
    with refused("checkpoint config: expected a mapping of sections (data, model, optim, train, sample)"):
        from_dict([])  # type: ignore[arg-type]
    assert from_dict({"model": None}) == Config()
    with refused("checkpoint config: section 'model' must be a mapping of keys to values"):
        from_dict({"model": 3})


def test_load_config_defaults_to_the_default_config() -> None:
    assert load_config() == load_config("default") != Config()


def test_a_files_mistakes_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: 3\n", encoding="utf-8")
    with refused(f"{path}: section 'model' must be a mapping of keys to values"):
        load_config(str(path))
    path.write_text("[1, 2]\n", encoding="utf-8")
    with refused(f"{path}: expected a mapping of sections (data, model, optim, train, sample)"):
        load_config(str(path))
    path.write_text("model:\n  cell: gru\n  cell: lstm\n", encoding="utf-8")
    with refused(f"config file {path} gives 'model.cell' twice (lines 2 and 3); a key given twice is a mistake: "
                 "keep one"):
        load_config(str(path))


def test_a_config_file_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sample:\n  prime: \"ROM\u00c9O \u2014\"\n", encoding="utf-8")
    assert load_config(str(path)).sample.prime == "ROM\u00c9O \u2014"  # here, and in a process on the C locale:
    here = str(Path(charlm.__file__).resolve().parent.parent)  # the charlm this process imported, in the child too
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    code = f"from charlm.config import load_config; print(ascii(load_config({str(path)!r}).sample.prime))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ascii("ROM\u00c9O \u2014")


def test_dump_yaml_round_trips_in_declared_order() -> None:
    config = loads("model.hidden_size=48", "train.name=x")
    text = dump_yaml(config)
    assert from_dict(yaml.safe_load(text)) == config
    assert [line for line in text.splitlines() if not line.startswith(" ")] == [
        "data:", "model:", "optim:", "train:", "sample:"]
    model_keys = [line.split(":")[0].strip() for line in text.split("model:\n")[1].split("optim:")[0].splitlines()]
    assert model_keys[:3] == ["cell", "embedding_size", "hidden_size"]
