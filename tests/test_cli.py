"""The command line: each subcommand shows only its own options, bad values are usage errors."""

from __future__ import annotations

import re

import pytest

from joulecap.policies import available_policies
from joulecap.runtime.cli import SERVE, build_parser, config_from


def _flags(*argv: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", capsys.readouterr().out))


def test_ledger_export_lists_only_ledger_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert _flags("ledger", "export", capsys=capsys) == {
        "--help",
        "--format",
        "--out",
        "--cache-dir",
        "--ledger-path",
    }
    assert _flags("ledger", "prune", capsys=capsys) == {
        "--help",
        "--ledger-max-rows",
        "--ledger-max-days",
        "--cache-dir",
        "--ledger-path",
    }


def test_calibrate_lists_engine_energy_and_calibration_options_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = _flags("calibrate", capsys=capsys)
    assert {"--model", "--meter", "--quick", "--resume", "--profile-dir", "--rls-forgetting"} <= flags
    for other in (
        "--policy",
        "--tau",
        "--power-envelope-w",
        "--port",
        "--api-key",
        "--ledger-path",
        "--speed-alpha",
    ):
        assert other not in flags


def test_serve_lists_every_component(capsys: pytest.CaptureFixture[str]) -> None:
    flags = _flags("serve", capsys=capsys)
    assert {
        "--policy",
        "--tau",
        "--power-envelope-w",
        "--port",
        "--ledger-path",
        "--no-auto-calibrate",
    } <= flags
    assert "--quick" not in flags  # a calibrate option


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--tau", "2"], "tau must be in (0, 1]"),
        (["serve", "--policy", "nope"], "invalid choice: 'nope'"),
        (["serve", "--selection", "random"], "invalid choice: 'random'"),
        (["serve", "--meter", "geiger"], "invalid choice: 'geiger'"),
        (["serve", "--port", "70000"], "port must be in [0, 65535]"),
        (["serve", "--feasibility-margin", "2", "--feasibility-margin-max", "1"], "feasibility_margin"),
        (["serve", "--power-envelope-w", "5"], "must be set together"),
    ],
)
def test_bad_values_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        config_from(parser.parse_args(argv), SERVE)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "usage: joulecap serve" in err and message in err


def test_policy_choices_are_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--policy", "nope"])
    err = capsys.readouterr().err
    assert all(name in err for name in available_policies())


def test_each_option_has_one_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOULECAP_CACHE_DIR", "/tmp/joulecap-env-cache")
    monkeypatch.setenv("JOULECAP_TAU", "0.5")
    config = config_from(build_parser().parse_args(["serve"]), SERVE)
    assert config.paths.cache_dir == "/tmp/joulecap-env-cache"
    assert config.scheduler.tau == 0.5
