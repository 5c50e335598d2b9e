"""MoSEs on the tiny random model: zero forgetting under the oracle id, frozen earlier experts, expert reuse with
sublinear growth, sparse per-example inference, key matching, and full harness runs with resume."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_run
from torch.utils.data import DataLoader

from clbench.benchmark import Collator, Task, TaskSpec
from clbench.methods.moses import LayerRoute

STEPS = 6


def _task(name: str, make_prompt, n: int = 16, seed: int = 0) -> Task:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt, answer = make_prompt(rng)
        records.append({"prompt": prompt, "answer": answer})
    return Task(TaskSpec(name, "accuracy", max_new_tokens=4), train=records, eval=records[:4], test=records[:8])


def _letters(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefghij") for _ in range(8))
    return f"spell the word {word} please", word[0]


def _digits(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b} = {a} + {b} = {a}+{b}", str(a + b)


def _shout(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("KLMNOPQRST") for _ in range(6))
    return f"!!! {word} !!! {word} !!!", word.lower()[:2]


TASKS = [_task("letters", _letters), _task("digits", _digits, seed=1), _task("shout", _shout, seed=2)]


def _moses(num_tasks: int = 3, **knobs):
    from clbench.configs_dir import method_defaults
    from clbench.models import tiny_model
    from clbench.registry import get_method

    cls = get_method("moses")
    loaded = tiny_model()
    torch.manual_seed(0)
    cfg = cls.config_class(**{**method_defaults("moses"), **knobs})
    return cls(loaded.model, loaded.tokenizer, cfg, num_tasks=num_tasks)


def _train_batches(method, task: Task, batch_size: int = 4) -> DataLoader:
    return DataLoader(task.train, batch_size=batch_size, collate_fn=Collator(method.tokenizer, 64, 16, train=True))


def _eval_batch(method, task: Task, with_id: int | None = None) -> dict[str, torch.Tensor]:
    records = [{"prompt": r["prompt"], "index": i, **({"task_id": with_id} if with_id is not None else {})}
               for i, r in enumerate(task.test)]
    return Collator(method.tokenizer, 64, train=False)(records)


def _fit(method, t: int, task: Task, steps: int = STEPS, begin: bool = True) -> None:
    """begin_task / Lightning fit / finish_task (end_task + dropping gradients), as the harness does."""
    if begin:
        method.begin_task(t, task)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, precision="32-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(method, _train_batches(method, task))
    method.finish_task(t, task)


@torch.no_grad()
def _logits(method, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    method.eval()
    return method(batch).logits


@torch.no_grad()
def _route(method, batch: dict[str, torch.Tensor]):
    """Eval-mode logits of ``batch`` and the call's routing decision (tables and expert choices per layer)."""
    method.eval()

    def run(ids, mask, labels):
        return method.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    logits, routed, length = method._routed(batch, method._oracle_ids(batch), None, run)
    return logits[:, length:], routed


@pytest.fixture(scope="module", params=[0, 3], ids=["no-prompt", "prompt3"])
def trained(request):
    """Three tasks trained in sequence (without and with L2P-style task prompts of 3 vectors); the oracle-id logits
    of each task right after it was learned."""
    L.seed_everything(0, verbose=False)
    method = _moses(prompt_length=request.param)
    right_after, pools, reports = {}, [], []
    base = _logits(method, _eval_batch(method, TASKS[0], with_id=0))  # nothing trained: the base model
    for t, task in enumerate(TASKS):
        _fit(method, t, task)
        right_after[t] = _logits(method, _eval_batch(method, task, with_id=t))
        pools.append({n: layer.A.clone() for n, layer in method._mose_layers.items()})
        reports.append(method.param_report())
    return {"method": method, "right_after": right_after, "base": base, "reports": reports}


def test_old_task_outputs_never_change_under_oracle_task_id(trained):
    """If this fails, training a later task changes what the model answers on an earlier task even when it is told
    which task it is: MoSEs' core promise (zero forgetting of finished tasks) is broken."""
    method = trained["method"]
    for t, task in enumerate(TASKS):
        assert torch.equal(_logits(method, _eval_batch(method, task, with_id=t)), trained["right_after"][t]), task.name
    # not vacuous: training moved the task's outputs away from the base model's
    assert not torch.allclose(trained["right_after"][0], trained["base"])


