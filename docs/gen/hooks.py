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
from results_ref import REPO, RESULTS, render_results

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


API_TREE = REPO / "build" / "docs-api"
"""Where `joulecap.runtime`, `.policies` and `.kernels` are laid out as links for mkdocstrings."""


def api_tree() -> Path:
    """`build/docs-api/joulecap/{runtime,policies,kernels}` as links to the source folders."""
    package = API_TREE / "joulecap"
    package.mkdir(parents=True, exist_ok=True)
    # A regular package (not a namespace one), so it wins over the editable install's finder.
    (package / "__init__.py").write_text('"""joulecap (laid out for the API reference)."""\n')
    for name in ("runtime", "policies", "kernels"):
        link = package / name
        if not link.is_symlink():
            link.symlink_to(REPO / name, target_is_directory=True)
    return API_TREE


def on_config(config: Any) -> Any:
    """MkDocs event: lay out the package tree mkdocstrings reads before anything is collected."""
    api_tree()
    return config


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
