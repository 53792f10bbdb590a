"""`joulecap ledger export|summary|prune`: the ledger subcommand, with ledger options only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from joulecap.runtime.configtools import add_config_args, config_from_args
from joulecap.runtime.ledger_config import LedgerConfig
from joulecap.runtime.paths import Paths, PathsConfig

LEDGER_FILE = "ledger.sqlite3"
"""The ledger's file name inside the cache directory when no `--ledger-path` is given."""


def _ledger_path(args: argparse.Namespace) -> str:
    return Paths.resolve(config_from_args(PathsConfig, args, getattr(args, "parser", None))).ledger_path


def _missing(path: str) -> int:
    print(f"no ledger at {path} (serve some requests first, or pass --ledger-path)", file=sys.stderr)
    return 1


def _export(args: argparse.Namespace) -> int:
    from joulecap.runtime.ledger import Ledger
    from joulecap.runtime.ledger_export import ExportError, export_ledger

    path = _ledger_path(args)
    if not os.path.isfile(path):
        return _missing(path)
    ledger = Ledger(path)
    try:
        n = export_ledger(ledger, args.format, args.out, sys.stdout)
    except ExportError as exc:
        print(f"joulecap ledger export: {exc}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print(f"exported {n} rows as {args.format}" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from joulecap.runtime.ledger_summary import print_table, summarize

    path = _ledger_path(args)
    if not os.path.isfile(path):
        return _missing(path)
    rows = summarize(path)
    if args.json:
        json.dump([r.to_dict() for r in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(rows, sys.stdout)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from joulecap.runtime.ledger import Ledger

    if args.ledger_max_rows is None and args.ledger_max_days is None:
        print("joulecap ledger prune: pass --ledger-max-rows and/or --ledger-max-days", file=sys.stderr)
        return 2
    try:
        config = LedgerConfig(ledger_max_rows=args.ledger_max_rows, ledger_max_days=args.ledger_max_days)
    except ValueError as exc:
        print(f"joulecap ledger prune: {exc}", file=sys.stderr)
        return 2
    path = _ledger_path(args)
    if not os.path.isfile(path):
        return _missing(path)
    ledger = Ledger(path)
    try:
        n = ledger.prune(config.ledger_max_rows, config.ledger_max_days)
        left = ledger.count()
    finally:
        ledger.close()
    print(f"deleted {n} rows; {left} left in {path}", file=sys.stderr)
    return 0


def _location_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, PathsConfig, title="ledger options", only=("cache_dir", "ledger_path"))
    p.set_defaults(parser=p)


def add_ledger_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `ledger` and its actions to the `joulecap` subparsers; returns the `ledger` parser."""
    description = "Export, summarise or prune the request ledger."
    ledger = subparsers.add_parser("ledger", help=description, description=description)
    actions = ledger.add_subparsers(dest="action", required=True, metavar="{export,summary,prune}")

    export = actions.add_parser("export", help="Write every row as CSV, JSON lines or Parquet.")
    export.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="jsonl")
    export.add_argument("--out", default=None, help="Output file (default: stdout; required for parquet).")
    _location_args(export)
    export.set_defaults(fn=_export)

    summary = actions.add_parser(
        "summary", help="Requests, joules, J per output token and budgets held per model, policy and key."
    )
    summary.add_argument("--json", action="store_true", help="JSON instead of a table.")
    _location_args(summary)
    summary.set_defaults(fn=_summary)

    prune = actions.add_parser("prune", help="Delete rows beyond a row count and/or an age, once.")
    prune.add_argument("--ledger-max-rows", type=int, default=None, help="Keep at most this many rows.")
    prune.add_argument("--ledger-max-days", type=float, default=None, help="Delete rows older than this.")
    _location_args(prune)
    prune.set_defaults(fn=_prune)
    return ledger
