"""TRACE (Wang et al., 2023, arXiv 2310.06762): 8 tasks in TRACE's own layout, its two orders, epochs and scorers.

The data is not shipped: download TRACE's benchmark data (see docs/benchmarks/trace.md) and point ``--data-dir`` or
``CLBENCH_TRACE_DIR`` at the folder holding ``<Task>/{train,eval,test}.json``.
"""

from __future__ import annotations

import os

from clbench.benchmark import Benchmark, DataError, TaskSpec, load_trace_layout
from clbench.registry import register_benchmark

# Task -> (scorer, TRACE's epochs). Scorers follow TRACE's evaluations/eval_<Task>.py.
TRACE_TASKS: dict[str, tuple[str, int]] = {
    "C-STANCE": ("accuracy", 5),
    "FOMC": ("accuracy", 3),
    "MeetingBank": ("rouge_l", 7),
    "Py150": ("edit_similarity", 5),
    "ScienceQA": ("first_char_accuracy", 3),
    "NumGLUE-cm": ("accuracy", 5),
    "NumGLUE-ds": ("accuracy", 5),
    "20Minuten": ("sari", 7),
}

TRACE_ORDERS: dict[int, list[str]] = {
    1: ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
    2: ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150", "MeetingBank", "ScienceQA"],
}

# TRACE's training scripts: --max_prompt_len 1024 --max_ans_len 512; inference generates up to max_ans_len tokens.
TRACE_MAX_PROMPT_LEN = 1024
TRACE_MAX_ANSWER_LEN = 512

MISSING_HELP = (
    "TRACE's data is not bundled: download it from the TRACE repository (github.com/BeyonderXX/TRACE, "
    "'LLM-CL-Benchmark_5000' or the 500/1000-example subsets), then pass --data-dir DIR or set CLBENCH_TRACE_DIR "
    "to the folder holding <Task>/{train,eval,test}.json"
)


@register_benchmark("trace", metrics={name: metric for name, (metric, _) in TRACE_TASKS.items()})
def trace(data_dir: str | None = None, limit_train: int | None = None, limit_eval: int | None = None,
          limit_test: int | None = None) -> Benchmark:
    """TRACE on the user's downloaded data, with TRACE's defaults (orders, epochs, length limits)."""
    data_dir = data_dir or os.environ.get("CLBENCH_TRACE_DIR")
    if not data_dir:
        raise DataError(f"no TRACE data directory given. {MISSING_HELP}")
    if not os.path.isdir(data_dir):
        raise DataError(f"TRACE data directory not found: {data_dir}. {MISSING_HELP}")
    specs = [TaskSpec(name, metric, epochs, max_new_tokens=TRACE_MAX_ANSWER_LEN)
             for name, (metric, epochs) in TRACE_TASKS.items()]
    tasks = load_trace_layout(data_dir, specs, limit_train, limit_eval, limit_test)
    return Benchmark("trace", tasks, TRACE_ORDERS, str(data_dir), TRACE_MAX_PROMPT_LEN, TRACE_MAX_ANSWER_LEN)
