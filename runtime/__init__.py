"""joulecap runtime: energy-aware serving of vision-language models."""
