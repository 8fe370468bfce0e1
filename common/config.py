"""Configs as frozen dataclasses, shared by every stage: the dataclass helpers and the command-line flags.

Each stage keeps its own dataclass and presets (`preprocess.config`, `train.config`, `eval.config`); this module
gives them their common methods (`ConfigMethods`) and turns fields into `--field-name` flags (help text from the
field's metadata, choices from `Literal` types, `nargs='+'` for tuples) and back into a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

Config = TypeVar("Config")


def path_argument(text: str) -> Path:
    """An argparse `type` for paths: an empty one is refused (Path('') is '.', so `--out ''` wrote into the current
    folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def os_error_line(error: OSError, where: object) -> str:
    """The one line a command prints for an OSError it did not foresee (a folder it may not write, a file it may
    not read): the file the system names, else `where`, and the system's reason."""
    return f"error: {error.filename or where}: {error.strerror or error}"


class ConfigMethods:
    """Methods of a frozen config dataclass: `replace`, `to_dict`, `from_dict` (its inverse: JSON lists become
    tuples, fields this version does not know are ignored) and `to_json` (what every run writes next to its
    outputs)."""

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _argument_type(annotation: Any, value: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type` and extra keywords (`nargs`, `choices`) for a field with this annotation and default."""
    if isinstance(value, tuple):
        kind = type(value[0]) if value else str
        return (_boolean if kind is bool else kind), {"nargs": "+"}
    if typing.get_origin(annotation) is Literal:
        return str, {"choices": typing.get_args(annotation)}
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return type(value), {}
    return type(value), {}


def named_preset(argv: list[str] | None, presets: dict[str, Any], default_preset: str) -> str:
    """The preset that `--preset NAME` / `--preset=NAME` names in argv (sys.argv[1:] when None), else the default;
    a name that is not a preset also gives the default (the parser then refuses it)."""
    args = sys.argv[1:] if argv is None else argv
    named = default_preset
    for index, arg in enumerate(args):
        if arg == "--preset" and index + 1 < len(args):
            named = args[index + 1]
        elif arg.startswith("--preset="):
            named = arg.partition("=")[2]
    return named if named in presets else default_preset


def add_config_arguments(parser: argparse.ArgumentParser, presets: dict[str, Any], default_preset: str, title: str,
                         argv: list[str] | None = None) -> None:
    """`--preset` plus one `--field-name` flag per field of the presets' dataclass; unset flags keep the preset. Each
    flag's help shows its value in the preset that argv names (`--preset paper --help` shows the paper values). A
    parser without a usage line of its own gets a short one: argparse's own lists every flag (some 40 lines printed
    above each error)."""
    if parser.usage is None and not any(action.option_strings == [] for action in parser._actions):
        parser.usage = "%(prog)s [options] (--help lists them)"
    parser.add_argument("--preset", choices=sorted(presets), default=default_preset,
                        help=f"named starting configuration (default: {default_preset}; with --help, the values shown "
                             "are those of the preset given)")
    default = presets[named_preset(argv, presets, default_preset)]
    group = parser.add_argument_group(title)
    cls = type(default)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(default, f.name)
        help_text = f"{f.metadata.get('help', '')} ({default.preset} preset: {value!r})".replace("%", "%%")
        if isinstance(value, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind, extra = _argument_type(hints[f.name], value)
        group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text, **extra)


def config_from_args(presets: dict[str, Config], args: argparse.Namespace) -> Config | None:
    """The preset named by `args.preset`, with every flag that was given replacing its field; None (after one
    `error:` line on stderr) when the dataclass refuses the values."""
    base = presets[args.preset]
    overrides = {}
    for f in dataclasses.fields(base):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if f.name != "preset" and value is not None:
            overrides[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return dataclasses.replace(base, **overrides)  # type: ignore[type-var]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def config_main(parser: argparse.ArgumentParser, presets: dict[str, Any], default_preset: str, title: str,
                argv: list[str] | None, run: Callable[[Any, argparse.Namespace], int]) -> int:
    """The shape of `python -m train` and `python -m eval`: the config flags plus `--dry-run` (print the resolved
    config as JSON and stop); a refused value is one error line and exit 2; otherwise `run(config, args)`."""
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    add_config_arguments(parser, presets, default_preset, title, argv)
    args = parser.parse_args(argv)
    config = config_from_args(presets, args)
    if config is None:
        return 2
    if args.dry_run:
        print(config.to_json(), end="")
        return 0
    return run(config, args)
