"""Build command-line options from config dataclasses, so defaults and help live in one place.

Each component owns one frozen dataclass whose fields carry a docstring (a string literal on
the line after the field, read here with `ast`). `add_config_args` turns every field into a
`--flag` with that docstring as help and the dataclass default as default; `config_from_args`
builds the dataclass back from parsed arguments. Field names must be unique across the
components put on one parser.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the string literal that follows it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - source unavailable (zipapp)
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    stmts = body.body
    for stmt, nxt in zip(stmts, [*stmts[1:], None], strict=True):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip `X | None` to `(X, True)`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional(inner: Any) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", ""):
            return None
        return inner(text)

    return parse


ENV_PREFIX = "JOULECAP_"
"""Every flag's default can be overridden by the environment: `--port` by `JOULECAP_PORT`."""


def env_name(field_name: str) -> str:
    """Environment variable that overrides the default of `field_name`."""
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """Add one `--flag` per field of dataclass `cls` (or of the fields named in `only`) to `parser`.

    A field's default comes from the dataclass unless the environment variable
    `JOULECAP_<FIELD>` is set (containers configure the server that way). A field whose metadata
    has `choices` (a sequence, or a callable returning one: a registry) gets them as argparse
    choices.
    """
    group = parser.add_argument_group(title or cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False or (only is not None and f.name not in only):
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        # argparse %-formats help strings: a literal "%" in a docstring must be doubled.
        help_text = docs.get(f.name, "").replace("%", "%%") + f" [env {env_name(f.name)}]"
        env_value = os.environ.get(env_name(f.name))
        if tp is bool:
            if env_value is not None:
                default = _parse_bool(env_value)
            group.add_argument(
                _flag(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = list(choices())
        if typing.get_origin(tp) is typing.Literal:
            choices = list(typing.get_args(tp))
            tp = type(choices[0])
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            group.add_argument(
                _flag(f.name), dest=f.name, type=inner, nargs="*", default=default, help=help_text
            )
            continue
        conv = _parse_optional(tp) if optional else tp
        if env_value is not None:
            try:
                default = conv(env_value)
            except ValueError as exc:
                raise SystemExit(f"{env_name(f.name)}={env_value!r} is invalid: {exc}") from exc
        group.add_argument(
            _flag(f.name),
            dest=f.name,
            type=conv,
            default=default,
            choices=choices,
            help=f"{help_text} (default: %(default)s)",
        )


def config_from_args(
    cls: type[T], args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
) -> T:
    """Build dataclass `cls` from the parsed arguments that `add_config_args` declared.

    A value the dataclass refuses (its `__post_init__` range checks) is a usage error of `parser`
    (exit 2 with the message) rather than a traceback.
    """
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.init and hasattr(args, f.name):
            value = getattr(args, f.name)
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if parser is None:
            raise
        parser.error(str(exc))
