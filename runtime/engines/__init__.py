"""VLM engines behind the `Engine` protocol."""