def test_earlier_experts_get_no_gradient_and_stay_fixed():
    """If this fails, a later task can overwrite experts, routers or keys of finished tasks (forgetting through
    shared sub-experts), or the current task's own parts do not learn."""
    L.seed_everything(0, verbose=False)
    method = _moses(num_tasks=2)
    _fit(method, 0, TASKS[0])
    layers = list(method._mose_layers.values())
    owned = [layer.masks[0].clone() for layer in layers]
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.begin_task(1, TASKS[1])
    method.train()
    batch = next(iter(_train_batches(method, TASKS[1])))
    out = method(batch)
    (out.loss + sum(method.regularizer(batch, out).values())).backward()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    expected = {n for n in before if n.endswith(("A_new", "B_new", "router_weight.1", "scores.1"))}
    expected |= {"keys.1", "prompts.1"}
    assert trainable == expected
    for name, p in method.named_parameters():
        if name in expected:  # (A_new's gradient is 0 at the first step only because B_new starts at 0, as in LoRA)
            assert p.grad is not None and (p.grad.abs().sum() > 0 or name.endswith("A_new")), name
        else:  # pool experts, task 0's router / scores / key, the base model: not even a zero gradient
            assert p.grad is None, name
    for layer in layers:  # task 0's experts are candidates of task 1 (in the forward graph), yet got no gradient
        assert bool(torch.isin(layer.masks[0], layer.candidates()[0]).all())
    method.zero_grad()
    _fit(method, 1, TASKS[1])
    params = dict(method.named_parameters())
    for (name, layer), rows in zip(method._mose_layers.items(), owned, strict=True):
        assert torch.equal(layer.A[rows], before[f"model.{name}.A"][rows])
        assert torch.equal(layer.B[rows], before[f"model.{name}.B"][rows])
        assert torch.equal(params[f"model.{name}.router_weight.0"], before[f"model.{name}.router_weight.0"])
    assert torch.equal(method.keys[0], before["keys.0"])


def test_later_tasks_reuse_experts_and_parameters_grow_sublinearly(trained):
    """If this fails, the budget b < k is not enforced (each task takes k new experts, linear growth like one LoRA per
    task) or param_report counts the unused pre-allocated pool."""
    method = trained["method"]
    cfg = method.cfg
    for layer in method._mose_layers.values():
        assert (layer.owner[layer.masks[0]] == 0).all()  # task 0 owns all of its k experts
        for t in (1, 2):
            mask = layer.masks[t]
            new = int((layer.owner[mask] == t).sum())
            assert new <= cfg.budget < cfg.top_k and (layer.owner[mask] < t).sum() >= cfg.top_k - cfg.budget
        assert int((layer.owner >= 0).sum()) <= cfg.top_k + 2 * cfg.budget < layer.num_experts
    added = [r["added"] for r in trained["reports"]]
    assert added[0] > 0 and added[0] < added[1] < added[2] < 3 * added[0]
    assert trained["reports"][-1]["frozen"] == added[-1]
    # task 0 selects all its candidates, so what it trained is exactly what it added (k scores <-> k mask indices);
    # the pre-allocated router rows outside the candidates never count
    assert trained["reports"][0]["trainable"] == added[0]
    assert trained["reports"][0]["trainable"] < sum(p.numel() for p in method.parameters() if p.requires_grad)
    expert = next(iter(method._mose_layers.values())).expert_params(0)
    pool = sum(layer.num_experts * layer.expert_params(0) for layer in method._mose_layers.values())
    assert added[0] < pool and added[0] >= 4 * expert


