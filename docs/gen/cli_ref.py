"""Render the `joulecap` command line reference from `joulecap.runtime.cli.build_parser()`.

Nothing here is written by hand: every subcommand, option, default and choice comes from the
parser the `joulecap` script itself uses, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

ENV_PREFIX = "JOULECAP_"


@contextmanager
def clean_environment() -> Iterator[None]:
    """Hide `JOULECAP_*` variables (the parser reads its defaults from them); fix usage width."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) or k == "COLUMNS"}
    for key in saved:
        del os.environ[key]
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal's width
    try:
        yield
    finally:
        del os.environ["COLUMNS"]
        os.environ.update(saved)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action.default, bool):
        return "on" if action.default else "off"
    if isinstance(action.default, (list, tuple)):
        return " ".join(map(str, action.default)) or ""
    return f"`{action.default}`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}`"
    flags = action.option_strings
    if action.choices is not None and not isinstance(action, argparse.BooleanOptionalAction):
        return ", ".join(f"`{f}`" for f in flags) + " `{" + ",".join(map(str, action.choices)) + "}`"
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return ", ".join(f"`{f}`" for f in flags)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"`{f} {metavar}`" for f in flags)


def _help(action: argparse.Action) -> str:
    return _cell((action.help or "").replace("%%", "%"))


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _command(lines: list[str], path: str, parser: argparse.ArgumentParser, level: int) -> None:
    lines += [f"{'#' * level} `{path}`", ""]
    if parser.description:
        lines += [parser.description.strip(), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    groups = [g for g in parser._action_groups if any(_shown(a) for a in g._group_actions)]
    for group in groups:
        actions = [a for a in group._group_actions if _shown(a)]
        title = group.title or "options"
        lines += [f"**{title}**" + (f": {group.description}" if group.description else ""), ""]
        lines += ["| option | default | what it sets |", "|---|---|---|"]
        lines += [f"| {_flags(a)} | {_default(a)} | {_help(a)} |" for a in actions]
        lines.append("")
    for name, sub in _subparsers(parser):
        _command(lines, f"{path} {name}", sub, min(level + 1, 4))


def _shown(action: argparse.Action) -> bool:
    return not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and (
        action.help != argparse.SUPPRESS
    )


def render_cli() -> str:
    """The whole command line reference as Markdown."""
    with clean_environment():
        from joulecap.runtime.cli import build_parser

        parser = build_parser()
    lines: list[str] = [
        "Every option's default can also be set by the environment variable named in brackets "
        f"(`{ENV_PREFIX}<OPTION>`); a flag on the command line wins. Options of `joulecap` itself "
        "(such as `--log-level`) come before the subcommand.",
        "",
    ]
    top = [a for a in parser._actions if _shown(a)]
    if top:
        lines += ["| option of `joulecap` | default | what it sets |", "|---|---|---|"]
        lines += [f"| {_flags(a)} | {_default(a)} | {_help(a)} |" for a in top]
        lines.append("")
    for name, sub in _subparsers(parser):
        _command(lines, f"joulecap {name}", sub, 2)
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_cli())
