"""Progressive Prompts on the tiny random model: frozen earlier prompts, the prompt stack seen by training and by
generation, TRACE's labelled options, bad knobs, and a harness run that resumes after a crash."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import crash_in_begin_task, fit_task, run_predictions, tiny_run

from clbench.benchmark import Collator, Task, TaskSpec

NAME = "progressive-prompts"


def _task(name: str, n: int = 8) -> Task:
    records = [{"prompt": f"{name} question {i} of {n}", "answer": f"{name[:2]}{i}"} for i in range(n)]
    return Task(TaskSpec(name, "accuracy", max_new_tokens=4), train=records, eval=records[:2], test=records[:4])


TASKS = [_task("alpha"), _task("bravo"), _task("charlie")]


def _method(num_tasks: int = 3, **knobs):
    from clbench.configs_dir import method_defaults
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(NAME)
    loaded = tiny_model()
    torch.manual_seed(0)
    cfg = cls.config_class(**{**method_defaults(NAME), "prompt_length": 3, "lr": 0.05, **knobs})
    return cls(loaded.model, loaded.tokenizer, cfg, num_tasks=num_tasks)


def _fit(method, t: int, steps: int = 3) -> None:
    """begin_task / Lightning fit / end_task on TASKS[t], as the harness does."""
    fit_task(method, t, TASKS[t], steps)


def _generation_batch(method, prompts: list[str]) -> dict[str, torch.Tensor]:
    return Collator(method.tokenizer, 64, train=False)([{"prompt": p, "index": i} for i, p in enumerate(prompts)])


@pytest.mark.parametrize("mlp", ["none", "residual"])
def test_earlier_prompts_are_bitwise_unchanged_after_later_tasks(mlp: str):
    """If this fails, training a later task moves an earlier task's prompt (or the base model), so what the model
    answers on finished tasks drifts: the method's whole protection against forgetting is gone."""
    L.seed_everything(0, verbose=False)
    method = _method(mlp=mlp)
    base = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    initial = method.prompts[0].detach().clone()
    stored = []
    for t in range(3):
        _fit(method, t)
        stored.append(method.finished[t].clone())
    for t in range(3):
        assert torch.equal(method.finished[t], stored[t]), t
    assert not torch.equal(method.prompts[0], initial)  # not vacuous: task 0's prompt did learn
    assert not torch.equal(stored[0], stored[1])
    assert all(torch.equal(p, base[n]) for n, p in method.model.named_parameters())
    # the test-time stack: every finished prompt, newest first (the paper's [P_k; ...; P_1; x])
    assert torch.equal(method.prefix(), torch.cat([stored[2], stored[1], stored[0]]))


def test_only_the_current_prompt_gets_gradients_and_earlier_ones_are_in_its_input():
    """If this fails, task t's loss trains an earlier prompt (forgetting), or task t does not read the earlier
    prompts at all (then it is per-task prompt tuning, not Progressive Prompts, and cannot reuse what they learned)."""
    L.seed_everything(0, verbose=False)
    method = _method(mlp="residual")
    _fit(method, 0)
    method.begin_task(1, TASKS[1])
    method.train()
    batch = Collator(method.tokenizer, 64, 16, train=True)(TASKS[1].train[:2])
    method(batch).loss.backward()
    assert method.prompts[1].grad is not None and method.prompts[1].grad.abs().sum() > 0
    assert method.prompts[0].grad is None and not method.finished.requires_grad
    assert all(p.grad is None for p in method.model.parameters())
    assert method.prefix().shape[0] == 2 * 3  # P'_1 (live) then the stored P'_0
    with torch.no_grad():
        loss_with_old = method(batch).loss
        done = method.task_done.clone()
        method.task_done[0] = False  # hide P'_0: the loss must change, so P'_0 really is in the input
        loss_without_old = method(batch).loss
        method.task_done.copy_(done)
    assert not torch.isclose(loss_with_old, loss_without_old)


def test_oracle_task_id_answers_each_task_with_its_own_stack_as_the_paper_scores_it():
    """If this fails, `--oracle-task-id` either is refused for progressive-prompts or still reads later tasks'
    prompts, so nobody can run the paper's (task-aware) evaluation, where a finished task's answers never change."""
    L.seed_everything(0, verbose=False)
    method = _method()
    method.eval()
    batch = _generation_batch(method, ["alpha question 1 of 8", "alpha question 2 of 8"])
    _fit(method, 0)
    method.eval()
    with torch.no_grad():
        just_learned = method(batch).logits
    _fit(method, 1)
    _fit(method, 2)
    method.eval()
    with torch.no_grad():
        oracle = method({**batch, "task_id": torch.zeros(2, dtype=torch.long)}).logits
        agnostic = method(batch).logits
        second = method({**batch, "task_id": torch.ones(2, dtype=torch.long)})
    assert torch.equal(oracle, just_learned)  # task 0's input is what it was when task 0 was scored
    assert not torch.allclose(agnostic, just_learned)  # not vacuous: the full stack does change the answer
    assert second.logits.shape == oracle.shape
    assert method.prefix(1).shape[0] == 2 * 3 and method.prefix().shape[0] == 3 * 3
    with pytest.raises(ValueError, match="one task id per batch"):
        method({**batch, "task_id": torch.tensor([0, 1])})


