"""general-mini: a tiny general-ability suite (lm-eval task YAMLs over generated JSON) for demos and tests.

Not a clbench benchmark (it registers nothing): it is read by :mod:`clbench.general` through lm-eval's
``TaskManager(include_path=...)``. Regenerate the data with ``python -m clbench.benchmarks.general_mini.generate``.
"""

from __future__ import annotations

from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
DATA_DIR = SUITE_DIR / "data"
