"""What a TRACE run of LLaMA-2-7B on one 8-GPU node should cost: a calculation, not a measurement.

Every input is a stated assumption with a flag to change it. The formulas:

- train FLOPs per token (frozen base, adapters only): forward 2N plus the activation-gradient half of the backward,
  2N x (share of layers the backward must cross). LoRA on every layer crosses all of them (4N); MoSEs' sub-experts
  sit in the upper half by default and nothing below them trains, so its backward stops there (3N). The weight
  gradients of the frozen base (the other 2N of full fine-tuning's 6N) are never computed.
- train tokens/s per GPU = peak bf16 FLOP/s x MFU / FLOPs per token; the node scales by GPUs x DDP efficiency (the
  all-reduce carries only the adapter gradients, a few MB per step).
- memory per GPU under DDP: bf16 weights (2N bytes; `--frozen-dtype bf16`, set by the GPU hardware profiles; fp32
  frozen weights would need 4N) + activations (34 s b h bytes per layer; Korthikanti et al.
  2022, eq. 2, with FlashAttention removing the 5as/h attention-score term) + adapter weights, grads and Adam
  state (16 bytes per trainable parameter).
- generation is memory-bound at small batch: one decoding step reads every weight once, 2N bytes / HBM bandwidth.

    python scripts/predict_7b.py                   # H100 80GB defaults
    python scripts/predict_7b.py --peak-tflops 312 --hbm-tbps 2.0 --gpu A100-80GB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clbench.benchmarks.trace import TRACE_ORDERS, TRACE_TASKS  # noqa: E402  (the epochs TRACE trains each task for)

# LLaMA-2-7B (Touvron et al., 2023): parameters, layers, hidden size
PARAMS, LAYERS, HIDDEN = 6.74e9, 32, 4096
# Assumed mean tokens per TRACE training example (prompt + answer, after TRACE's 1024/512 truncation). These are
# estimates from the task formats (MeetingBank transcripts are long, NumGLUE problems short); pass --tokens to change.
ASSUMED_TOKENS = {"C-STANCE": 150, "FOMC": 90, "MeetingBank": 1100, "Py150": 350, "ScienceQA": 200,
                  "NumGLUE-cm": 110, "NumGLUE-ds": 160, "20Minuten": 400}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="H100-80GB")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth per GPU, TB/s (H100 SXM: 3.35)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOP utilisation of adapter training")
    p.add_argument("--ddp-efficiency", type=float, default=0.95)
    p.add_argument("--train-examples", type=int, default=5000, help="per task (TRACE's full version)")
    p.add_argument("--test-examples", type=int, default=2000, help="per task")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024, help="sequence length for the activation-memory estimate")
    p.add_argument("--decode-steps", type=int, default=128, help="mean decoding steps per generation batch")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=None, help="mean tokens per example for every task (else per-task "
                                                             "assumptions)")
    a = p.parse_args()

    lora_trainable = 2 * 8 * HIDDEN * 2 * LAYERS  # r=8 on q_proj and v_proj of all 32 layers: A (r x h) + B (h x r)
    moses_trainable = 2 * (4 * 2) * HIDDEN * 2 * (LAYERS // 2)  # k=4 experts x r_s=2 on q,v of the upper 16 layers
    methods = {"lora": (4.0, lora_trainable), "moses": (3.0, moses_trainable)}
    train_tokens = sum(TRACE_TASKS[t][1] * a.train_examples * (a.tokens or ASSUMED_TOKENS[t]) for t in TRACE_ORDERS[1])
    activations = 34 * a.seq * a.micro_batch * HIDDEN * LAYERS
    decode_step_s = 2 * PARAMS / (a.hbm_tbps * 1e12)
    generations = (len(TRACE_ORDERS[1]) + 1) * len(TRACE_ORDERS[1]) * a.test_examples  # zero-shot row + T rows
    eval_s = generations / (a.eval_batch * a.gpus) * a.decode_steps * decode_step_s

    print(f"LLaMA-2-7B on {a.gpus} x {a.gpu} (by calculation; assumptions in the flags and the docstring)")
    print(f"TRACE training tokens over the 8 tasks x TRACE's epochs: {train_tokens / 1e6:.0f} M")
    print(f"evaluation (the full R matrix, {generations:,} generations): {eval_s / 60:.0f} min per method")
    print("| method | trainable params | FLOPs/token | tokens/s per GPU | tokens/s node | train time | memory/GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (flops_factor, trainable) in methods.items():
        per_gpu = a.peak_tflops * 1e12 * a.mfu / (flops_factor * PARAMS)
        node = per_gpu * a.gpus * a.ddp_efficiency
        memory = 2 * PARAMS + activations * (0.5 if name == "moses" else 1.0) + 16 * trainable
        print(f"| {name} | {trainable / 1e6:.1f} M | {flops_factor:.0f}N | {per_gpu:,.0f} | {node:,.0f} | "
              f"{train_tokens / node / 60:.0f} min | {memory / 2**30:.0f} GiB |")


if __name__ == "__main__":
    main()