def test_generation_gives_the_training_forwards_first_token_logits():
    """If this fails, generation does not see the prompts as training did (wrong positions with left padding, a
    prompt-less prefill, or pads attended), so test scores measure something other than what was trained."""
    from clbench.methods._prompts import generate_with_prefix

    L.seed_everything(0, verbose=False)
    method = _method(num_tasks=2)
    _fit(method, 0)
    _fit(method, 1)
    method.eval()
    prompts = ["hi", "a much longer prompt than the first one"]
    batch = _generation_batch(method, prompts)  # left-padded: the rows differ in length
    prefix = method._batch_prefix(batch)
    out = generate_with_prefix(method.model, method.tokenizer, batch, prefix, 2, output_logits=True,
                               return_dict_in_generate=True)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            alone = Collator(method.tokenizer, 64, 16, train=True)([{"prompt": prompt, "answer": ""}])
            n = len(_generation_batch(method, [prompt])["input_ids"][0])  # BOS + prompt, no answer tokens
            logits = method(alone).logits[0, n - 1]  # training-style forward (right-padded, loss path)
            torch.testing.assert_close(out.logits[0][i], logits, atol=1e-5, rtol=1e-5)
            # and an eval forward of the left-padded batch numbers positions as generate's prefill does
            torch.testing.assert_close(method(batch).logits[i, -1], logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(method.generate(batch, 2), out.sequences)  # the method's generate is this path


def test_trace_options_change_what_they_say():
    """If this fails, TRACE's labelled behaviours (`--set init_from_previous=true`, `mlp=trace`, `init_scale=0.01`)
    are ignored, so a user asking for TRACE's setup silently gets the paper's."""
    L.seed_everything(0, verbose=False)
    carried = _method(num_tasks=2, init_from_previous=True, mlp="trace", init_scale=0.01)
    fresh = _method(num_tasks=2, init_scale=0.01)
    assert isinstance(carried.mlp.f[3], torch.nn.Tanh) and fresh.mlp is None
    _fit(carried, 0)
    carried.begin_task(1, TASKS[1])
    assert torch.equal(carried.prompts[1], carried.prompts[0])  # task 1 starts where task 0's prompt ended
    fresh.begin_task(1, TASKS[1])
    assert not torch.equal(fresh.prompts[1], fresh.prompts[0])
    scaled, plain = _method(init_scale=0.01).prompts[0], _method().prompts[0]
    torch.testing.assert_close(scaled, 0.01 * plain)  # same draw (same seed), 1/100 of it


@pytest.mark.parametrize(("knob", "value"), [("prompt_length", 0), ("mlp", "mlp3"), ("mlp_bottleneck", 1),
                                             ("init_scale", 0.0)])
def test_bad_knob_values_are_one_line_errors(knob: str, value):
    """If this fails, a bad `--set` value for Progressive Prompts crashes later with a traceback (or runs)."""
    from clbench.config import ConfigError, build
    from clbench.configs_dir import method_defaults
    from clbench.registry import get_method

    with pytest.raises(ConfigError, match=knob) as err:
        build(get_method(NAME).config_class, {**method_defaults(NAME), knob: value})
    assert "\n" not in str(err.value)


def test_param_report_counts_one_stored_prompt_per_finished_task():
    """If this fails, the leaderboard's parameter growth for Progressive Prompts counts the pre-allocated prompts of
    tasks not yet trained, or the MLP that the paper drops after each task."""
    method = _method(mlp="residual")
    _fit(method, 0)
    _fit(method, 1)
    report = method.param_report()
    assert report["added"] == report["frozen"] == 2 * 3 * method.finished.shape[-1]
    assert report["trainable"] == 0


def test_resume_after_crash_gives_identical_predictions(tmp_path, trace_dir, monkeypatch):
    """If this fails, a Progressive Prompts run killed mid-order resumes with different prompts (or a differently
    initialised MLP) than the uninterrupted run, so its R and predictions differ."""
    from clbench.harness import Harness

    knobs = {"mlp": "residual", "prompt_length": 2, "lr": 0.05}
    settings = dict(method=NAME, max_steps_per_task=2)
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), **settings), knobs).run()
    crashed = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), **settings)
    with crash_in_begin_task(NAME, at=1), pytest.raises(KeyboardInterrupt):
        Harness(crashed, knobs).run()
    resumed = Harness(crashed, knobs).run()
    assert (full / "R.csv").read_text() == (resumed / "R.csv").read_text()
    assert run_predictions(full) == run_predictions(resumed)
    # the random tiny model keeps answering "====" whatever 2 prompt steps do (it copies the last token), so the
    # comparison is made non-vacuous on the method state: the stored prompts were trained and agree bit for bit
    a, b = (torch.load(run / "state" / "after-2.pt", weights_only=True) for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["finished"].abs().sum(dim=(1, 2)).gt(0).all() and not torch.equal(a["finished"][0], a["finished"][1])
