"""Run settings written once: a dataclass per task whose fields carry default and help text.

Each training command's flags are generated from its config (``add_flags``), and its presets
(paper recipes and schedules) are dicts of field values checked against the same fields. A flag
the user does not give is None, so that resolving a run (``resolve``) can tell "not given" from
"given the default": explicit flags win over the preset, which wins over the field defaults.
A resumed run (``resume``) takes the checkpoint's settings except the fields marked
``resume=True`` (where to write, how many workers, ...), which the command line may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

_logger = logging.getLogger(__name__)


def option(
    default: Any,
    help: str,  # noqa: A002 (argparse's name)
    *,
    short: str | None = None,
    type: Callable[[str], Any] | None = None,  # noqa: A002
    nargs: int | str | None = None,
    choices: tuple[Any, ...] | None = None,
    const: Any = None,
    metavar: str | None = None,
    negatable: bool = False,
    flag: str | None = None,
    resume: bool = False,
) -> Any:
    """A config field: its default, its help text and how its flag reads.

    ``negatable`` booleans get ``--x/--no-x``; other booleans are ``store_true`` switches.
    ``flag`` renames the flag (``--no-mask`` for ``mask``); ``resume=True`` marks a setting a
    resumed run may take from the command line.
    """
    metadata = {
        "help": help,
        "short": short,
        "type": type,
        "nargs": nargs,
        "choices": choices,
        "const": const,
        "metavar": metavar,
        "negatable": negatable,
        "flag": flag,
        "resume": resume,
    }
    return dataclasses.field(default=default, metadata=metadata)


def fields(config: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(config)


def defaults(config: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config)}


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    return str(value)


def add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of ``config``; every flag defaults to None ("not given")."""
    for f in fields(config):
        meta = f.metadata
        name = "--" + f.name.replace("_", "-")
        names = [meta["short"], name] if meta["short"] else [name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        default_text = "" if f.default in (None, "", False) else f" (default {_shown(f.default)})"
        kwargs["help"] = meta["help"] + default_text
        if isinstance(f.default, bool) and meta["negatable"]:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, bool):
            # A switch that turns a default-on setting off is named by ``flag`` (--no-mask).
            kwargs["action"] = "store_false" if f.default else "store_true"
            names = [meta["flag"]] if meta["flag"] else names
            kwargs["help"] = meta["help"]
        else:
            kind = meta["type"] or _value_type(f.default)
            if kind is not None:
                kwargs["type"] = kind
            for key in ("nargs", "choices", "const", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        parser.add_argument(*names, **kwargs)


def _value_type(default: Any) -> Callable[[str], Any] | None:
    if isinstance(default, tuple | list):
        return type(default[0]) if default else None
    if isinstance(default, int | float):
        return type(default)
    return None


def check_presets(config: type, presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Every preset value names a field of ``config`` (a misspelt preset key fails at import)."""
    names = {f.name for f in fields(config)}
    for preset, values in presets.items():
        unknown = set(values) - names
        if unknown:
            raise AssertionError(f"preset {preset!r} sets unknown fields {sorted(unknown)}")


def resolve(
    config: type,
    given: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    preset: str | None = None,
) -> argparse.Namespace:
    """Field defaults, then ``presets[preset]``, then the flags given (not None)."""
    merged = defaults(config)
    if preset is not None:
        merged.update(presets[preset])
    merged.update({k: v for k, v in given.items() if v is not None and k in merged})
    return argparse.Namespace(**_typed(config, merged))


def _typed(config: type, values: dict[str, Any]) -> dict[str, Any]:
    """Lists (from YAML, checkpoints or nargs flags) back to the tuples the fields hold."""
    for f in fields(config):
        if isinstance(f.default, tuple) and values.get(f.name) is not None:
            values[f.name] = tuple(values[f.name])
    return values


def resume(
    config: type, saved: Mapping[str, Any], given: Mapping[str, Any], ignore: tuple[str, ...] = ()
) -> argparse.Namespace:
    """A resumed run's settings: the checkpoint's (``saved``; defaults for fields newer than
    it), except the ``resume=True`` fields given again. Other given flags that differ from the
    checkpoint's are reported as ignored; ``ignore`` names flags not to report (the preset)."""
    values = {**defaults(config), **saved}
    overridable = {f.name for f in fields(config) if f.metadata["resume"]}
    ignored = []
    for key, value in given.items():
        if value is None or key in ignore or key == "resume":
            continue
        if key in overridable:
            values[key] = value
        elif _plain(value) != _plain(values.get(key)):
            ignored.append(key)
    if ignored:
        _logger.warning("resuming: the checkpoint's values are used for %s", ", ".join(ignored))
    return argparse.Namespace(**_typed(config, values))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value
