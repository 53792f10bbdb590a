"""joulecap's serving runtime: `from joulecap.runtime import Runtime`.

`Runtime` is imported lazily so that light users of the package (the CLI's argument parsing,
configs, meters) do not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from joulecap.runtime.runtime import Runtime

__all__ = ["Runtime"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from joulecap.runtime.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'joulecap.runtime' has no attribute {name!r}")
