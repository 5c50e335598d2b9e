"""What a user reads to know which machine produced a number: metrics.json's ``hardware`` and its class label."""

from __future__ import annotations

import json

from conftest import tiny_run

from clbench import provenance
from clbench.provenance import hardware, hardware_class, parse_cpuinfo

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: something else
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd bf16 i8mm
"""
KEYS = {"cpu_model", "machine", "isa", "torch_cpu_capability", "cpu_count", "cpus_usable", "torch_threads",
        "torch_interop_threads", "onednn", "gpus", "cuda", "cudnn"}


def test_cpuinfo_flags_that_change_numerics_are_read():
    """If this fails, metrics.json says nothing (or the wrong thing) about AMX / AVX512-BF16 / AVX2, the features
    that pick the bf16 kernels, and two machines that compute different numbers look the same."""
    x86 = parse_cpuinfo(X86_CPUINFO)
    assert x86["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"  # the first processor's block
    assert x86["isa"] == {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx512f": True, "avx2": True,
                          "fma": True}
    assert parse_cpuinfo(X86_CPUINFO.replace(" avx512_bf16 amx_bf16 amx_tile", ""))["isa"]["amx_bf16"] is False
    assert parse_cpuinfo(ARM_CPUINFO)["isa"] == {"bf16": True, "sve": False, "i8mm": True}
    assert parse_cpuinfo("") == {"cpu_model": None, "isa": {}}


def test_hardware_of_this_machine_has_every_field():
    """If this fails, a new run's metrics.json lacks a field the leaderboard or a reader needs to tell machines
    apart (CPU model, ISA flags, torch's CPU capability, threads, GPUs, CUDA/cuDNN)."""
    hw = hardware()
    assert set(hw) == KEYS
    assert isinstance(hw["cpu_model"], str) and hw["cpu_model"]
    assert isinstance(hw["torch_threads"], int) and hw["torch_threads"] >= 1
    assert isinstance(hw["isa"], dict) and all(isinstance(v, bool) for v in hw["isa"].values())
    assert json.loads(json.dumps(hw)) == hw  # it goes into metrics.json as is
    assert hardware_class(hw) != provenance.UNKNOWN


def test_hardware_class_labels():
    """If this fails, the leaderboard groups an AMX machine with an AVX2 one (or splits one machine by thread
    count), or old folders without hardware are not kept apart as 'unknown'."""
    amx = {"machine": "x86_64", "torch_cpu_capability": "AVX512", "gpus": [],
           "isa": {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx512f": True, "avx2": True}}
    assert hardware_class(amx) == "cpu:avx512+avx512_bf16+amx"
    assert hardware_class({**amx, "torch_threads": 1}) == hardware_class({**amx, "torch_threads": 2})
    avx2 = {"machine": "x86_64", "torch_cpu_capability": "AVX2", "isa": {"avx2": True}, "gpus": []}
    assert hardware_class(avx2) == "cpu:avx2"
    assert hardware_class({"machine": "x86_64", "isa": {"avx512f": True}}) == "cpu:avx512"  # no torch capability
    assert hardware_class({"machine": "aarch64", "isa": {"bf16": True, "sve": False}}) == "cpu:aarch64+bf16"
    gpu = {**amx, "gpus": ["NVIDIA H200", "NVIDIA H200"], "cuda": "12.8"}
    assert hardware_class(gpu) == "cuda:NVIDIA H200"
    assert hardware_class(None) == hardware_class({}) == "unknown"


def test_every_new_run_records_its_hardware(tmp_path, trace_dir):
    """If this fails, a fresh run folder cannot say what machine made it (the README's rerun differed by 13 OP
    points between two CPUs), and its leaderboard row lands in the 'unknown' class or has no test-sample interval."""
    from clbench.harness import Harness
    from clbench.leaderboard import build_leaderboard

    run_dir = Harness(tiny_run(tmp_path, trace_dir, num_tasks=1)).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["hardware"]) == KEYS and metrics["device"]  # the old key stays
    assert metrics["hardware"]["torch_threads"] >= 1
    row = build_leaderboard([run_dir]).iloc[0]
    assert row["hardware_class"] == hardware_class(metrics["hardware"]) != "unknown"
    assert "no-test-var" not in row["ci_flags"]  # its predictions reproduce R, so test sampling is covered


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(monkeypatch):
    """If this fails, a user on an AVX2-only CPU starts the bf16 demo and waits hours without being told that
    --precision 32-true is many times faster there (stop 23 measured 17-26x); or the warning appears where bf16 is
    native or the run is not bf16 at all."""
    import torch

    from clbench.provenance import slow_precision_warning

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    line = slow_precision_warning("bf16-mixed", on_cpu=True)
    assert line and "32-true" in line and "\n" not in line
    assert slow_precision_warning("32-true", on_cpu=True) is None
    assert slow_precision_warning("bf16-mixed", on_cpu=False) is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert slow_precision_warning("bf16-mixed", on_cpu=True) is None
