"""The search space of ``charlm tune``: a YAML file of config keys and the distribution each is drawn from.

.. code-block:: yaml

    optim.lr: loguniform(1e-4, 1e-2)     # a float, uniform in log space
    model.dropout: uniform(0, 0.4)       # a float
    model.hidden_size: int(64, 512)      # a whole number, uniform
    data.batch_size: intlog(8, 64)       # a whole number, uniform in log space
    model.cell: [lstm, gru]              # one of these values

Keys are the config's own (``charlm/config.py``), written ``section.key`` or nested under their section.
Everything is checked before a trial starts: an unknown key, a malformed distribution, a distribution of the
wrong kind for its key (``uniform`` on a whole-number key) and a bound or choice the config refuses (a
dropout of 1, an unknown cell) are each one :class:`CharlmError` that names the key.
"""

from __future__ import annotations

import copy
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from charlm.config import Config, apply, key_type, validate
from charlm.util.errors import CharlmError
from charlm.util.yaml_text import read_yaml

Kind = Literal["uniform", "loguniform", "int", "intlog", "choice"]
FORMS = "uniform(low, high), loguniform(low, high), int(low, high), intlog(low, high) or a list of choices [a, b]"
# set by tune itself for every trial: where its run folder is
RESERVED = {"train.name": "each trial's run folder is named after it", "train.out": "trials run under --out"}
_CALL = re.compile(r"^\s*(uniform|loguniform|int|intlog)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Param:
    """One config key and the distribution it is drawn from (``choices`` for a categorical one)."""

    key: str
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Draw this key's value for an Optuna trial (its parameter is named after the key)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "intlog"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.kind == "intlog")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"[{', '.join(str(c) for c in self.choices)}]"
        return f"{self.kind}({self.low:g}, {self.high:g})"

    def extremes(self) -> tuple[Any, ...]:
        """The values the config must accept: both bounds, or every choice."""
        if self.kind == "choice":
            return self.choices
        if self.kind in ("int", "intlog"):
            return int(self.low), int(self.high)
        return self.low, self.high


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str  # the file, for messages

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One value per key, drawn for ``trial``: ``{"optim.lr": 0.003, ...}``."""
        return {p.key: p.suggest(trial) for p in self.params}

    def describe(self) -> dict[str, str]:
        return {p.key: p.describe() for p in self.params}

    def check(self, base: Config) -> None:
        """Raise unless ``base`` with each bound (each choice) of each key in place is a valid config."""
        for p in self.params:
            for value in p.extremes():
                try:
                    validate(with_values(base, {p.key: value}))
                except CharlmError as exc:
                    raise CharlmError(f"search space {self.source}: '{p.key}: {p.describe()}': {exc}") from None


def with_values(base: Config, values: dict[str, Any]) -> Config:
    """A copy of ``base`` with ``{"section.key": value}`` set (types checked, ranges not: see ``validate``)."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return apply(copy.deepcopy(base), nested)


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file (see the module docstring)."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), f"search space {path}")
    except FileNotFoundError:
        raise CharlmError(f"search space file {path} not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CharlmError(f"search space {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_space(raw, str(path))


def parse_space(raw: Any, source: str = "search space") -> SearchSpace:
    """The search space written in ``raw`` (the YAML file's content)."""
    example = "e.g. 'optim.lr: loguniform(1e-4, 1e-2)'"
    if not isinstance(raw, dict) or not raw:
        raise CharlmError(f"search space {source} must map config keys to distributions, {example}")
    entries: dict[str, Any] = {}
    for name, value in raw.items():
        name = str(name)
        if "." not in name and isinstance(value, dict):  # nested under its section
            entries.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            entries[name] = value
    return SearchSpace(tuple(_param(key, value, source) for key, value in entries.items()), source)


def _param(key: str, value: Any, source: str) -> Param:
    where = f"search space {source}"
    if key.count(".") != 1:
        raise CharlmError(f"{where}: '{key}' is not a config key; write section.key, e.g. 'optim.lr'")
    try:
        tp = key_type(key)
    except CharlmError as exc:
        raise CharlmError(f"{where}: {exc}") from None
    if key in RESERVED:
        raise CharlmError(f"{where}: '{key}' cannot be searched ({RESERVED[key]})")
    if isinstance(value, list):
        return _choices(key, value, tp, where)
    match = _CALL.match(value) if isinstance(value, str) else None
    if match is None:
        raise CharlmError(f"{where}: '{key}: {value}' is not a distribution; write {FORMS}")
    kind = typing.cast(Kind, match.group(1))
    args = [a.strip() for a in match.group(2).split(",")]
    try:
        low, high = (float(a) for a in args) if len(args) == 2 else (None, None)
    except ValueError:
        low = high = None
    shown = f"'{key}: {value.strip()}'"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        raise CharlmError(f"{where}: {shown} needs two finite numbers, {kind}(low, high)")
    if not low < high:
        raise CharlmError(f"{where}: {shown} needs low < high")
    if kind in ("int", "intlog") and not (low.is_integer() and high.is_integer()):
        raise CharlmError(f"{where}: {shown} needs whole-number bounds")
    if kind in ("loguniform", "intlog") and low <= 0:
        raise CharlmError(f"{where}: {shown} needs low > 0 (it is drawn in log space)")
    if kind in ("uniform", "loguniform") and _whole_numbers_only(tp):
        raise CharlmError(f"{where}: '{key}' takes whole numbers; use int(low, high) or intlog(low, high)")
    if not _numbers_allowed(tp):
        raise CharlmError(f"{where}: '{key}' takes no numbers; list its choices, e.g. [a, b]")
    return Param(key, kind, low, high)


def _choices(key: str, values: list[Any], tp: Any, where: str) -> Param:
    if not values:
        raise CharlmError(f"{where}: '{key}' has an empty list of choices")
    if any(isinstance(v, (list, dict)) for v in values):
        raise CharlmError(f"{where}: '{key}' choices must be single values (numbers, strings, true/false, null)")
    if len({repr(v) for v in values}) != len(values):
        raise CharlmError(f"{where}: '{key}' lists a choice twice")
    for v in values:
        try:
            apply(Config(), {key.split(".")[0]: {key.split(".")[1]: v}})
        except CharlmError as exc:
            raise CharlmError(f"{where}: {exc}") from None
    return Param(key, "choice", choices=tuple(values))


def _members(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _whole_numbers_only(tp: Any) -> bool:
    members = _members(tp)
    return int in members and float not in members


def _numbers_allowed(tp: Any) -> bool:
    return any(m in (int, float) for m in _members(tp))
