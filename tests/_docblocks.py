"""Running the code blocks of README.md and docs/*.md for real (used by test_readme and test_docs).

Conventions for authors of those pages:

- A fenced ```bash block containing the line `# checked-by-test` is executed. Every `curl` in it
  is preceded by a line `# expect: NNN`, the HTTP status that curl must get (one `expect` per
  curl, in order). Do not pass `-w`/`--write-out` or `-f`/`--fail` to a checked curl, and do not
  redirect curl's stderr (the status is read through it). A line `# api-key: KEY` runs the block
  against a server started with `--api-key KEY`. Other bash blocks are not run (`make serve`,
  `docker run`: they start things).
- Every fenced ```python block is executed, unless the line right before its fence is
  `<!-- not-run: REASON -->` (the reason is required). Python blocks check what they show with
  plain `assert`s, so a wrong answer fails the test.
- Blocks run from the repository root (so `examples/shapes.png` resolves), against a live server
  of the demo model (TinyVQA) that was calibrated like `make serve`'s first start; addresses
  `http://localhost:8000` and `http://127.0.0.1:8000` are replaced by the test server's.
  In-process blocks (`Runtime()`) share the server's cache directory (`JOULECAP_CACHE_DIR`), so
  they load the same energy profile and write the same ledger. Bash blocks may use `jq`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _factories import REPO, make_config

from joulecap.runtime.config import JoulecapConfig

MARKER = "# checked-by-test"
STATUS_PREFIX = "JOULECAP_HTTP_STATUS="
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<code>.*?)^```", re.S | re.M)
BASH = ("bash", "sh", "shell")
EXPECT = re.compile(r"^\s*#\s*expect:\s*(\d{3})\s*$", re.M)
API_KEY = re.compile(r"^\s*#\s*api-key:\s*(\S+)\s*$", re.M)
CURL = re.compile(r"(?:^|[;&|(`]|\$\()\s*curl\s", re.M)
ADDRESS = re.compile(r"https?://(?:localhost|127\.0\.0\.1):8000")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>[^>]*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One checked bash block."""

    line: int
    code: str
    expects: tuple[int, ...]
    api_key: str | None


@dataclass(frozen=True)
class PyBlock:
    """One Python block; `skip` is the author's reason for not running it ("" runs it)."""

    line: int
    code: str
    skip: str = ""


def _code_without_comments(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


def _line(markdown: str, pos: int) -> int:
    return markdown.count("\n", 0, pos) + 1


def extract_blocks(markdown: str) -> list[Block]:
    """The `# checked-by-test` bash blocks of `markdown`.

    Raises:
        ValueError: A checked block whose `# expect:` lines do not match its curl commands.

    """
    blocks = []
    for match in FENCE.finditer(markdown):
        code = match.group("code")
        if match.group("lang") not in BASH or not any(line.strip() == MARKER for line in code.splitlines()):
            continue
        line = _line(markdown, match.start())
        expects = tuple(int(x) for x in EXPECT.findall(code))
        curls = len(CURL.findall(_code_without_comments(code)))
        if curls == 0 or curls != len(expects):
            raise ValueError(f"line {line}: {curls} curl command(s) but {len(expects)} '# expect:' lines")
        key = API_KEY.search(code)
        blocks.append(Block(line, code, expects, key.group(1) if key else None))
    return blocks


def extract_python_blocks(markdown: str) -> list[PyBlock]:
    """Every ```python block of `markdown`, with its `<!-- not-run: REASON -->` if it has one.

    Raises:
        ValueError: A `not-run` marker without a reason.

    """
    blocks = []
    for match in FENCE.finditer(markdown):
        if match.group("lang") != "python":
            continue
        before = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        line = _line(markdown, match.start())
        if marker is not None and not marker.group("reason"):
            raise ValueError(f"line {line}: a not-run marker needs a reason")
        blocks.append(PyBlock(line, match.group("code"), marker.group("reason") if marker else ""))
    return blocks


def _curl_shim(directory: Path, status_file: Path) -> None:
    """A `curl` first on PATH that records each call's HTTP status, otherwise transparent."""
    real = shutil.which("curl")
    assert real, "curl is not installed"
    shim = directory / "curl"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        "err=$(mktemp)\n"
        f'"{real}" -w "%{{stderr}}{STATUS_PREFIX}%{{http_code}}\\n" "$@" 2>"$err"\n'
        "rc=$?\n"
        f'grep -v "^{STATUS_PREFIX}" "$err" >&2\n'
        f'grep "^{STATUS_PREFIX}" "$err" >> "{status_file}"\n'
        'rm -f "$err"\n'
        "exit $rc\n"
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)


