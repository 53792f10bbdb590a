"""Energy measurement: meters, sampling, windows, attribution."""
