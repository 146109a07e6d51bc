"""Configuration: typed sections with defaults, YAML files, and ``--set section.key=value`` overrides.

Every value is a primitive (int, float, bool, str, None), so a config round-trips through YAML and
through a checkpoint loaded with ``weights_only=True``. An unknown key or a value of the wrong type is
a :class:`CharlmError` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from charlm.cells.registry import cell_registry_names
from charlm.util.atomic import path_kind
from charlm.util.errors import CharlmError
from charlm.util.yaml_text import joined_surrogates, read_yaml


def config_dir() -> Path:
    """Where the named configs are: the package's ``configs/`` in a regular install (the wheel puts the
    repository's top-level ``configs/`` there, see ``setup.py``), else the checkout's ``configs/`` (a source tree
    or an editable install, which does not map a subpackage to another folder)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training windows."""

    path: str | None = None  # None: $CHARLM_DATA_DIR, data/, then download tiny Shakespeare
    batch_size: int = 32  # B streams side by side (per process under DDP)
    bptt: int = 128  # window length T
    variable_bptt: bool = False  # AWD-LSTM: T or T/2, then N(T, 5) per window
    eval_batch_size: int = 16  # streams for validation / test
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    # fractions: train, then val_fraction, then test_fraction of the corpus (90/5/5). nanogpt: nanoGPT's split,
    # the first 90 % to train and the last 10 % scored, as both val and test (the literature's figures)
    split: Literal["fractions", "nanogpt"] = "fractions"
    drop_unknown: bool = False  # a given vocabulary (--init-from): drop the text's characters outside it


@dataclass
class ModelConfig:
    """The network: embedding -> recurrent layers -> decoder, and its regularizers."""

    cell: str = "lstm"
    embedding_size: int = 256
    hidden_size: int = 256
    num_layers: int = 2
    tie_weights: bool = True  # last layer sized to the embedding, decoder shares its matrix
    dropout: float = 0.1  # locked dropout on the last layer's output
    dropouth: float = 0.1  # locked dropout between recurrent layers
    dropouti: float = 0.0  # locked dropout on the embedding output
    dropoute: float = 0.0  # embedding dropout: whole characters
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden matrices
    weight_drop_variational: bool = False  # drop whole rows instead of elements
    layer_norm: bool = False  # LayerNorm on each recurrent layer's output
    torch_rnn: bool = True  # use the torch RNN kernels (nn.LSTM / nn.GRU / nn.RNN's) where the cell is one
    init: Literal["xavier", "kaiming"] = "xavier"
    forget_bias: float = 0.0  # LSTM-family forget-gate bias at init (lstm-b always uses 1)
    compile: bool = False  # torch.compile the custom cells' step
    mogrifier_rounds: int = 5  # mogrifier: rounds of mutual gating of x and h (0: exactly lstm)
    mogrifier_rank: int = 0  # mogrifier: rank k of the factorised Q / R matrices (0: full rank)


@dataclass
class OptimConfig:
    """Optimizer, schedule and the AWD-LSTM penalties."""

    optimizer: Literal["adamw", "ntasgd"] = "adamw"
    lr: float = 3e-3
    min_lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    clip: float = 1.0  # gradient-norm clipping; 0 turns it off
    alpha: float = 0.0  # AR: alpha * mean(dropped_h ** 2)
    beta: float = 0.0  # TAR: beta * mean((h_t - h_{t-1}) ** 2)
    nonmono: int = 5  # NT-ASGD: evaluations without improvement before averaging


@dataclass
class TrainConfig:
    """How long, where, on what, and what to keep."""

    name: str | None = None  # run folder name; None: <cell>-<date>-<time>
    out: str = "checkpoints"
    seed: int = 1234
    max_epochs: int = -1
    max_steps: int = -1
    max_time: float | None = 840.0  # seconds
    val_every_steps: int = 200  # 0: once per epoch
    checkpoint_every_steps: int = 100  # refresh last.ckpt this often (and at every epoch end)
    log_every_steps: int = 20
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed for the LSTM on a CPU with native bfloat16, else 32-true
    threads: int = 0  # torch CPU threads; 0 leaves torch's choice
    on_nan: Literal["stop", "skip"] = "stop"
    progress: bool = True
    loggers: str = "csv"  # comma-separated: csv (<run>/metrics.csv), tensorboard (<run>/tensorboard/)
    init_from: str | None = None  # fine-tune: start from this checkpoint's weights (fresh optimizer, new run)
    init_from_sha256: str | None = None  # that checkpoint's sha256 (recorded; checked when given)


@dataclass
class SampleConfig:
    """The short sample printed at each validation so the user sees the model learn."""

    enabled: bool = True
    prime: str = "ROMEO:"
    length: int = 200
    temperature: float = 0.8


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


_SECTION_CLASSES: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                                     "train": TrainConfig, "sample": SampleConfig}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _SECTION_CLASSES.items()}

# Keys renamed since checkpoints were first written: the old dotted name -> the new one. A checkpoint's
# config is read under the new names (from_dict); in a config file or --set the old name is an error
# that gives the new one.
RENAMED_KEYS = {"model.native": "model.torch_rnn"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# A number with an exponent that PyYAML (YAML 1.1, which wants a dot before it) reads as a string: ``1e-4``,
# ``3E5``, ``.5e3``. YAML 1.2 and Python read it as a float, and so does a key whose type is float.
_EXPONENT_FLOAT = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` (int -> float allowed), or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except CharlmError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
            return float(value)
    elif tp is str and isinstance(value, str):
        return joined_surrogates(value)
    raise CharlmError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _section(name: str) -> type:
    if name not in _SECTION_CLASSES:
        raise CharlmError(f"unknown config section '{name}'; sections: {', '.join(_SECTION_CLASSES)}")
    return _SECTION_CLASSES[name]


def apply(config: Config, values: dict[str, Any], source: str = "config") -> Config:
    """Merge a nested mapping ``{section: {key: value}}`` into ``config`` (checked, in place)."""
    if not isinstance(values, dict):
        raise CharlmError(f"{source}: expected a mapping of sections (data, model, optim, train, sample)")
    for section_name, entries in values.items():
        _section(str(section_name))
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise CharlmError(f"{source}: section '{section_name}' must be a mapping of keys to values")
        section = getattr(config, section_name)
        for key, value in entries.items():
            dotted = f"{section_name}.{key}"
            setattr(section, key, _coerce(dotted, value, key_type(dotted)))
    return config


def key_type(dotted: str) -> Any:
    """The type of config key ``section.key`` (e.g. ``int``, ``float | None``, a ``Literal``); an unknown or
    renamed key is an error that names it."""
    section_name, _, key = dotted.partition(".")
    _section(section_name)
    if dotted in RENAMED_KEYS:
        raise CharlmError(f"config key '{dotted}' is now called '{RENAMED_KEYS[dotted]}'; use that name")
    hints = _HINTS[section_name]
    if key not in hints:
        raise CharlmError(f"unknown config key '{dotted}'; keys of '{section_name}': {', '.join(hints)}")
    return hints[key]


def parse_override(text: str) -> dict[str, dict[str, Any]]:
    """``"model.hidden_size=512"`` -> ``{"model": {"hidden_size": 512}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise CharlmError(f"--set expects section.key=value, got '{text}'")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise CharlmError(f"--set expects section.key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {parts[0]: {parts[1]: value}}


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a named config (``smoke``: ``configs/smoke.yaml``)."""
    path = Path(name_or_path).expanduser()
    kind = path_kind(path)
    if kind == "a regular file":
        return path
    folder = config_dir()
    packaged = folder / f"{name_or_path}.yaml"
    if Path(name_or_path).name == name_or_path and packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    if kind is not None:  # a folder, /dev/null, a pipe: say what it is
        raise CharlmError(f"config {path} is {kind}, not a YAML file; give a YAML file or one of: {known}")
    raise CharlmError(f"config '{name_or_path}' not found; give a YAML file or one of: {known}")


def load_config(name_or_path: str | None = "default", overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then each ``section.key=value`` override, then checks."""
    config = Config()
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            values = read_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CharlmError(f"config file {path} is not valid YAML: {exc}") from None
        apply(config, values, source=str(path))
    for text in overrides or []:
        apply(config, parse_override(text), source="--set")
    validate(config)
    return config


def _renamed_keys(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every key of :data:`RENAMED_KEYS` under its new name (one given under both: the new)."""
    if not isinstance(values, dict):
        return values  # apply() says what is wrong with it
    out = {name: dict(entries) if isinstance(entries, dict) else entries for name, entries in values.items()}
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        entries = out.get(section)
        if isinstance(entries, dict) and old_key in entries:
            value = entries.pop(old_key)
            entries.setdefault(new_key, value)
    return out


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint (unknown keys are an error: an incompatible version), keys saved
    under an earlier name (:data:`RENAMED_KEYS`) read under their present one."""
    return apply(Config(), _renamed_keys(values), source="checkpoint config")


MAX_LAYERS = 100  # recurrent layers: 100 of the default size build in about 2 s
SEED_MAX = 2**32 - 1  # the largest seed lightning.seed_everything accepts (numpy's uint32)


def check_seed(value: int, name: str) -> None:
    """Raise unless ``value`` is a seed Lightning's ``seed_everything`` (and numpy) accept: 0 to 2**32 - 1."""
    if not 0 <= value <= SEED_MAX:
        raise CharlmError(f"{name} must be a whole number from 0 to {SEED_MAX}, got {value}")


def _require(values: dict[str, float], ok: Callable[[float], bool], must: str) -> None:
    """One error naming the first key whose value fails ``ok``: "config key 'K' must <must>, got V"."""
    for key, value in values.items():
        if not ok(value):
            raise CharlmError(f"config key '{key}' must {must}, got {value}")


def validate(config: Config) -> None:
    """Range checks the types cannot express; ``model.cell`` is set to its registry spelling."""
    d, m, o, t, s = config.data, config.model, config.optim, config.train, config.sample
    for section_name in _SECTION_CLASSES:  # first: NaN passes every comparison below
        for key, value in dataclasses.asdict(getattr(config, section_name)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise CharlmError(f"config key '{section_name}.{key}' must be a finite number, got {value}")
    check_seed(t.seed, "config key 'train.seed'")
    positive = {"data.batch_size": d.batch_size, "data.bptt": d.bptt, "data.eval_batch_size": d.eval_batch_size,
                "model.embedding_size": m.embedding_size, "model.hidden_size": m.hidden_size,
                "model.num_layers": m.num_layers, "train.num_nodes": t.num_nodes,
                "train.log_every_steps": t.log_every_steps, "optim.nonmono": o.nonmono}
    _require(positive, lambda v: v >= 1, "be at least 1")
    if m.num_layers > MAX_LAYERS:  # (the sizes are bounded by memory: charlm.model.char_lm.check_fits_in_memory)
        raise CharlmError(f"config key 'model.num_layers' must be at most {MAX_LAYERS} (a deeper stack takes "
                          f"minutes just to build), got {m.num_layers:,}")
    dropouts = {f"model.{key}": getattr(m, key)
                for key in ("dropout", "dropouth", "dropouti", "dropoute", "weight_drop")}
    _require(dropouts, lambda v: 0.0 <= v < 1.0, "be in [0, 1)")
    _require({"data.val_fraction": d.val_fraction, "data.test_fraction": d.test_fraction},
             lambda v: 0.0 < v < 0.5, "be in (0, 0.5)")
    if d.split == "nanogpt" and (d.val_fraction, d.test_fraction) != (DataConfig.val_fraction,
                                                                      DataConfig.test_fraction):
        raise CharlmError(f"config key 'data.split' is nanogpt, which fixes the split at 90 % train and 10 % val "
                          f"(= test); leave data.val_fraction and data.test_fraction at their defaults "
                          f"({DataConfig.val_fraction:g}, {DataConfig.test_fraction:g}), or use data.split=fractions")
    nonneg = {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay,
              "optim.clip": o.clip, "optim.alpha": o.alpha, "optim.beta": o.beta,
              "optim.warmup_steps": o.warmup_steps, "train.val_every_steps": t.val_every_steps,
              "train.checkpoint_every_steps": t.checkpoint_every_steps, "train.threads": t.threads,
              "sample.length": s.length, "sample.temperature": s.temperature,
              "model.mogrifier_rounds": m.mogrifier_rounds, "model.mogrifier_rank": m.mogrifier_rank}
    _require(nonneg, lambda v: v >= 0, "not be negative")
    if o.lr == 0:
        raise CharlmError("config key 'optim.lr' must be positive, got 0")
    for key, value in {"train.max_steps": t.max_steps, "train.max_epochs": t.max_epochs}.items():
        if value == 0 or value < -1:
            raise CharlmError(f"config key '{key}' must be at least 1 (or -1: no limit), got {value}")
    if t.max_time is not None and t.max_time <= 0:
        raise CharlmError(f"config key 'train.max_time' must be positive seconds or null, got {t.max_time}")
    if t.max_epochs == -1 and t.max_steps == -1 and t.max_time is None:
        raise CharlmError("no stopping rule: set train.max_epochs, train.max_steps or train.max_time")
    m.cell = cell_registry_names([m.cell])[0]
    t.loggers = ",".join(logger_names(t.loggers))
    if t.init_from_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", t.init_from_sha256):
        raise CharlmError("config key 'train.init_from_sha256' must be 64 lowercase hex digits (a sha256) or null, "
                          f"got {t.init_from_sha256!r}")


LOGGERS = ("csv", "tensorboard")  # the names train.loggers (--logger) takes


def logger_names(text: str) -> list[str]:
    """``"csv, TensorBoard"`` -> ``["csv", "tensorboard"]``: known names, each once, at least one."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise CharlmError(f"config key 'train.loggers' (--logger) must name one or more of {', '.join(LOGGERS)} "
                          f"(comma-separated), got {text!r}")
    return list(dict.fromkeys(names))


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
