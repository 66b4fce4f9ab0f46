"""The "Gradient Flow" TensorBoard plugin (imports no TensorFlow)."""
