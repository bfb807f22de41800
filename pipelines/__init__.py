"""Pipelines: stages and sinks that turn changes into delivered deltas."""
