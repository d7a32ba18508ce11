"""cljax: data-parallel continual learning with distributed rehearsal buffers in JAX."""

__version__ = "0.1.0"
