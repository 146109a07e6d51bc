"""Reading YAML text as charlm does: a mapping that gives a key twice is refused (:func:`read_yaml`), and a
surrogate pair that JSON-style escapes leave in a string is joined into its character (:func:`joined_surrogates`)."""

from __future__ import annotations

from typing import Any

import yaml

from charlm.util.errors import CharlmError


def read_yaml(text: str, source: str) -> Any:
    """YAML text as Python values; a mapping that gives a key twice is one error naming the key and its lines
    (PyYAML would keep the last silently, and a config with a key twice is a mistake)."""
    _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), [], source)
    return yaml.safe_load(text)


def _refuse_duplicate_keys(node: yaml.Node | None, where: list[str], source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in lines:
                dotted = ".".join([*where, name])
                raise CharlmError(f"{source} gives '{dotted}' twice (lines {lines[name]} and "
                                  f"{key.start_mark.line + 1}); a key given twice is a mistake: keep one")
            lines[name] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, [*where, name], source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, where, source)


def joined_surrogates(text: str) -> str:
    """``text`` with each UTF-16 surrogate pair as the one character it stands for: JSON writes a character
    outside the Basic Multilingual Plane (an emoji) as two ``\\u`` escapes, which YAML reads as two lone
    surrogates, a string no file system or encoder accepts. A lone surrogate is left as it is."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        return text
