"""Formats and files: the row schema, event records, the window payload, the readers (no TensorFlow)."""
