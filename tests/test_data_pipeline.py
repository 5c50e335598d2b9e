"""From records to batches and back: collation, the rank-aware sampler, warm-up, throughput per optimiser step, and
predictions that stay attached to their own prompts."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_run

from clbench.benchmark import IGNORE_INDEX, Collator
from clbench.models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_training_batches_learn_only_the_answer_and_eos(tok):
    """If this fails, the loss also trains on prompt or padding tokens (TRACE trains on answer + EOS only)."""
    batch = Collator(tok, train=True)([{"prompt": "ab", "answer": "c"}, {"prompt": "abcd", "answer": "xyz"}])
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    short = [bos, *ids(tok, "ab"), *ids(tok, "c"), eos]
    long = [bos, *ids(tok, "abcd"), *ids(tok, "xyz"), eos]
    width = len(long)
    assert batch["input_ids"].tolist() == [short + [pad] * (width - len(short)), long]  # right padding
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [*ids(tok, "c"), eos] + [IGNORE_INDEX] * (width - len(short)),
        [IGNORE_INDEX] * 5 + [*ids(tok, "xyz"), eos]]
    assert batch["attention_mask"].tolist() == [[1] * len(short) + [0] * (width - len(short)), [1] * width]
    assert batch["prompt_mask"].tolist() == [[1] * 3 + [0] * (width - 3), [1] * 5 + [0] * (width - 5)]


def test_truncation_keeps_the_prompts_end_and_the_answers_start(tok):
    """If this fails, long prompts lose their answer cue (it sits at the end) or answers lose their first tokens."""
    batch = Collator(tok, max_prompt_len=3, max_answer_len=2, train=True)([{"prompt": "0123456", "answer": "abcd"}])
    assert batch["input_ids"][0].tolist() == [tok.bos_token_id, *ids(tok, "456"), *ids(tok, "ab"), tok.eos_token_id]


def test_generation_batches_are_left_padded_so_every_row_ends_at_its_prompt(tok):
    """If this fails, greedy generation starts after padding tokens for the shorter prompts of a batch."""
    batch = Collator(tok, train=False)([{"prompt": "ab", "answer": "x"}, {"prompt": "abcd", "answer": "y"}])
    pad, bos = tok.pad_token_id, tok.bos_token_id
    assert batch["input_ids"].tolist() == [[pad, pad, bos, *ids(tok, "ab")], [bos, *ids(tok, "abcd")]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert "labels" not in batch


@pytest.mark.parametrize("num_items, batch_size", [(5, 2), (7, 3), (8, 2)])
def test_every_rank_gets_equal_batches_and_the_last_batch_is_padded_from_the_start(monkeypatch, num_items,
                                                                                   batch_size):
    """If this fails, a 2-process run hangs at the end of an epoch (one rank has a step the other lacks) or drops
    training examples."""
    from clbench import sampling

    sampler = sampling.GlobalBatchSampler(num_items, batch_size, seed=0)
    order = sampler._order()
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(sampling, "world", lambda rank=rank: (2, rank))
        shards.append(list(iter(sampler)))
        assert len(sampler) == len(shards[-1])
    assert len(shards[0]) == len(shards[1]) == -(-num_items // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(num_items))  # nothing dropped
    padded = order + order[: 2 * len(shards[0]) - num_items]
    assert sorted(shards[0] + shards[1]) == sorted(padded)  # the top-up repeats the permutation's start


def test_warmup_ramps_the_learning_rate_linearly(tmp_path, trace_dir):
    """If this fails, `warmup_steps` is silently ignored (or ramps the wrong way)."""
    from clbench import registry
    from clbench.config import build
    from clbench.configs_dir import method_defaults
    from clbench.models import load_model

    cls = registry.get_method("lora")
    cfg = build(cls.config_class, {**method_defaults("lora"), "lr": 0.01, "warmup_steps": 4})
    loaded = load_model("tiny")
    method = cls(loaded.model, loaded.tokenizer, cfg, num_tasks=1)
    method.begin_task(0, None)
    conf = method.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_seconds_per_step_counts_optimiser_steps_not_micro_batches(tmp_path, trace_dir):
    """If this fails, "seconds per optimiser step" is understated K times under `accumulate_grad_batches: K` (the
    8xgpu-node profile uses 4)."""
    from clbench.harness import Harness

    run = Harness(tiny_run(tmp_path, trace_dir, num_tasks=1, batch_size=2, accumulate_grad_batches=3,
                           max_steps_per_task=2)).run()
    train = json.loads((run / "progress.json").read_text())["rows"]["1"]["train"]
    assert train["steps"] == 2  # 2 optimiser steps = 6 micro-batches


ECHO_SOURCE = '''
"""A method whose prediction is the last 6 characters of its own prompt (byte tokenizer: one token per character)."""

import torch

from clbench.methods.lora import LoRA


class Echo(LoRA):
    """Echoes the tail of its prompt, so a prediction scored against another example's prompt is visible."""

    @torch.no_grad()
    def generate(self, batch, max_new_tokens):
        return batch["input_ids"][:, -6:]
'''


def _install_echo(site) -> None:
    """The echo method as an installed plugin (a module + dist-info with the entry point), importable by the
    processes Lightning's DDP launcher starts."""
    (site / "echo_plugin.py").parent.mkdir(parents=True, exist_ok=True)
    (site / "echo_plugin.py").write_text(ECHO_SOURCE)
    dist = site / "echo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[clbench.methods]\necho-test = echo_plugin:Echo\n")


@pytest.mark.parametrize("processes", [1, 2])
def test_predictions_stay_with_their_own_prompts_after_the_sort_and_the_gather(tmp_path, trace_dir, monkeypatch,
                                                                               processes):
    """If this fails, the evaluation's length sort, or the 2-process all-gather by index, scores a prediction against
    another example's answer. An echo method (its prediction is the tail of its own prompt) makes any mix-up
    visible."""
    from conftest import run_cli

    site = tmp_path / "site"
    _install_echo(site)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    run = tmp_path / "run"
    ddp = ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"] if processes == 2 else []
    result = run_cli("run", "--method", "echo-test", "--model", "tiny", "--num-tasks", "1", "--max-steps-per-task",
                     "1", "--precision", "32-true", "--no-progress", "--eval-batch-size", "3", "--data-dir",
                     str(trace_dir), "--out", str(run), *ddp)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((run / "predictions" / "after-1" / "C-STANCE.json").read_text())
    test = json.loads((trace_dir / "C-STANCE" / "test.json").read_text())
    assert [r["prompt"] for r in records] == [r["prompt"] for r in test]  # file order restored
    assert all(r["prediction"] == r["prompt"][-6:] for r in records)
    assert len({r["prompt"] for r in records}) == len(records) > 3  # distinct prompts, more than one batch
