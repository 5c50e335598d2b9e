"""Train throughput of 1 vs N processes (Lightning DDP) at the same global batch, per method.

Each method trains the first task of trace-mini for a fixed number of steps once in one process (batch B) and once
in N processes (batch B/N each), through the normal `clbench run` CLI; tokens/s comes from the run's metrics.json
(first step excluded). Writes results/bench/<name>.csv and prints the N-process / 1-process ratio.

    python scripts/ddp_scaling.py --methods lora,moses --processes 2 --name ddp-scaling-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd


def run_once(method: str, processes: int, global_batch: int, steps: int, model: str, out: Path) -> dict:
    """One `clbench run` of one task; returns the throughput fields of its metrics.json."""
    threads = max(1, (os.cpu_count() or 1) // processes)  # the cores are split between the ranks, never oversubscribed
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "clbench.cli", "run", "--method", method, "--benchmark", "trace-mini",
           "--model", model, "--num-tasks", "1", "--max-steps-per-task", str(steps), "--no-zero-shot",
           "--limit-test", "8", "--no-progress", "--batch-size", str(global_batch // processes),
           "--devices", str(processes), "--accelerator", "cpu", "--out", str(out)]
    if processes > 1:
        cmd += ["--strategy", "ddp"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"method": method, "processes": processes, "threads_per_process": threads,
            "batch_per_process": global_batch // processes, "global_batch": global_batch, "steps": steps,
            "train_tokens_per_s": metrics["train_tokens_per_s"], "train_step_time_s": metrics["train_step_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,moses")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--name", default="ddp-scaling-cpu")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for processes in (1, args.processes):
                rows.append(run_once(method, processes, args.global_batch, args.steps, args.model,
                                     Path(tmp) / f"{method}-{processes}"))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    single = table[table.processes == 1].set_index("method")["train_tokens_per_s"]
    table["ratio_vs_1_process"] = table["train_tokens_per_s"] / table["method"].map(single)
    table["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
