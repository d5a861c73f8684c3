"""One config system for every experiment: dataclasses, overridable from flags.

Each experiment declares a frozen dataclass whose fields carry a ``help``
string in their metadata; :func:`parse_config` turns it into an ``argparse``
parser (``--field-name value``, booleans as ``--flag/--no-flag``) and
:func:`save_config` writes the resolved config into the run directory.

Example:
  >>> import dataclasses
  >>> @dataclasses.dataclass(frozen=True)
  ... class Config:
  ...     iterations: int = field(100, "meta-training iterations")
  ...     first_order: bool = field(False, "use FOMAML")
  >>> parse_config(Config, ["--iterations", "5", "--first-order"])
  Config(iterations=5, first_order=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Optional, Sequence, Type, TypeVar

C = TypeVar("C")


def parse_unroll(value: str):
    """A command-line ``--unroll`` value for ``InnerLoop.unroll``: ``"all"`` (fully
    unrolled, ``True``) or a positive integer.

    Example:
      >>> parse_unroll("all"), parse_unroll("2")
      (True, 2)
    """
    if value == "all":
        return True
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"--unroll must be all or a positive integer, got {value!r}.")


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a help string (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(config_cls: Type[C], description: Optional[str] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of ``config_cls``."""
    parser = parser or argparse.ArgumentParser(
        description=description or config_cls.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=f.default, help=help_text,
                                action=argparse.BooleanOptionalAction)
            continue
        origin = typing.get_origin(kind)
        args = typing.get_args(kind)
        if origin is typing.Union and type(None) in args:  # Optional[X]
            base = next(a for a in args if a is not type(None))
            convert = lambda s, base=base: None if s.lower() == "none" else base(s)
        elif origin is tuple:
            convert = None
        else:
            convert = kind
        if convert is None:
            parser.add_argument(_flag(f.name), dest=f.name, default=f.default, help=help_text,
                                nargs="+", type=args[0])
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=f.default, help=help_text,
                                type=convert, choices=choices)
    return parser


def parse_config(config_cls: Type[C], argv: Optional[Sequence[str]] = None,
                 description: Optional[str] = None) -> C:
    """Parses flags (``sys.argv`` when ``argv`` is None) into a ``config_cls`` instance."""
    namespace = build_parser(config_cls, description).parse_args(argv)
    values = vars(namespace)
    for f in dataclasses.fields(config_cls):
        if isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return config_cls(**values)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, run_dir: str) -> str:
    """Writes ``config.json`` into ``run_dir`` atomically and returns its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    write_json_atomic(path, config_to_dict(config))
    return path


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
