"""Where a number came from: library versions, the clbench commit, peak memory, and the hardware that computed it.

The hardware matters for the numbers themselves, not just for speed: the same command and seed gave lora on
trace-mini OP 0.605 on one 2-core x86-64 CPU and 0.476 on another (docs/uncertainty.md), because bf16 matmuls take
different kernels (AMX tiles, AVX512-BF16 dot products, or AVX2 with fp32 conversion) with different rounding, and
fine-tuning amplifies the difference. :func:`hardware` records what selects those kernels; :func:`hardware_class`
reduces it to the label the leaderboard groups by, so runs from different kernel families are never averaged.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# CPU features that change which bf16/fp32 kernels oneDNN and ATen run (x86 /proc/cpuinfo "flags" names), and the
# aarch64 equivalents ("Features" names)
X86_NUMERIC_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
ARM_NUMERIC_FLAGS = ("bf16", "sve", "i8mm")
UNKNOWN = "unknown"


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def git_commit() -> str | None:
    """The clbench checkout's commit (with ``-dirty`` when it has uncommitted changes), if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the numbers depend on."""
    import lightning
    import peft
    import transformers

    from clbench import __version__

    return {
        "clbench": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "lightning": lightning.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
    }


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model and numerics-relevant ISA flags from /proc/cpuinfo text (the first processor's block).

    Returns ``{"cpu_model": str | None, "isa": {flag: bool}}``; ``isa`` holds :data:`X86_NUMERIC_FLAGS` when the
    text has a ``flags`` line, :data:`ARM_NUMERIC_FLAGS` when it has a ``Features`` line, and is empty otherwise.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in fields:
            fields[key] = value.strip()
    model = fields.get("model name") or fields.get("Hardware") or fields.get("cpu model") or None
    if "flags" in fields:
        present = set(fields["flags"].split())
        isa = {f: f in present for f in X86_NUMERIC_FLAGS}
    elif "Features" in fields:
        present = set(fields["Features"].split())
        isa = {f: f in present for f in ARM_NUMERIC_FLAGS}
    else:
        isa = {}
    return {"cpu_model": model, "isa": isa}


def _cpuinfo() -> dict[str, Any]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:  # not Linux: the model from platform, the flags unknown
        return {"cpu_model": None, "isa": {}}


def hardware() -> dict[str, Any]:
    """What computed a run's numbers, recorded in metrics.json as ``hardware``.

    ``cpu_model`` (/proc/cpuinfo "model name", else ``platform.processor()``), ``machine`` (x86_64, aarch64, ...),
    ``isa`` (the flags of :data:`X86_NUMERIC_FLAGS` / :data:`ARM_NUMERIC_FLAGS` that change kernels and rounding),
    ``torch_cpu_capability`` (the ATen kernel level torch dispatches to, e.g. AVX512), ``cpu_count`` and
    ``cpus_usable`` (affinity), ``torch_threads`` and ``torch_interop_threads`` (thread count changes reduction
    order and so the bits), ``onednn`` (whether torch has oneDNN, which runs the bf16 matmuls), and where CUDA is
    present ``gpus`` (names), ``cuda`` and ``cudnn`` versions.
    """
    info = _cpuinfo()
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    hw: dict[str, Any] = {
        "cpu_model": info["cpu_model"] or platform.processor() or platform.machine() or None,
        "machine": platform.machine(),
        "isa": info["isa"],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "onednn": bool(torch.backends.mkldnn.is_available()),
        "gpus": [],
        "cuda": None,
        "cudnn": None,
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hw["cuda"] = torch.version.cuda
        hw["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return hw


def slow_precision_warning(precision: str, on_cpu: bool) -> str | None:
    """One line when ``precision`` is bf16 on a CPU whose oneDNN has no native bf16 path (no AVX512-BF16 or AMX):
    there torch converts every bf16 matmul to fp32 in a slow reference kernel (measured 17-26x slower than 32-true on
    an AVX2-only EPYC, stop 23's note), so a run that takes minutes elsewhere takes hours. None otherwise."""
    if not (on_cpu and precision.startswith("bf16")):
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: same slow path
        native = False
    if native:
        return None
    return (f"precision {precision} on a CPU without native bf16 (no AVX512-BF16/AMX: "
            f"{torch.backends.cpu.get_cpu_capability()}) runs bf16 matmuls in a slow fallback; "
            "--precision 32-true is several times faster here")


def hardware_class(hw: dict[str, Any] | None) -> str:
    """The kernel family of a run, the label leaderboard rows are grouped by: runs of different classes are never
    averaged or compared.

    GPU runs: ``cuda:<GPU name>`` (distinct names joined with ``+``). CPU runs:
    ``cpu:<torch capability>`` plus ``+avx512_bf16`` / ``+amx`` when the CPU has them (oneDNN runs bf16 matmuls on
    AMX tiles or AVX512-BF16 dot products when present, otherwise converts to fp32), e.g. ``cpu:avx512+avx512_bf16``;
    on aarch64 ``cpu:aarch64`` plus ``+bf16`` / ``+sve``. Thread count is recorded but not part of the class: it
    changes reduction order (noise), not the kernel family. ``unknown`` for runs that did not record hardware
    (folders older than this field).
    """
    if not isinstance(hw, dict) or not hw:
        return UNKNOWN
    gpus = [str(g) for g in hw.get("gpus") or []]
    if gpus:
        return "cuda:" + "+".join(dict.fromkeys(gpus))
    isa = hw.get("isa") or {}
    machine = str(hw.get("machine") or "").lower()
    if machine in ("aarch64", "arm64"):
        parts = ["aarch64", *(f for f in ("bf16", "sve") if isa.get(f))]
    else:
        capability = str(hw.get("torch_cpu_capability") or "").lower()
        if not capability:
            capability = "avx512" if isa.get("avx512f") else "avx2" if isa.get("avx2") else machine or UNKNOWN
        parts = [capability]
        if isa.get("avx512_bf16"):
            parts.append("avx512_bf16")
        if isa.get("amx_bf16") or isa.get("amx_tile"):
            parts.append("amx")
    return "cpu:" + "+".join(parts)
