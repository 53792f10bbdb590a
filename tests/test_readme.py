"""README.md: short, its code blocks run for real, its sample response matches the server.

The conventions for checked blocks are in `tests/_docblocks.py`. The live runs serve the demo
model calibrated like `make serve`'s first start (once per test session), so they are `slow`;
the checks of the conventions themselves run in the default suite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from _docblocks import (
    Block,
    calibrated_demo_cache,
    check_block,
    check_python_block,
    demo_config,
    extract_blocks,
    extract_python_blocks,
    run_block,
)
from _factories import REPO

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.runtime import Runtime

README = REPO / "README.md"
MAX_LINES = 250
HISTORY = re.compile(r"\bsessions? \d+|\bsession[- ]\d+|previous model|\brun \d+\b|_run\d+", re.I)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_demo_cache(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server_for(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """`server_for(api_key)` -> base URL of a live demo-model server (one per key, started on first use)."""
    started: dict[str | None, tuple[BackgroundServer, Runtime]] = {}

    def get(api_key: str | None = None) -> str:
        if api_key not in started:
            work = tmp_path_factory.mktemp("readme")
            runtime = Runtime(demo_config(demo_cache, work, server={"api_key": api_key}))
            started[api_key] = (BackgroundServer(create_app(runtime)).start(), runtime)
        return started[api_key][0].base_url

    yield get
    for server, runtime in started.values():
        server.stop()
        runtime.close()


def test_readme_is_short_and_states_the_present() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert not HISTORY.findall(text), "the README describes the product, not its development history"
    for target in re.findall(r"`((?:docs|examples|benchmarks/results)/[\w./-]+\.(?:md|py|png|json))`", text):
        assert (REPO / target).exists(), f"README names {target}, which does not exist"


def test_readme_blocks_follow_the_conventions() -> None:
    text = README.read_text()
    bash = extract_blocks(text)
    python = extract_python_blocks(text)
    assert any(200 in b.expects for b in bash), "the quick start must show a request that succeeds"
    assert any("examples/shapes.png" in b.code for b in bash), "the quick start uses the shipped image"
    assert (REPO / "examples" / "shapes.png").is_file()
    assert len(python) >= 2 and all(not b.skip for b in python), "the README's Python blocks all run"
    assert any("from openai import OpenAI" in b.code for b in python)
    assert any("Runtime()" in b.code for b in python)


@pytest.mark.slow
def test_readme_bash_blocks_run_against_a_live_server(server_for: Callable[..., str], tmp_path: Path) -> None:
    for block in extract_blocks(README.read_text()):
        check_block(block, server_for(block.api_key), tmp_path, "README.md")


@pytest.mark.slow
def test_readme_python_blocks_run_and_answer_right(server_for: Callable[..., str], demo_cache: Path) -> None:
    for block in extract_python_blocks(README.read_text()):
        check_python_block(block, server_for(None), demo_cache, "README.md")


@pytest.mark.slow
def test_readme_sample_response_matches_the_server(server_for: Callable[..., str]) -> None:
    """The sample `usage` has exactly the fields a live response has, with the same types."""
    samples = [m for m in re.findall(r"```json\n(.*?)```", README.read_text(), re.S) if '"usage"' in m]
    assert len(samples) == 1
    sample = json.loads("{" + samples[0].strip() + "}")["usage"]
    image = (REPO / "examples" / "shapes.png").read_bytes()
    import base64

    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what color is the triangle?"},
                ],
            }
        ]
    }
    reply = httpx.post(
        server_for(None) + "/v1/chat/completions", json=body, headers={"X-Energy-Budget-J": "5"}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    live = reply.json()["usage"]
    assert reply.json()["choices"][0]["message"]["content"] == "blue"
    assert set(sample) == set(live)
    assert set(sample["energy"]) == set(live["energy"])
    for key, value in sample["energy"].items():
        assert type(value) is type(live["energy"][key]) or value is None or live["energy"][key] is None, key
    # The sample is this image under the default policy (how many tokens it keeps depends on the
    # machine's energy profile; how many the image has does not).
    assert sample["energy"]["policy"] == live["energy"]["policy"]
    assert sample["energy"]["visual_tokens_in"] == live["energy"]["visual_tokens_in"]
    assert sample["prompt_tokens_details"]["image_tokens"] == sample["energy"]["visual_tokens_kept"]


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
make serve   # not checked: no marker
```

```python
print("runs")
```

<!-- not-run: needs a robot -->
```python
robot.move()
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


def test_conventions_extract_the_marked_blocks() -> None:
    blocks = extract_blocks(SAMPLE)
    assert [b.expects for b in blocks] == [(200, 400), (401, 200)]
    assert [b.api_key for b in blocks] == [None, "sk-readme"]
    python = extract_python_blocks(SAMPLE)
    assert [(b.code.strip(), b.skip) for b in python] == [
        ('print("runs")', ""),
        ("robot.move()", "needs a robot"),
    ]
    with pytest.raises(ValueError, match="curl"):
        extract_blocks("```bash\n# checked-by-test\ncurl -s http://localhost:8000/health\n```\n")
    with pytest.raises(ValueError, match="reason"):
        extract_python_blocks("<!-- not-run: -->\n```python\npass\n```\n")


@pytest.mark.slow
def test_conventions_run_and_can_fail(
    server_for: Callable[..., str], demo_cache: Path, tmp_path: Path
) -> None:
    for block in extract_blocks(SAMPLE):
        check_block(block, server_for(block.api_key), tmp_path, "SAMPLE")
    # The checker fails when an example's status differs from its expectation ...
    wrong: Block = replace(extract_blocks(SAMPLE)[0], expects=(200, 200))
    statuses, _ = run_block(wrong, server_for(None), tmp_path)
    assert statuses == [200, 400] != list(wrong.expects)
    # ... and when a Python block's assertion does not hold.
    failing = replace(extract_python_blocks(SAMPLE)[0], code="assert 1 + 1 == 3\n")
    with pytest.raises(AssertionError, match="assert 1 \\+ 1 == 3"):
        check_python_block(failing, server_for(None), demo_cache, "SAMPLE")
