"""L2P on the tiny random model: nearest-key prompt selection, no task id anywhere, the pull term, generation that
matches the training forward, TRACE's labelled key option, bad knobs, and a harness run that resumes after a crash."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import crash_in_begin_task, fit_task, run_predictions, tiny_run

from clbench.benchmark import Collator, Task, TaskSpec

NAME = "l2p"


def _task(name: str, n: int = 8) -> Task:
    records = [{"prompt": f"{name} question {i} of {n}", "answer": f"{name[:2]}{i}"} for i in range(n)]
    return Task(TaskSpec(name, "accuracy", max_new_tokens=4), train=records, eval=records[:2], test=records[:4])


TASKS = [_task("alpha"), _task("bravo")]


def _method(num_tasks: int = 2, **knobs):
    from clbench.configs_dir import method_defaults
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method(NAME)
    loaded = tiny_model()
    torch.manual_seed(0)
    cfg = cls.config_class(**{**method_defaults(NAME), "pool_size": 6, "top_k": 2, "prompt_length": 2, "lr": 0.05,
                              **knobs})
    return cls(loaded.model, loaded.tokenizer, cfg, num_tasks=num_tasks)


def _fit(method, t: int, steps: int = 3) -> None:
    """begin_task / Lightning fit / end_task on TASKS[t], as the harness does."""
    fit_task(method, t, TASKS[t], steps)


def _generation_batch(method, prompts: list[str], **extra) -> dict[str, torch.Tensor]:
    records = [{"prompt": p, "index": i, **extra} for i, p in enumerate(prompts)]
    return Collator(method.tokenizer, 64, train=False)(records)


def get_cls():
    """The registered L2P class."""
    from clbench.registry import get_method

    return get_method(NAME)


PROMPTS = ["hi", "a much longer prompt than the first one", "alpha question 3 of 8"]


def test_selects_the_prompts_whose_keys_are_nearest_the_query():
    """If this fails, L2P reads prompts other than the N whose keys are closest (by cosine) to the example's query,
    so the key-query matching that makes it task-agnostic does not decide anything."""
    method = _method(pool_size=6, top_k=2)
    batch = _generation_batch(method, PROMPTS)
    q = method.query(batch)
    # place keys by hand: key 4 is each query itself (cos 1), key 1 is close to it, the rest point away
    with torch.no_grad():
        method.prompt_keys.copy_(-q.mean(0).expand_as(method.prompt_keys))
        method.prompt_keys[1] = q.mean(0) + 0.1 * torch.randn_like(q[0])
    per_example = []
    for i in range(len(PROMPTS)):
        with torch.no_grad():
            method.prompt_keys[4] = q[i]
        idx = method.select(q[i : i + 1])
        assert idx.tolist() == [[4, 1]], i  # nearest first
        per_example.append(idx)
        expected = torch.cat([method.prompt_pool[4], method.prompt_pool[1]])
        assert torch.equal(method._prefix(idx)[0], expected)
    # against a brute-force ranking of random keys
    with torch.no_grad():
        method.prompt_keys.normal_()
    cos = F.normalize(q, dim=-1) @ F.normalize(method.prompt_keys.detach(), dim=-1).T
    assert method.select(q).tolist() == cos.argsort(-1, descending=True)[:, :2].tolist()


def test_query_is_the_frozen_models_hidden_state_and_ignores_padding():
    """If this fails, the query depends on which examples share the batch (padding leaks in) or is not the frozen
    model's hidden state of the example's own tokens, so the same input could pick different prompts."""
    method = _method(query_layer=1)
    alone = [method.query(_generation_batch(method, [p])) for p in PROMPTS]
    together = method.query(_generation_batch(method, PROMPTS))
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(together[i], alone[i][0], atol=1e-5, rtol=1e-5)
    single = _generation_batch(method, [PROMPTS[1]])
    with torch.no_grad():
        hidden = method.model(**{k: single[k] for k in ("input_ids", "attention_mask")},
                              output_hidden_states=True).hidden_states[2]  # after layer 1
    torch.testing.assert_close(alone[1][0], hidden[0, 1:].mean(0), atol=1e-5, rtol=1e-5)  # BOS left out


def test_never_sees_a_task_id():
    """If this fails, L2P's outputs depend on the task index (the harness's current task or a task_id in the batch),
    so it is not task-agnostic and its scores are not comparable with the other continual-learning methods."""
    L.seed_everything(0, verbose=False)
    method = _method()
    _fit(method, 0)
    method.eval()
    plain = method.generate(_generation_batch(method, PROMPTS), 3)
    with_id = method.generate(_generation_batch(method, PROMPTS, task_id=1), 3)
    method.current_task = 1
    other_task = method.generate(_generation_batch(method, PROMPTS), 3)
    assert torch.equal(plain, with_id) and torch.equal(plain, other_task)
    assert not get_cls().supports_oracle_task_id and not get_cls().task_aware
    # begin_task trains the same parameters for every task: nothing per task exists to select
    trained = []
    for t in range(2):
        method.begin_task(t, TASKS[t])
        trained.append([n for n, p in method.named_parameters() if p.requires_grad])
    assert trained[0] == trained[1] == ["prompt_pool", "prompt_keys"]


def test_pull_term_moves_the_selected_keys_toward_the_query():
    """If this fails, the pull term is missing, has the wrong sign or reaches the wrong keys, so keys never come to
    match their inputs and the prompts an input gets at test time are arbitrary."""
    L.seed_everything(0, verbose=False)
    method = _method()
    method.begin_task(0, TASKS[0])
    method.train()
    batch = Collator(method.tokenizer, 64, 16, train=True)(TASKS[0].train[:4])
    out = method(batch)
    q, idx = method._last
    pull = method.regularizer(batch, out)["pull"]
    expected = 0.5 * (1 - F.cosine_similarity(q[:, None], method.prompt_keys[idx], dim=-1)).sum(1).mean()
    torch.testing.assert_close(pull, expected)
    pull.backward()
    grad = method.prompt_keys.grad
    chosen = set(idx.flatten().tolist())
    assert all(grad[i].abs().sum() > 0 for i in chosen)
    assert all(grad[i].abs().sum() == 0 for i in range(6) if i not in chosen)
    before = pull.item()
    with torch.no_grad():
        method.prompt_keys -= 0.1 * grad  # a step down the gradient brings the keys closer
    assert method.regularizer(batch, method(batch))["pull"].item() < before


def test_generation_gives_the_training_forwards_first_token_logits():
    """If this fails, generation does not read the selected prompts as the training forward does (wrong positions
    with left padding, a different selection, or a prompt-less prefill)."""
    from clbench.methods._prompts import generate_with_prefix

    L.seed_everything(0, verbose=False)
    method = _method()
    _fit(method, 0)
    method.eval()
    batch = _generation_batch(method, PROMPTS)
    idx = method.select(method.query(batch))
    out = generate_with_prefix(method.model, method.tokenizer, batch, method._prefix(idx), 2, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(method.generate(batch, 2), out.sequences)
    with torch.no_grad():
        padded = method(batch).logits[:, -1]
        for i, prompt in enumerate(PROMPTS):
            alone = Collator(method.tokenizer, 64, 16, train=True)([{"prompt": prompt, "answer": ""}])
            n = len(_generation_batch(method, [prompt])["input_ids"][0])
            logits = method(alone).logits[0, n - 1]
            torch.testing.assert_close(out.logits[0][i], logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded[i], logits, atol=1e-5, rtol=1e-5)


def test_trace_keys_stay_fixed_and_pass_the_pull_to_the_prompts():
    """If this fails, `--set key_init=trace` does not reproduce TRACE's L2P (keys fixed at the mean of the initial
    prompts, the pull gradient reaching the prompts instead), so a user comparing with TRACE's numbers is misled."""
    L.seed_everything(0, verbose=False)
    method = _method(key_init="trace")
    initial_keys = method.prompt_pool.detach().mean(1).clone()
    _fit(method, 0)
    torch.testing.assert_close(method.keys().detach(), initial_keys, atol=0, rtol=0)
    assert not torch.allclose(method.prompt_pool.detach().mean(1), initial_keys)  # the prompts did train
    method.begin_task(1, TASKS[1])
    method.train()
    batch = Collator(method.tokenizer, 64, 16, train=True)(TASKS[1].train[:4])
    method.regularizer(batch, method(batch))["pull"].backward()
    assert method.prompt_pool.grad.abs().sum() > 0 and method.prompt_keys.grad is None


