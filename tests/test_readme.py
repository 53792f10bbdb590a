"""The README's curl examples, run for real against a live server.

Convention (for README authors):

- A fenced ```bash block containing the line `# checked-by-test` is executed by this test.
- Every `curl` in such a block is preceded by a line `# expect: NNN`, the HTTP status that curl
  must get (one `expect` per curl, in order). Do not pass `-w`/`--write-out` or `-f`/`--fail`
  to a checked curl, and do not redirect curl's stderr (the status is read through it).
- `http://localhost:8000` and `http://127.0.0.1:8000` are replaced by the test server's address.
  The server serves a tiny random-weight model with the estimate meter and no API key; a block
  with a line `# api-key: KEY` runs against a server started with `--api-key KEY`.
- The block runs with `bash -euo pipefail` in a scratch directory holding `image.png` (a 96x96
  PNG), so a block can build a data URL: `IMG=$(base64 -w0 image.png)`. `jq` may be used.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from _factories import REPO, make_config
from PIL import Image

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.runtime import Runtime

MARKER = "# checked-by-test"
STATUS_PREFIX = "JOULECAP_HTTP_STATUS="
FENCE = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.S | re.M)
EXPECT = re.compile(r"^\s*#\s*expect:\s*(\d{3})\s*$", re.M)
API_KEY = re.compile(r"^\s*#\s*api-key:\s*(\S+)\s*$", re.M)
CURL = re.compile(r"(?:^|[;&|(`]|\$\()\s*curl\s", re.M)
ADDRESS = re.compile(r"https?://(?:localhost|127\.0\.0\.1):8000")


@dataclass(frozen=True)
class Block:
    """One checked README block."""

    line: int
    code: str
    expects: tuple[int, ...]
    api_key: str | None


def _code_without_comments(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


def extract_blocks(markdown: str) -> list[Block]:
    """The `# checked-by-test` bash blocks of `markdown`.

    Raises:
        ValueError: A checked block whose `# expect:` lines do not match its curl commands.

    """
    blocks = []
    for match in FENCE.finditer(markdown):
        code = match.group(1)
        if not any(line.strip() == MARKER for line in code.splitlines()):
            continue
        line = markdown.count("\n", 0, match.start()) + 1
        expects = tuple(int(x) for x in EXPECT.findall(code))
        curls = len(CURL.findall(_code_without_comments(code)))
        if curls == 0 or curls != len(expects):
            raise ValueError(
                f"README line {line}: {curls} curl command(s) but {len(expects)} '# expect:' lines"
            )
        key = API_KEY.search(code)
        blocks.append(Block(line, code, expects, key.group(1) if key else None))
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


def run_block(
    block: Block, base_url: str, workdir: Path
) -> tuple[list[int], subprocess.CompletedProcess[str]]:
    """Run `block` against `base_url` in `workdir`; return the statuses its curls got."""
    shim_dir = workdir / ".shim"
    shim_dir.mkdir(exist_ok=True)
    status_file = workdir / ".statuses"
    status_file.write_text("")
    _curl_shim(shim_dir, status_file)
    env = {**os.environ, "PATH": f"{shim_dir}:{os.environ.get('PATH', '')}"}
    env.pop("JOULECAP_API_KEY", None)
    code = ADDRESS.sub(base_url, block.code)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    statuses = [int(line[len(STATUS_PREFIX) :]) for line in status_file.read_text().split()]
    return statuses, proc


@pytest.fixture(scope="module")
def server_for(tiny_idefics3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """`server_for(api_key)` -> base URL of a live server (one per key, started on first use)."""
    started: dict[str | None, tuple[BackgroundServer, Runtime]] = {}

    def get(api_key: str | None = None) -> str:
        if api_key not in started:
            tmp = tmp_path_factory.mktemp("readme")
            cfg = make_config(
                tiny_idefics3, tmp, server={"api_key": api_key}, energy={"idle_baseline_s": 0.0}
            )
            runtime = Runtime(cfg)
            started[api_key] = (BackgroundServer(create_app(runtime)).start(), runtime)
        return started[api_key][0].base_url

    yield get
    for server, runtime in started.values():
        server.stop()
        runtime.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    Image.new("RGB", (96, 96), (240, 240, 240)).save(tmp_path / "image.png")
    return tmp_path


def _check(block: Block, base_url: str, workdir: Path) -> None:
    statuses, proc = run_block(block, base_url, workdir)
    output = f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    context = f"README line {block.line}:\n{block.code}\n{output}"
    assert statuses == list(block.expects), context
    assert proc.returncode == 0, context


def test_readme_curl_examples_run_against_a_live_server(
    server_for: Callable[..., str], workdir: Path
) -> None:
    blocks = extract_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md has no '# checked-by-test' curl blocks (issue 9 asks for them)"
    expected = {s for b in blocks for s in b.expects}
    assert 200 in expected, "at least one README example must succeed"
    for block in blocks:
        _check(block, server_for(block.api_key), workdir)


SAMPLE = """
Intro.

```bash
# checked-by-test
# expect: 200
curl -s http://localhost:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -H "X-Energy-Budget-J: 30" \\
  -d '{"model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}' \\
  | jq -e '.usage.energy.measured_j > 0'
# expect: 400
curl -s http://127.0.0.1:8000/v1/chat/completions -H "X-Energy-Budget-J: -1" \\
  -H "Content-Type: application/json" -d '{"messages": [{"role": "user", "content": "hi"}]}'
```

```bash
# checked-by-test
# expect: 200
IMG=$(base64 -w0 image.png)
curl -s http://localhost:8000/v1/chat/completions -H "Content-Type: application/json" -d @- <<EOF
{"messages": [{"role": "user", "content": [
  {"type": "image_url", "image_url": {"url": "data:image/png;base64,$IMG"}},
  {"type": "text", "text": "What is it?"}]}], "max_tokens": 2, "energy_budget_j": 40}
EOF
```

```bash
make serve   # not checked: no marker
```

```bash
# checked-by-test
# api-key: sk-readme
# expect: 401
curl -s http://localhost:8000/v1/models
# expect: 200
curl -s http://localhost:8000/v1/models -H "Authorization: Bearer sk-readme"
```
"""


def test_convention_extracts_runs_and_can_fail(server_for: Callable[..., str], workdir: Path) -> None:
    blocks = extract_blocks(SAMPLE)
    assert [b.expects for b in blocks] == [(200, 400), (200,), (401, 200)]
    assert [b.api_key for b in blocks] == [None, None, "sk-readme"]
    for block in blocks:
        _check(block, server_for(block.api_key), workdir)
    # The checker fails when an example's status differs from its expectation.
    wrong = replace(blocks[0], expects=(200, 200))
    statuses, _ = run_block(wrong, server_for(None), workdir)
    assert statuses == [200, 400] != list(wrong.expects)
    with pytest.raises(ValueError, match="curl"):
        extract_blocks("```bash\n# checked-by-test\ncurl -s http://localhost:8000/health\n```\n")
