"""MkDocs hooks: fill the generated parts of the reference pages.

A page marks a generated part with an HTML comment on a line of its own:
`<!-- gen:cli -->` (the command line, from `build_parser()`), `<!-- gen:http -->` (the HTTP
routes and request models, from the app's OpenAPI schema) and `<!-- gen:results -->` (the index
of `benchmarks/results/`). Each generator runs once per build. The figures under
`benchmarks/results/` are published as `results/...` so that pages show them from where the
benchmarks wrote them, without copies.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_ref import render_cli
from http_ref import render_http
from results_ref import RESULTS, render_results

GENERATORS: dict[str, Callable[[], str]] = {
    "cli": functools.cache(render_cli),
    "http": functools.cache(render_http),
    "results": functools.cache(render_results),
}


def expand(markdown: str) -> str:
    """`markdown` with every `<!-- gen:NAME -->` line replaced by its generator's output."""
    out = []
    for line in markdown.splitlines():
        name = line.strip().removeprefix("<!-- gen:").removesuffix(" -->")
        if line.strip().startswith("<!-- gen:") and line.strip().endswith("-->"):
            if name not in GENERATORS:
                raise ValueError(f"unknown generated part {name!r}; known: {', '.join(GENERATORS)}")
            out.append(GENERATORS[name]())
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    """MkDocs event: expand the generated parts of a page before it is rendered."""
    return expand(markdown)


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: add the PNG figures of `benchmarks/results/` to the site as `results/...`."""
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.rglob("*.png")):
        files.append(
            File(
                f"results/{png.relative_to(RESULTS).as_posix()}",
                src_dir=str(RESULTS.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
