"""Reading config YAML and command-line overrides into plain dicts, with one-line errors.

Split from ``config.py``: nothing here knows the config's sections (``config.load_config``
validates the merged dict into them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..datasets.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'detector.epochs=3' -> (['detector', 'epochs'], 3) with YAML scalar parsing of the value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_yaml_problem(err)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply key.sub=value overrides to a plain dict (validated later by config_from_dict)."""
    data = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: Path) -> Any:
    """A config file's YAML ({} when empty); one ConfigError line when it is missing, a folder, or not YAML."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({type(err).__name__}: {err})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong, and the line and column where it was found."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else " ".join(str(err).split())


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
