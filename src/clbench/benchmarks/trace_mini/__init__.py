"""trace-mini: TRACE's 8 task names, layout, orders and scorers on small generated data that ships with clbench.

Small enough that the bundled SmolLM2-135M learns each task in tens of LoRA steps on a laptop CPU; answer formats are
shared between tasks (A/B/C, integers) so forgetting is visible. Regenerate with ``python -m
clbench.benchmarks.trace_mini.generate`` (see README.md beside this file).
"""

from __future__ import annotations

from pathlib import Path

from clbench.benchmark import Benchmark, TaskSpec, load_trace_layout
from clbench.benchmarks.trace import TRACE_ORDERS, TRACE_TASKS
from clbench.registry import register_benchmark

DATA_DIR = Path(__file__).parent / "data"

# Generation budgets sized to trace-mini's short answers (TRACE itself allows 512 new tokens): every answer of
# MeetingBank and 20Minuten fits in SmolLM2 tokens (longest 29 and 34; tests/test_trace_mini_data.py checks it);
# Py150's longest lines are cut, as before. Untrained models often run to the budget, so it is evaluation time.
MAX_NEW_TOKENS = {"C-STANCE": 3, "FOMC": 3, "MeetingBank": 30, "Py150": 24, "ScienceQA": 3, "NumGLUE-cm": 6,
                  "NumGLUE-ds": 6, "20Minuten": 35}


@register_benchmark("trace-mini", metrics={name: metric for name, (metric, _) in TRACE_TASKS.items()})
def trace_mini(data_dir: str | None = None, limit_train: int | None = None, limit_eval: int | None = None,
               limit_test: int | None = None) -> Benchmark:
    """The bundled benchmark: one epoch per task, prompts ≤ 256 tokens, answers ≤ 48 tokens."""
    root = Path(data_dir) if data_dir else DATA_DIR
    specs = [TaskSpec(name, metric, epochs=1, max_new_tokens=MAX_NEW_TOKENS[name])
             for name, (metric, _) in TRACE_TASKS.items()]
    tasks = load_trace_layout(root, specs, limit_train, limit_eval, limit_test)
    return Benchmark("trace-mini", tasks, TRACE_ORDERS, str(root), max_prompt_len=256, max_answer_len=48)
