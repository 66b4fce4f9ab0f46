"""Host-side interpretation of fetched windows: rows, detectors and alerts (no TensorFlow)."""