def test_inference_touches_only_the_selected_experts(trained):
    """If this fails, inference computes (or depends on) sub-experts outside the example's mask: the cost would grow
    with the pool size N instead of staying at k experts, and unselected experts could leak into the output."""
    method = trained["method"]
    batch = _eval_batch(method, TASKS[1], with_id=1)
    reference, routed = _route(method, batch)
    layer = next(iter(method._mose_layers.values()))
    # the fused table of one example holds k_x·r_s down-projection rows and k_x router rows, whatever N and k are
    down = routed.route.tables[id(layer)][0]
    assert down.shape[-1] == method.cfg.experts_per_input * method.cfg.rank + method.cfg.experts_per_input
    # and it agrees with the generic ExpertLinear.delta over the k_x pool rows each example chose
    x = torch.randn(batch["input_ids"].shape[0], 5, layer.in_features)
    route = LayerRoute(token_mask=torch.ones(x.shape[:2], dtype=torch.bool), task_ids=torch.full((x.shape[0],), 1))
    fused = layer.infer_delta(x, route)
    indices = route.choices[id(layer)]
    assert indices.shape == (x.shape[0], method.cfg.experts_per_input)
    weights = (torch.einsum("btd,bkd->btk", x, layer.router_weight[1][indices]) / layer.temperature).softmax(-1)
    torch.testing.assert_close(fused, layer.delta(x, indices, weights))
    chosen = {id(lay): torch.zeros(lay.num_experts, dtype=torch.bool) for lay in method._mose_layers.values()}
    for lay in method._mose_layers.values():
        chosen[id(lay)][routed.route.choices[id(lay)].flatten()] = True
    saved = {n: (lay.A.clone(), lay.B.clone(), lay.router_weight[1].detach().clone())
             for n, lay in method._mose_layers.items()}
    try:
        with torch.no_grad():  # poison everything task 1 does not select
            for lay in method._mose_layers.values():
                unused = torch.ones(lay.num_experts, dtype=torch.bool)
                unused[lay.masks[1]] = False
                lay.router_weight[1][unused] = float("nan")  # the router scores only the task's mask
                lay.A[~chosen[id(lay)]] = float("nan")  # and only the experts an example chose are computed
                lay.B[~chosen[id(lay)]] = float("nan")
        assert torch.equal(_logits(method, batch), reference)
    finally:
        with torch.no_grad():
            for n, lay in method._mose_layers.items():
                lay.A.copy_(saved[n][0])
                lay.B.copy_(saved[n][1])
                lay.router_weight[1].copy_(saved[n][2])


