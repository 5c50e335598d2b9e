"""clbench: a benchmark suite for continual learning of large language models."""

__version__ = "0.1.0"
