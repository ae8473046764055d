"""`--config FILE`: a YAML preset whose top-level keys are CLI options in snake_case.

    model: tiiuae/Falcon-H1-7B-Instruct
    max_model_len: 32768
    enforce_eager: true
    metadata: {...}            # free-form notes for humans and tools; the CLI ignores it

The preset becomes command-line arguments placed before the real ones, so argparse checks its
values like typed flags and any explicit flag overrides it (argparse keeps the last value).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

IGNORED_KEYS = {"metadata"}


class PresetError(ValueError):
    pass


def preset_arguments(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """The preset in `path` as argv, e.g. {"max_model_len": 4096} -> ["--max-model-len", "4096"]."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PresetError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PresetError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise PresetError(f"config file {path} must hold a mapping of option names to values")

    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(str(k) for k in data if k not in actions and k not in IGNORED_KEYS)
    if unknown:
        raise PresetError(f"config file {path}: unknown option(s) {', '.join(unknown)}; "
                          f"valid keys: {', '.join(sorted(actions))} (and 'metadata')")
    argv: list[str] = []
    for key, value in data.items():
        if key in IGNORED_KEYS or value is None:
            continue
        action = actions[key]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
            if not isinstance(value, bool):
                raise PresetError(f"config file {path}: '{key}' must be true or false, got {value!r}")
            argv.append(action.option_strings[0 if value else 1])
        elif isinstance(value, list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, (dict, bool)):
            raise PresetError(f"config file {path}: '{key}' must be a single value, got {value!r}")
        else:
            argv += [flag, str(value)]
    return argv