def _env(cache_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOULECAP_")}
    env["HF_HUB_OFFLINE"] = "1"
    if cache_dir is not None:
        env["JOULECAP_CACHE_DIR"] = str(cache_dir)
    return env


def run_block(
    block: Block, base_url: str, scratch: Path, cwd: Path = REPO
) -> tuple[list[int], subprocess.CompletedProcess[str]]:
    """Run bash `block` against `base_url` from `cwd`; return the statuses its curls got."""
    shim_dir = scratch / ".shim"
    shim_dir.mkdir(exist_ok=True)
    status_file = scratch / ".statuses"
    status_file.write_text("")
    _curl_shim(shim_dir, status_file)
    env = _env(None)
    env["PATH"] = f"{shim_dir}:{os.environ.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", ADDRESS.sub(base_url, block.code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    statuses = [int(line[len(STATUS_PREFIX) :]) for line in status_file.read_text().split()]
    return statuses, proc


def _context(where: str, line: int, code: str, proc: subprocess.CompletedProcess[str]) -> str:
    return f"{where} line {line}:\n{code}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"


def check_block(block: Block, base_url: str, scratch: Path, where: str) -> None:
    """Run `block` and fail with its output unless every curl got its expected status."""
    statuses, proc = run_block(block, base_url, scratch)
    context = _context(where, block.line, block.code, proc)
    assert statuses == list(block.expects), context
    assert proc.returncode == 0, context


def run_python_block(block: PyBlock, base_url: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run Python `block` in a fresh interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", ADDRESS.sub(base_url, block.code)],
        cwd=REPO,
        env=_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )


def check_python_block(block: PyBlock, base_url: str, cache_dir: Path, where: str) -> str:
    """Run `block`; fail with its output unless it exits 0. Returns its stdout."""
    proc = run_python_block(block, base_url, cache_dir)
    assert proc.returncode == 0, _context(where, block.line, block.code, proc)
    return proc.stdout


def demo_config(cache_dir: Path, work: Path, **sections: dict[str, Any]) -> JoulecapConfig:
    """The demo model as `make serve` runs it (auto-calibration on), all its files in `cache_dir`.

    The estimate meter and no idle-baseline wait keep it quick and the same on every machine.
    """
    cfg = make_config(None, work, energy={"idle_baseline_s": 0.0}, **sections)
    return replace(
        cfg,
        paths=replace(cfg.paths, cache_dir=str(cache_dir), profile_dir=None, ledger_path=None),
        calibration=replace(cfg.calibration, auto_calibrate=True),
    )


def calibrated_demo_cache(base: Path) -> Path:
    """A cache directory holding the demo model's energy profile for this machine.

    The first call in a test session calibrates (the quick sweep `make serve` runs on a first
    start); later calls, from any test module, find the profile and return at once.
    """
    from joulecap.runtime.runtime import Runtime

    cache = base / "demo-cache"
    done = cache / ".calibrated"
    if not done.exists():
        cfg = demo_config(cache, base / "demo-calibration")
        cfg = replace(cfg, engine=replace(cfg.engine, warmup=False))
        with Runtime(cfg) as runtime:
            assert runtime.profile.how in ("calibrated at start-up", "loaded"), runtime.profile.how
        done.write_text("")
    return cache
