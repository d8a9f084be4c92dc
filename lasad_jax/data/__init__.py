"""Data sources and grain pipelines."""
