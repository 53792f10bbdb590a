"""`joulecap` command line: serve, make-tiny-model, meters, calibrate, ledger, policies.

Each subcommand shows only the options of the components it uses; every option's default can be
set by one environment variable (`JOULECAP_<OPTION>`), and out-of-range values are usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from joulecap.runtime.config import COMPONENTS, JoulecapConfig
from joulecap.runtime.configtools import add_config_args, config_from_args
from joulecap.runtime.ledger_cli import add_ledger_parser

log = logging.getLogger("joulecap")

SERVE = tuple(COMPONENTS)
CALIBRATE = ("engine", "energy", "learning", "calibration", "paths")
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "calibrate": ("cache_dir", "profile_dir"),
    "ledger": ("cache_dir", "ledger_path"),
}
"""The paths a subcommand uses (the rest of `PathsConfig` is not its business)."""
CALIBRATION_FIELDS: dict[str, tuple[str, ...]] = {
    "serve": ("auto_calibrate",),
    "calibrate": ("quick", "resume"),
}
LEARNING_FIELDS: dict[str, tuple[str, ...]] = {"calibrate": ("rls_forgetting",)}
"""The fit's RLS forgetting is saved with the profile; the rest of learning is the server's."""
"""`serve` calibrates automatically; `calibrate` sweeps quick or full, resuming or not."""


def _add(parser: argparse.ArgumentParser, command: str, components: tuple[str, ...]) -> None:
    for name in components:
        fields = {"paths": PATH_FIELDS, "calibration": CALIBRATION_FIELDS, "learning": LEARNING_FIELDS}
        subset = fields.get(name, {})
        only = subset.get(command)
        add_config_args(parser, COMPONENTS[name], title=f"{name} options", only=only)


def config_from(args: argparse.Namespace, components: tuple[str, ...]) -> JoulecapConfig:
    """A `JoulecapConfig` from parsed args; components not on the parser keep their defaults."""
    parser = getattr(args, "parser", None)
    parts = {name: config_from_args(COMPONENTS[name], args, parser) for name in components}
    return JoulecapConfig(**parts)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.runtime import Runtime

    config = config_from(args, SERVE)
    if config.server.api_keys:  # a bad keys file stops start-up before the model loads
        from joulecap.runtime.keys import load_keys

        load_keys(config.server.api_keys)
    runtime = Runtime(config)
    if runtime.info.random_weights:
        banner = "!" * 78
        print(
            f"{banner}\n! joulecap is serving '{runtime.info.model}' with RANDOM weights: "
            "answers are noise.\n"
            f"! Pass --model DIR for a real model.\n{banner}",
            file=sys.stderr,
        )
    log.info(
        "energy profile: %s (%s); ledger: %s",
        runtime.profile.how,
        runtime.profile.detail,
        runtime.paths.ledger_path,
    )
    app = create_app(runtime)
    try:
        uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=args.log_level)
    finally:
        runtime.close()
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    if args.shape is not None:
        from joulecap.runtime.shapes import build_shape_model

        path = build_shape_model(args.shape, args.dir, seed=args.seed)
        print(f"built {args.shape}-shaped model (random weights, real dimensions) in {path}")
        return 0
    from joulecap.runtime.tiny_models import build_tiny_model

    path = build_tiny_model(args.arch, args.dir, seed=args.seed)
    print(f"built tiny {args.arch} model (random weights) in {path}")
    return 0


def _meters(args: argparse.Namespace) -> int:
    from joulecap.runtime.energy.factory import meters_command

    return meters_command(config_from(args, ("energy",)).energy)


def _calibrate(args: argparse.Namespace) -> int:
    from joulecap.runtime.calibrate import calibrate_command

    return calibrate_command(config_from(args, CALIBRATE))


def _policies(_args: argparse.Namespace) -> int:
    from joulecap.policies import available_policies, get_policy

    for name in available_policies():
        doc = (get_policy(name).__doc__ or "").strip().splitlines()
        print(f"{name:14s} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `joulecap` argument parser (flags generated from the config dataclasses)."""
    parser = argparse.ArgumentParser(prog="joulecap", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, fn: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn, parser=p)
        return p

    serve = command("serve", _serve, "Serve the OpenAI-style API (demo model unless --model).")
    _add(serve, "serve", SERVE)

    from joulecap.runtime.shapes import SHAPE_NAMES
    from joulecap.runtime.tiny_models import tiny_archs

    tiny = command("make-tiny-model", _make_tiny_model, "Build a tiny random-weight VLM locally.")
    tiny.add_argument("--arch", choices=tiny_archs(), default="idefics3")
    tiny.add_argument(
        "--shape",
        choices=SHAPE_NAMES,
        default=None,
        help="instead of a tiny model: random weights with a released model's real dimensions "
        "(float32: ~1 GB for smolvlm-256m, ~17 GB for gemma-3-4b)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("dir", help="Output directory")

    meters = command(
        "meters", _meters, "List energy meters, one live reading each, and why others are absent."
    )
    _add(meters, "meters", ("energy",))

    cal = command("calibrate", _calibrate, "Measure energy over a sweep and fit the model's energy profile.")
    _add(cal, "calibrate", CALIBRATE)

    add_ledger_parser(sub)

    command("policies", _policies, "List the registered planning policies.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `joulecap` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from joulecap.runtime.engines.factory import EngineUnavailable, ModelLoadError
    from joulecap.runtime.keys import KeysFileError

    try:
        return int(args.fn(args))
    except (ModelLoadError, EngineUnavailable, KeysFileError) as exc:
        # Expected, user-fixable failures (bad --model, engine not installed): the message names the fix.
        print(f"joulecap: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
