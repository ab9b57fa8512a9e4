"""Stage settings: a dataclass of defaults, a YAML file, then `--set key=value` overrides.

Shared by `fercache pretrain` and `fercache train`: names are checked against the dataclass
(an unknown key lists the valid ones) and values are coerced to the type of their default.
On the command line (`--set`, and `fercache sweep --grid`) a key is a setting's name, or
`section.name` where the stage groups its settings in sections (`setting_key`).
"""

import dataclasses
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from fercache.errors import FercacheError
from fercache.readers import read_text

Sections = Mapping[str, Collection[str]]  # section name -> the setting names it groups


def given_values(
    path: Path | None, overrides: list[str] | None, options: dict, sections: Sections | None = None
) -> dict:
    """The YAML file's settings, then `--set` overrides, then the non-None `options`."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_yaml(Path(path)))
    for item in overrides or []:
        key, value = parse_override(item, sections)
        values[key] = value
    values.update({key: value for key, value in options.items() if value is not None})
    return values


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FercacheError(f"{path}: no such config file")
    text = read_text(path, "settings file", "give a YAML file of setting: value lines")
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise FercacheError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise FercacheError(f"{path}: expected a mapping of setting: value")
    return {str(key): value for key, value in loaded.items()}


def setting_key(key: str, sections: Sections | None = None) -> str:
    """The setting a command-line key names: `name` itself, or `section.name` when `sections`
    puts `name` in that section (`model.layers` is `layers`). Anything else comes back as
    given, for `typed_values` to refuse as an unknown setting."""
    key = key.strip()
    section, dot, name = key.partition(".")
    if dot and name in (sections or {}).get(section, ()):
        return name
    return key


def parse_override(item: str, sections: Sections | None = None) -> tuple[str, Any]:
    """`key=value` -> (the setting `setting_key` names, the value read as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise FercacheError(f"--set {item!r}: expected key=value, e.g. --set seed=1")
    try:
        return setting_key(key, sections), yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise FercacheError(f"--set {item!r}: value is not valid YAML ({error})") from error


def typed_values(settings: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """Check names and coerce numbers (YAML reads `3e-4` as text, `1` where 1.0 is meant)."""
    fields = {field.name: field for field in dataclasses.fields(settings)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise FercacheError(
            f"unknown {what} setting(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}"
        )
    typed: dict[str, Any] = {}
    for key, value in values.items():
        field = fields[key]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        try:
            typed[key] = _coerce(value, default)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise FercacheError(f"setting {key}={value!r} should be like {default!r}") from None
    return typed


def _coerce(value: Any, default: Any) -> Any:
    if default is None:  # optional settings (default None) are integers
        return None if value is None else int(value)
    if value is None:
        raise TypeError(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(value)
        return int(float(value))
    if isinstance(default, float):
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if isinstance(default, tuple):  # a YAML list (or one value) of items typed like the first
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(item, default[0]) for item in items)
    if isinstance(default, dict):  # a YAML mapping of names to values typed like the default's
        if not isinstance(value, dict):
            raise TypeError(value)
        like = next(iter(default.values()))
        return {str(name): _coerce(item, like) for name, item in value.items()}
    return str(value)
