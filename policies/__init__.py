"""joulecap policies."""