def test_bf16_autocast_inference_matches_fp32(trained):
    """If this fails, runs under bf16-mixed (the fast mode on bf16 CPUs and GPUs) route or compute the experts
    differently from fp32, e.g. the per-example tables are not cast once per generate call and mix dtypes."""
    method = trained["method"]
    batch = _eval_batch(method, TASKS[2], with_id=2)
    reference = _logits(method, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, routed = _route(method, batch)
        assert routed.route.tables[id(next(iter(method._mose_layers.values())))][0].dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_mixed_batch_routes_each_example_like_one_by_one(trained):
    """If this fails, examples of different tasks in one batch contaminate each other's routing (the batch's first
    example decides for all, or the generation cache loses the per-example decision)."""
    method = trained["method"]
    collate = Collator(method.tokenizer, 64, train=False)
    prompts = [p.ljust(30) for p in ("spell the word abcdefgh please", "55 + 21 = 55 + 21 = 55+21", "!!! KLMN !!!")]
    assert len({len(p) for p in prompts}) == 1  # same length: no padding, so batching alone changes nothing
    ids = [0, 1, 2]
    records = [{"prompt": p, "index": i, "task_id": t} for i, (p, t) in enumerate(zip(prompts, ids, strict=True))]
    method.eval()
    for oracle in (True, False):
        recs = records if oracle else [{k: v for k, v in r.items() if k != "task_id"} for r in records]
        batch = collate(recs)
        together, routed = method.generate_routed(batch, 6)
        chosen = routed.key_choice
        logits = _logits(method, batch)
        for i, rec in enumerate(recs):
            single = collate([rec])
            alone, routed_alone = method.generate_routed(single, 6)
            n = alone.shape[1]  # a row that hit EOS alone stops there; in the batch it is padded after EOS
            assert torch.equal(alone[0], together[i, :n])
            assert (together[i, n:] == method.tokenizer.pad_token_id).all()
            assert int(routed_alone.key_choice[0]) == int(chosen[i])
            torch.testing.assert_close(_logits(method, single)[0], logits[i], rtol=1e-5, atol=1e-5)
    # under the oracle, the three rows really went through three different masks
    rows = [method._mose_layers[next(iter(method._mose_layers))].masks[t] for t in ids]
    assert len({tuple(r.tolist()) for r in rows}) == 3


def test_pull_constraint_decreases_and_keys_pick_the_trained_task():
    """If this fails, task identification without the oracle id is broken: keys do not move towards their task's
    queries, or the nearest key does not pick the task an example came from."""
    L.seed_everything(0, verbose=False)
    method = _moses(num_tasks=2, key_init="random", key_lr=0.05)
    tasks = [TASKS[0], TASKS[1]]

    def mean_pull(t: int) -> float:
        method.train()
        pulls = []
        with torch.no_grad():
            for batch in _train_batches(method, tasks[t]):
                out = method(batch)
                pulls.append(float(method.regularizer(batch, out)["pull"]))
        return float(np.mean(pulls))

    for t, task in enumerate(tasks):
        method.begin_task(t, task)
        start = mean_pull(t)
        _fit(method, t, task, steps=20, begin=False)
        assert mean_pull(t) < 0.5 * start, task.name
    method.eval()
    for t, task in enumerate(tasks):  # the training prompts, as test-time (left-padded) batches
        records = [{"prompt": r["prompt"], "index": i} for i, r in enumerate(task.train)]
        with torch.no_grad():
            out = method(Collator(method.tokenizer, 64, train=False)(records))
        assert (out["key_choice"] == t).all(), task.name


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_default_key_init_identifies_tasks(prompt_length):
    """If this fails, the default key set-up (first-batch init + pull) cannot tell two clearly different tasks
    apart, so every task-agnostic MoSEs run routes examples to the wrong mask (and, with task prompts, prepends the
    wrong task's prompt)."""
    L.seed_everything(0, verbose=False)
    method = _moses(num_tasks=3, prompt_length=prompt_length)
    for t, task in enumerate(TASKS):
        _fit(method, t, task, steps=4)
    method.eval()
    for t, task in enumerate(TASKS):
        _, routed = method.generate_routed(_eval_batch(method, task), 1)
        assert (routed.key_choice == t).all(), task.name
        assert method.evaluation_report(t, task) == {}  # no predict epoch ran: nothing recorded


def test_task_prompts_train_only_the_current_task_and_stay_frozen_after():
    """If this fails, `--set prompt_length=L` trains no prompt, or a later task moves an earlier task's prompt (which
    would break zero forgetting under the oracle id)."""
    L.seed_everything(0, verbose=False)
    method = _moses(num_tasks=2, prompt_length=3)
    initial = [p.detach().clone() for p in method.prompts]
    _fit(method, 0, TASKS[0])
    after_first = method.prompts[0].detach().clone()
    assert not torch.equal(after_first, initial[0])  # task 0's prompt learned
    assert torch.equal(method.prompts[1], initial[1])  # task 1's not touched yet
    _fit(method, 1, TASKS[1])
    assert torch.equal(method.prompts[0], after_first)  # frozen once its task finished
    assert not torch.equal(method.prompts[1], initial[1])
    assert method.param_report()["frozen"] == sum(method._task_params(t)["added"] for t in (0, 1))
    assert method._task_params(1)["added"] > method.prompts[1].numel()  # the prompt counts as added


def test_harness_runs_with_and_without_oracle_and_writes_artifacts(tmp_path, trace_dir):
    """If this fails, `clbench run --method moses` (with or without --oracle-task-id) crashes or leaves out the
    task-identification matrix, the expert-usage map or the growth table."""
    from clbench.harness import Harness

    for oracle in (False, True):
        cfg = tiny_run(tmp_path, trace_dir, method="moses", oracle_task_id=oracle, out=str(tmp_path / f"o{oracle}"))
        run_dir = Harness(cfg).run()
        assert (run_dir / "DONE").is_file()
        acc = pd.read_csv(run_dir / "task_id_accuracy.csv", index_col=0)
        assert acc.loc["after-2:FOMC"].notna().all() and acc.loc["zero-shot"].isna().all()
        assert np.isnan(acc.loc["after-1:C-STANCE", "FOMC"])  # not trained yet: no key can choose it
        assert acc.loc["after-1:C-STANCE", "C-STANCE"] == 1.0  # a single trained task: every key choice is it
        usage = pd.read_csv(run_dir / "expert_usage.csv")
        assert {"task", "layer", "expert", "new_or_reused"} <= set(usage.columns)
        assert set(usage["new_or_reused"]) == {"new", "reused"}
        assert (run_dir / "expert_usage.png").read_bytes()[:4] == b"\x89PNG"  # the usage figure, drawn
        growth = pd.read_csv(run_dir / "param_growth.csv")
        assert list(growth["task"]) == ["C-STANCE", "FOMC"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["task_aware"] is oracle
        assert metrics["params"][-1]["added"] == growth["cumulative_added_params"].iloc[-1]


def test_resume_after_crash_gives_the_same_R(tmp_path, trace_dir, monkeypatch):
    """If this fails, a MoSEs run killed mid-way resumes with different masks, experts or keys than it had, so the
    resumed R differs from an uninterrupted run's."""
    from clbench.harness import Harness
    from clbench.registry import get_method

    full = Harness(tiny_run(tmp_path, trace_dir, method="moses", out=str(tmp_path / "full"))).run()
    crashed = tiny_run(tmp_path, trace_dir, method="moses", out=str(tmp_path / "crash"))
    moses = get_method("moses")
    original_begin = moses.begin_task

    def crash_on_second_task(self, t, task):  # the crash hits the method's public hook, as a Ctrl-C would
        if t == 1:
            raise KeyboardInterrupt
        return original_begin(self, t, task)

    monkeypatch.setattr(moses, "begin_task", crash_on_second_task)
    with pytest.raises(KeyboardInterrupt):
        Harness(crashed).run()
    monkeypatch.setattr(moses, "begin_task", original_begin)
    resumed = Harness(crashed).run()
    for name in ("R.csv", "task_id_accuracy.csv", "expert_usage.csv", "param_growth.csv"):
        assert (full / name).read_text() == (resumed / name).read_text(), name
    for task in ("C-STANCE", "FOMC"):
        a = json.loads((full / "predictions" / "after-2" / f"{task}.json").read_text())
        b = json.loads((resumed / "predictions" / "after-2" / f"{task}.json").read_text())
        assert a == b


def test_every_knob_is_settable_and_typos_are_named():
    """If this fails, a `--set key=value` for a MoSEs knob is ignored or a typo passes silently."""
    from clbench.config import ConfigError, build, parse_overrides
    from clbench.configs_dir import method_defaults
    from clbench.registry import get_method

    cls = get_method("moses")
    defaults = method_defaults("moses")
    assert set(defaults) == {f.name for f in dataclasses.fields(cls.config_class)}
    cfg = build(cls.config_class, {**defaults, **parse_overrides(["top_k=6", "budget=3", "layers=[1,2]",
                                                                  "target_modules=[q_proj]", "pull_weight=0.1"])})
    assert (cfg.top_k, cfg.budget, cfg.layers, cfg.target_modules, cfg.pull_weight) == (6, 3, [1, 2], ["q_proj"], 0.1)
    with pytest.raises(ConfigError, match="top_k"):
        build(cls.config_class, {"topk": 3})
    with pytest.raises(ConfigError, match="budget"):
        cls.default_config({"budget": 5, "top_k": 4})
    with pytest.raises(ConfigError, match="key_layer"):
        _moses(layers=[2, 3], key_layer=2)
    # MoSE layers from layer 0: the query comes from the token embeddings (key_layer -1)
    method = _moses(layers=[0, 1])
    assert method.key_layer == -1
    method.begin_task(0, TASKS[0])
    method.train()
    batch = next(iter(_train_batches(method, TASKS[0])))
    out = method(batch)
    assert torch.isfinite(out.loss) and out["query"].shape == (4, 64)


def _one_task_layer(experts_per_input: int = 2):
    """A MoSE layer (d = 8) with task 0 reserved: its 4 fresh slots are its candidates and all of its mask."""
    from clbench.methods.moses import MoSELinear

    torch.manual_seed(0)
    layer = MoSELinear(torch.nn.Linear(8, 8), num_experts=6, rank=2, alpha=4.0, top_k=4,
                       experts_per_input=experts_per_input, num_tasks=1, temperature=1.0)
    layer.reserve(0, budget=4)
    v = torch.zeros(8)
    v[0] = 1.0
    with torch.no_grad():  # experts 0, 1 score +x[0], experts 2, 3 score -x[0]; B non-zero so every path matters
        layer.router_weight[0][:4] = torch.stack([v, 0.9 * v, -v, -0.9 * v])
        layer.B_new.normal_()
    x = torch.zeros(2, 3, 8)
    x[0, :, 0], x[1, :, 0] = 2.0, -2.0  # input 0 points along +v, input 1 along -v (same task)
    x[:, :, 1:] = torch.randn(2, 3, 7)
    return layer, x


def test_per_input_router_picks_different_experts_for_different_inputs():
    """If this fails, MoSEs routes per task, not per input: two inputs of the same task whose router scores differ
    still activate the same experts (the paper: "the sparse router calculates a score for each expert and activates
    only the most relevant ones"), or inference computes experts outside each input's top-k_x."""
    layer, x = _one_task_layer()
    with torch.no_grad():
        layer.fix_mask(0)
    route = LayerRoute(token_mask=torch.ones(2, 3, dtype=torch.bool), task_ids=torch.tensor([0, 0]))
    layer.infer_delta(x, route)
    rows = layer.masks[0]
    choices = route.choices[id(layer)]
    assert set(choices[0].tolist()) == {int(rows[0]), int(rows[1])}
    assert set(choices[1].tolist()) == {int(rows[2]), int(rows[3])}
    assert route.tables[id(layer)][0].shape == (2, 8, 2 * 2 + 2)  # k_x·r_s + k_x columns: the FLOP path
    # the per-task ablation (experts_per_input = top_k): both inputs use the whole mask, as the first version did
    layer_all, x = _one_task_layer(experts_per_input=4)
    with torch.no_grad():
        layer_all.fix_mask(0)
    route = LayerRoute(token_mask=torch.ones(2, 3, dtype=torch.bool), task_ids=torch.tensor([0, 0]))
    layer_all.infer_delta(x, route)
    assert all(set(c.tolist()) == set(layer_all.masks[0].tolist()) for c in route.choices[id(layer_all)])


def test_only_the_inputs_top_k_experts_get_gradient():
    """If this fails, training is dense within the mask: an input's loss moves experts (or gates) it did not
    activate, so per-input sparsity holds at test time only and experts do not specialise by input."""
    layer, x = _one_task_layer()
    for b, own in ((0, {0, 1}), (1, {2, 3})):
        layer.zero_grad()
        route = LayerRoute(token_mask=torch.ones(1, 3, dtype=torch.bool), task_ids=torch.tensor([0]), train_task=0)
        layer.train_delta(x[b:b + 1], route).sum().backward()
        for j in range(4):
            got = bool(layer.A_new.grad[j].abs().sum() > 0) and bool(layer.B_new.grad[j].abs().sum() > 0)
            assert got == (j in own), (b, j)
            assert bool(layer.router_weight[0].grad[j].abs().sum() > 0) == (j in own), (b, j)


def test_task_prompt_changes_the_output_but_not_the_query():
    """If this fails, the query that picks the task depends on the task's own prompt (so it cannot be read in the
    same forward, and keys trained with one prompt miss at test), or the prompt has no effect on the model."""
    L.seed_everything(0, verbose=False)
    method = _moses(num_tasks=1, prompt_length=3)
    method.begin_task(0, TASKS[0])
    method.eval()
    batch = _eval_batch(method, TASKS[0], with_id=0)
    with torch.no_grad():
        before = method(batch)
        method.prompts[0].normal_()
        after = method(batch)
    torch.testing.assert_close(after["query"], before["query"], rtol=0, atol=0)
    assert not torch.allclose(after.logits, before.logits)
    assert after.logits.shape[1] == batch["input_ids"].shape[1]  # the prompt slots are cut off


def test_folder_modules_import_one_way():
    """If this fails, the MoSEs folder has grown an import cycle or a hidden dependency: the layer must not know
    who routes it (layer ← routing ← method), and the report reads layers without importing the method."""
    import ast
    from pathlib import Path

    import clbench.methods.moses as pkg

    folder = Path(pkg.__file__).parent
    order = ["config", "layer", "routing", "report", "method"]
    allowed = {"config": set(), "layer": set(), "routing": {"layer"}, "report": set(),
               "method": {"config", "layer", "routing", "report"}}
    assert {p.stem for p in folder.glob("*.py")} == {*order, "__init__"}
    for name in order:
        tree = ast.parse((folder / f"{name}.py").read_text())
        local = {node.module for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert local <= allowed[name], (name, local)
    from clbench.registry import get_method

    assert get_method("moses") is pkg.MoSEs  # the package registers through the registry's scan