@pytest.mark.parametrize(("knob", "value"), [("pool_size", 0), ("top_k", 7), ("top_k", 0), ("pull_weight", -1.0),
                                             ("key_init", "random"), ("prompt_length", 0)])
def test_bad_knob_values_are_one_line_errors(knob: str, value):
    """If this fails, a bad `--set` value for L2P crashes later with a traceback, or silently runs."""
    from clbench.config import ConfigError, build
    from clbench.configs_dir import method_defaults

    with pytest.raises(ConfigError, match=knob) as err:
        build(get_cls().config_class, {**method_defaults(NAME), "pool_size": 6, knob: value})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="query_layer"):
        _method(query_layer=4)  # the tiny model has layers 0..3


def test_resume_after_crash_gives_identical_predictions(tmp_path, trace_dir, monkeypatch):
    """If this fails, an L2P run killed mid-order resumes with a different pool or different keys than the
    uninterrupted run, so its R and predictions differ."""
    from clbench.harness import Harness

    knobs = {"lr": 0.05, "pool_size": 4, "top_k": 2, "prompt_length": 2}
    settings = dict(method=NAME, max_steps_per_task=2)
    full = Harness(tiny_run(tmp_path, trace_dir, out=str(tmp_path / "full"), **settings), knobs).run()
    crashed = tiny_run(tmp_path, trace_dir, out=str(tmp_path / "crash"), **settings)
    with crash_in_begin_task(NAME, at=1), pytest.raises(KeyboardInterrupt):
        Harness(crashed, knobs).run()
    resumed = Harness(crashed, knobs).run()
    assert (full / "R.csv").read_text() == (resumed / "R.csv").read_text()
    assert run_predictions(full) == run_predictions(resumed)
    # the random tiny model answers "====" whatever a few prompt steps do, so check the state too: trained (it left
    # its initial values) and bit-identical between the two runs
    a, b = (torch.load(run / "state" / "after-2.pt", weights_only=True) for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["prompt_pool"].mean(1), a["trace_keys"])  # the pool moved away from its init
