"""HTTP API: OpenAI-style chat completions with joule budgets."""
