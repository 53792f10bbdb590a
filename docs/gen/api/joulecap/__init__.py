"""joulecap, laid out for the API reference (mkdocstrings reads the source folders through these links)."""
