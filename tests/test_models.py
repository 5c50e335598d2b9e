"""Model loading: the tiny test model needs no files; the bundled SmolLM2 loads offline and trains a step."""

from __future__ import annotations

import pytest
import torch

from clbench.models import ModelError, byte_tokenizer, load_model, tiny_model


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Zürich: 3 + 4 = 7 → 判断"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_tiny_model_is_deterministic_and_small():
    a, b = tiny_model(), tiny_model()
    assert sum(p.numel() for p in a.model.parameters()) < 500_000
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "no-such-model"))


@pytest.mark.slow
def test_bundled_smollm2_runs_two_lora_steps_through_the_harness(tmp_path):
    """The one slower end-to-end test: the real bundled model, 1 task, 2 steps, 2 test examples."""
    from clbench.harness import Harness, RunConfig

    cfg = RunConfig(method="lora", benchmark="trace-mini", model="bundled", num_tasks=1, max_steps_per_task=2,
                    batch_size=2, limit_train=4, limit_test=2, eval_batch_size=2, progress=False,
                    out=str(tmp_path / "run"))
    run_dir = Harness(cfg).run()
    assert (run_dir / "DONE").is_file()
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["params"][0]["trainable"] == metrics["params"][0]["added"] > 0
    assert 0.0 <= metrics["OP"] <= 1.0
