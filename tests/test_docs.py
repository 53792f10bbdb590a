"""docs/: every page in the navigation, generated references complete, code blocks run for real.

`make lint` builds the site with `mkdocs build --strict` (broken links, missing pages and
generator errors fail there); these tests check what a build cannot: that the generated
references cover everything the code has, and that the pages' code runs and answers right
(conventions in `tests/_docblocks.py`).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _docblocks import (
    calibrated_demo_cache,
    check_block,
    check_python_block,
    demo_config,
    extract_blocks,
    extract_python_blocks,
)
from _factories import REPO

DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "gen"))

from cli_ref import render_cli  # noqa: E402
from hooks import expand  # noqa: E402
from results_ref import render_results, result_files  # noqa: E402

HISTORY = re.compile(r"\bsessions? \d+|\bsession[- ]\d+|previous model|_run\d+\.json", re.I)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "gen" not in p.relative_to(DOCS).parts)


def _nav_files(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_files(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _nav_files(value)


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold `!!python/name:` tags; the navigation needs none of them."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)


def test_every_page_is_in_the_navigation_and_every_entry_exists() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_Loader)
    nav = set(_nav_files(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert nav == pages
    assert {"operations.md", "policies.md"} <= nav


def test_docs_state_the_present() -> None:
    for page in [*_pages(), REPO / "examples" / "robot_loop.py", REPO / "examples" / "ros2_node.py"]:
        found = HISTORY.findall(page.read_text())
        assert not found, f"{page.relative_to(REPO)}: development history {found}"
    for module in (REPO / "benchmarks" / "tinyvqa").glob("*.py"):
        assert not HISTORY.findall(module.read_text()), module


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _options(sub)


def test_cli_reference_covers_every_subcommand_and_option() -> None:
    from joulecap.runtime.cli import build_parser

    page = render_cli()
    for name, sub in _options(build_parser()):
        assert f"`{sub.prog}`" in page, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, f"{sub.prog} {flag}"


def test_figures_name_result_files_that_exist() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    results = REPO / "benchmarks" / "results"
    named = set(re.findall(r"`([\w/.-]+\.(?:json|png))`", page))
    assert named
    for name in named:
        assert (results / name).exists() or (REPO / name).exists(), f"docs/benchmarks.md names {name}"


def test_results_index_lists_every_result_file() -> None:
    table = render_results()
    files = result_files()
    assert files
    for path in files:
        assert f"`{path.relative_to(REPO / 'benchmarks' / 'results')}`" in table
    assert expand("a\n<!-- gen:results -->\nb").count("\n|") >= len(files)
    with pytest.raises(ValueError, match="unknown generated part"):
        expand("<!-- gen:nothing -->")


@pytest.mark.slow
def test_http_reference_covers_every_route() -> None:
    from http_ref import openapi_schema, render_http

    schema = openapi_schema()
    page = render_http(schema)
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}`" in page
    for field in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]:
        assert f"`{field}`" in page


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_demo_cache(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def demo_server(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from joulecap.runtime.api.app import create_app
    from joulecap.runtime.api.server import BackgroundServer
    from joulecap.runtime.runtime import Runtime

    with Runtime(demo_config(demo_cache, tmp_path_factory.mktemp("docs"))) as runtime:
        server = BackgroundServer(create_app(runtime)).start()
        try:
            yield server.base_url
        finally:
            server.stop()


def _blocks() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for page in _pages():
        text = page.read_text()
        name = page.relative_to(REPO).as_posix()
        out += [(name, b) for b in extract_blocks(text)]
        out += [(name, b) for b in extract_python_blocks(text)]
    return out


def test_docs_have_runnable_blocks() -> None:
    pages = {name for name, _ in _blocks()}
    assert {"docs/getting-started.md", "docs/reference/http.md", "docs/reference/python.md"} <= pages


@pytest.mark.slow
@pytest.mark.parametrize("name,block", _blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_docs_blocks_run_against_a_live_server(
    name: str, block: object, demo_server: str, demo_cache: Path, tmp_path: Path
) -> None:
    from _docblocks import Block, PyBlock

    if isinstance(block, Block):
        assert block.api_key is None, "docs blocks run against a server without a key"
        check_block(block, demo_server, tmp_path, name)
    else:
        assert isinstance(block, PyBlock)
        if block.skip:
            pytest.skip(block.skip)
        check_python_block(block, demo_server, demo_cache, name)
