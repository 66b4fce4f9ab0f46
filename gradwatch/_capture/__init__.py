"""In-graph capture: everything that runs TensorFlow (the recorder, its statistics,
window, probes, and the one module that touches Keras internals).

A second capture backend (Keras 3 on JAX) would be one more subpackage beside
this one that produces the same ``FetchedWindow`` for the interpreter.
"""
