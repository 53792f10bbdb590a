"""Benchmarks (run as scripts or `python -m benchmarks.X`).

The repository root must be on `sys.path` for `benchmarks` to import, but ahead of
site-packages its source folders shadow installed top-level packages: `kernels/` (installed as
`joulecap.kernels`) hides Hugging Face's `kernels` package, which transformers imports when it is
installed (transformers 5.25 depends on it). Importing `benchmarks` therefore moves the root to
the end of `sys.path`: `benchmarks` stays importable, installed packages come first.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == _ROOT
    except OSError:
        return False


if any(_is_root(p) for p in sys.path):
    sys.path[:] = [p for p in sys.path if not _is_root(p)] + [str(_ROOT)]
