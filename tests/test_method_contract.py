"""The CLMethod contract (src/clbench/method.py's module docstring), checked for every registered method on the tiny
random model: begin_task sets trainability from scratch and the optimiser holds exactly the trainable parameters;
the life cycle begin_task / fit / finish_task / predict runs; and a run rebuilt from a checkpoint (construct, replay
begin_task, load_checkpoint_state), as the harness resumes, predicts the same and holds the same tensors as the run
that never stopped, both right away and after training the next task.

A joint-training method (mtl) has one stage (t = T − 1, every task's records), so there is no "next task" after a
resume: that test is marked skipped for it, with the reason. A task-aware method (per-task-lora) is given each
example's task id when predicting, as the harness gives it.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from clbench import registry
from clbench.benchmark import Collator, Task, TaskSpec
from clbench.method import CLMethod, MethodConfig, gather_by_index

registry.load_all()
METHODS = sorted(registry.methods())
# methods that fine-tune base-model weights by design (everything else must leave the base model frozen)
TRAINS_BASE_WEIGHTS = {"seqft"}
SEED = 0
STEPS = 2
MAX_NEW = 3


def _task(name: str, n: int = 8) -> Task:
    records = [{"prompt": f"{name} question {i} of {n}", "answer": f"{name[:2]}{i}"} for i in range(n)]
    return Task(TaskSpec(name, "accuracy", max_new_tokens=MAX_NEW), train=records, eval=records[:2], test=records[:3])


TASKS = [_task("alpha"), _task("bravo")]


def task_seed(t: int) -> int:
    """The harness's seed before task t's begin_task (Harness.task_seed)."""
    return SEED * 1000 + t


def stages(cls: type) -> list[int]:
    """The tasks the harness trains: every task, or the last one only for joint training (Harness._run_unlocked)."""
    return [len(TASKS) - 1] if cls.joint_training else list(range(len(TASKS)))


def build(name: str) -> CLMethod:
    """The method on a fresh tiny model, after the run seed (the harness seeds right before building it)."""
    from clbench.config import build as build_config
    from clbench.configs_dir import method_defaults
    from clbench.models import tiny_model

    cls = registry.get_method(name)
    # a large lr, so two steps visibly move the trained tensors and the comparisons below are not vacuous
    cfg = build_config(cls.config_class, {**method_defaults(name), "lr": 0.05})
    L.seed_everything(SEED, verbose=False)
    loaded = tiny_model()
    return cls(loaded.model, loaded.tokenizer, cfg, num_tasks=len(TASKS))


def begin(method: CLMethod, t: int) -> None:
    L.seed_everything(task_seed(t), verbose=False)
    method.begin_task(t, TASKS[t])


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, precision="32-true", **kwargs)


def fit_and_finish(method: CLMethod, t: int) -> None:
    """Harness._fit: train_examples, a fit of STEPS steps, the optional second pass, then finish_task."""
    collate = Collator(method.tokenizer, 64, 16, train=True)
    loader = DataLoader(method.train_examples(t, TASKS), batch_size=4, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(max_steps=STEPS).fit(method, loader)
        second = method.second_pass_examples(t, TASKS)
        if second:
            _trainer(max_epochs=1, max_steps=STEPS).fit(method, DataLoader(second, batch_size=4, collate_fn=collate))
    method.finish_task(t, TASKS[t], train_loader=loader)


def predict(method: CLMethod) -> list[str]:
    """Greedy predictions on every task's test records through Trainer.predict (the harness's path), with the task id
    only for a task-aware method; one loader over all tasks (the indices are unique), so one predict epoch."""
    records = [{"prompt": r["prompt"], "index": len(TASKS[0].test) * j + i,
                **({"task_id": j} if method.task_aware else {})}
               for j, task in enumerate(TASKS) for i, r in enumerate(task.test)]
    collate = Collator(method.tokenizer, 64, train=False)

    def collate_eval(batch: list[dict[str, Any]]) -> dict[str, Any]:
        return {**collate(batch), "max_new_tokens": MAX_NEW}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer().predict(method, dataloaders=DataLoader(records, batch_size=3, collate_fn=collate_eval),
                           return_predictions=False)
    return method.collected_predictions()


def tensors(method: CLMethod) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (the base model's too: a resumed run must not differ anywhere)."""
    return {n: t.detach().clone() for n, t in (*method.named_parameters(), *method.named_buffers())}


def flags(method: CLMethod) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in method.named_parameters()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ (shape, dtype or any value), plus names only one side has."""
    return sorted({*a.keys() ^ b.keys(), *(n for n in a.keys() & b.keys() if a[n].shape != b[n].shape
                                          or a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n]))})


@functools.cache
def uninterrupted(name: str) -> dict[str, Any]:
    """The run that never stops, as the harness drives it: per stage begin_task / fit / finish_task, checkpoint_state,
    predict. Kept: each stage's checkpoint, the requires_grad flags right after each begin_task, and the end state."""
    method = build(name)
    out: dict[str, Any] = {"checkpoints": {}, "flags": {}, "reports": {}, "initial": tensors(method),
                           "base_params": method.base_param_count}
    for t in stages(type(method)):
        begin(method, t)
        out["flags"][t] = flags(method)
        fit_and_finish(method, t)
        out["checkpoints"][t] = method.checkpoint_state()
        out["reports"][t] = method.param_report()
        out["predictions"] = predict(method)
    out["tensors"] = tensors(method)
    return out


def resumed(name: str, done: list[int]) -> CLMethod:
    """Harness._restore: a rebuilt method, begin_task replayed for the finished stages, the last one's checkpoint."""
    method = build(name)
    for t in done:
        begin(method, t)
    method.load_checkpoint_state(uninterrupted(name)["checkpoints"][done[-1]])
    return method


# ---- the tests ----------------------------------------------------------------------------------------------------
def test_every_built_in_method_is_in_the_matrix():
    """If this fails, a method in src/clbench/methods escapes these contract tests (the registry this module read at
    import was incomplete), so a broken resume of that method would go unnoticed."""
    import clbench.methods

    sources = Path(clbench.methods.__file__).parent.rglob("*.py")
    built_in = {m for path in sources for m in re.findall(r'register_method\("([^"]+)"\)', path.read_text())}
    assert len(built_in) >= 16 and built_in <= set(METHODS), sorted(built_in - set(METHODS))


@pytest.mark.parametrize("name", METHODS)
def test_begin_task_sets_trainability_from_scratch_and_the_optimiser_holds_it(name: str):
    """If this fails, a resumed run (which replays begin_task on a freshly built method) trains other parameters than
    the run that never stopped; or a parameter marked trainable never reaches the optimiser (it never learns, and DDP
    waits for its gradient), or the optimiser moves a frozen one; or the base model is fine-tuned by a method that
    claims to leave it frozen."""
    clean = build(name)
    t0 = stages(type(clean))[0]
    begin(clean, t0)
    dirty = build(name)
    for p in dirty.parameters():  # whatever an earlier task left behind
        p.requires_grad_(True)
    begin(dirty, t0)
    changed = sorted(n for n, flag in flags(dirty).items() if flags(clean)[n] != flag)
    assert not changed, f"begin_task keeps requires_grad from before it ran: {changed[:3]}"

    trainable = {id(p) for p in clean.parameters() if p.requires_grad}
    assert trainable, "begin_task left nothing trainable: fit stops with 'no trainable parameters'"
    assert {id(p) for p in clean.trainable_parameters()} == trainable, "trainable_parameters() != requires_grad"
    conf = clean.configure_optimizers()
    optimiser = conf["optimizer"] if isinstance(conf, dict) else conf
    held = [id(p) for group in optimiser.param_groups for p in group["params"]]
    assert len(held) == len(set(held)), "a parameter is in two optimiser groups (torch refuses it)"
    names = {id(p): n for n, p in clean.named_parameters()}
    assert set(held) == trainable, (
        f"optimiser and requires_grad disagree: not optimised {sorted(names[i] for i in trainable - set(held))[:3]},"
        f" optimised but frozen {sorted(names[i] for i in set(held) - trainable)[:3]}")

    base = [n for n, p in clean.named_parameters() if id(p) in clean._base_ids]
    trained_base = [n for n, p in clean.named_parameters() if id(p) in clean._base_ids and p.requires_grad]
    if name in TRAINS_BASE_WEIGHTS:
        assert trained_base == base, "a full fine-tuning method leaves base weights frozen"
    else:
        assert not trained_base, f"begin_task left base-model weights trainable: {trained_base[:3]}"


@pytest.mark.parametrize("name", METHODS)
def test_a_resumed_run_predicts_and_holds_what_the_uninterrupted_run_does(name: str):
    """If this fails, a run that crashed after its last task and was resumed (rebuilt, begin_task replayed, checkpoint
    loaded) answers differently from the run that never stopped, or holds different tensors (e.g. state kept in a
    plain attribute, a tensor allocated late, a trained base weight missing from the checkpoint)."""
    done = uninterrupted(name)
    method = build(name)
    for t in stages(type(method)):
        begin(method, t)
    untrained = tensors(method)
    method.load_checkpoint_state(done["checkpoints"][stages(type(method))[-1]])
    assert not differing(tensors(method), done["tensors"]), (
        f"tensors differ after resume: {differing(tensors(method), done['tensors'])[:3]}")
    assert predict(method) == done["predictions"], "a resumed run predicts differently from the uninterrupted run"
    # not vacuous: training moved something the checkpoint carries
    assert differing(untrained, done["tensors"]), "training changed no tensor: the comparison above proves nothing"
    assert done["checkpoints"], "no checkpoint was taken"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skip(reason="joint training has a single stage: no task follows a resume"))
    if registry.get_method(n).joint_training else n for n in METHODS])
def test_resuming_and_training_the_next_task_matches_the_uninterrupted_run(name: str):
    """If this fails, a run resumed after its first task trains the second task differently from the run that never
    stopped (other trainable parameters, state an end_task left outside the checkpoint, a memory re-derived wrongly),
    so its row 2 of R, and everything after, depends on whether it crashed."""
    done = uninterrupted(name)
    first, second = stages(registry.get_method(name))[:2]
    method = resumed(name, [first])
    begin(method, second)
    changed = sorted(n for n, flag in flags(method).items() if done["flags"][second][n] != flag)
    assert not changed, f"after a resume begin_task({second}) trains other parameters: {changed[:3]}"
    fit_and_finish(method, second)
    wrong = differing(method.checkpoint_state(), done["checkpoints"][second])
    assert not wrong, f"the checkpoint after the next task differs: {wrong[:3]}"
    assert not differing(tensors(method), done["tensors"]), (
        f"tensors after the next task differ: {differing(tensors(method), done['tensors'])[:3]}")
    assert predict(method) == done["predictions"], "predictions after the next task depend on the resume"


# ---- finish_task and the optimiser hooks, on a toy method ---------------------------------------------------------
class _Toy(CLMethod):
    """One extra parameter; end_task records what it saw."""

    name = "toy-contract"

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__(model, tokenizer, MethodConfig(lr=0.1, weight_decay=0.01, warmup_steps=4), num_tasks=1)
        self.extra = nn.Parameter(torch.zeros(3))
        self.seen: dict[str, Any] = {}
        self.fail = False

    def begin_task(self, t, task):
        super().begin_task(t, task)
        self.freeze_all()
        self.extra.requires_grad_(True)

    def end_task(self, t, task, train_loader=None):
        self.seen = {"device": self.device, "autocast": torch.is_autocast_enabled("cpu"), "loader": train_loader,
                     "grad": self.extra.grad is not None}
        if self.fail:
            raise RuntimeError("end_task failed")


def _toy() -> _Toy:
    from clbench.models import tiny_model

    loaded = tiny_model()
    toy = _Toy(loaded.model, loaded.tokenizer)
    toy.begin_task(0, TASKS[0])
    return toy


@pytest.mark.parametrize("name", METHODS)
def test_param_report_adds_up_after_every_task(name: str):
    """If this fails, metrics.json and param_growth.csv give a total that is not the base model plus what the method
    added (e.g. pre-allocated adapters of later tasks counted in total but not in added), or added shrinks as tasks
    pass, or more is trainable than exists."""
    run = uninterrupted(name)
    added = [report["added"] for _, report in sorted(run["reports"].items())]
    for t, report in run["reports"].items():
        assert report["total"] == run["base_params"] + report["added"], (t, report)
        assert 0 <= report["trainable"] <= report["total"], (t, report)
    assert added == sorted(added), added


def test_finish_task_runs_end_task_in_the_given_context_then_drops_gradients(monkeypatch):
    """If this fails, the harness's one call after a fit does not run end_task under the run's precision context, or
    leaves the last step's gradients on the parameters (memory held through evaluation), or does not move a method
    that asks for it to the training device and back (EWC's Fisher pass would run on the CPU, or the module would be
    left on the GPU)."""
    toy = _toy()
    toy.extra.grad = torch.ones(3)
    loader = object()
    toy.finish_task(0, TASKS[0], train_loader=loader,
                    forward_context=torch.autocast("cpu", dtype=torch.bfloat16))
    assert toy.seen == {"device": torch.device("cpu"), "autocast": True, "loader": loader, "grad": True}
    assert all(p.grad is None for p in toy.parameters())
    toy.finish_task(0, TASKS[0])  # no context: no autocast
    assert toy.seen["autocast"] is False

    moves: list[Any] = []
    original_to = CLMethod.to
    monkeypatch.setattr(_Toy, "end_task_on_training_device", True)
    monkeypatch.setattr(_Toy, "training_device", lambda self: torch.device("cpu", 0))
    monkeypatch.setattr(_Toy, "to", lambda self, *a, **k: moves.append(a[0]) or original_to(self, *a, **k))
    toy.fail = True
    with pytest.raises(RuntimeError, match="end_task failed"):
        toy.finish_task(0, TASKS[0])
    assert moves == [torch.device("cpu", 0), torch.device("cpu")], "not moved to the training device and back"


def test_configure_optimizers_builds_param_groups_with_warm_up():
    """If this fails, the shared optimiser set-up changed: the default AdamW group, the lr / weight-decay defaults, the
    empty-group check or the linear warm-up that every method's training relies on."""
    toy = _toy()
    conf = toy.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and conf["lr_scheduler"]["interval"] == "step"
    assert [(g["lr"], g["weight_decay"], g["params"]) for g in opt.param_groups] == [(0.1 * 0.25, 0.01, [toy.extra])]
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    toy.freeze_all()
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        toy.configure_optimizers()


@pytest.mark.parametrize(("name", "expected"), [
    ("moses", lambda c: [(c.lr, c.weight_decay), (c.router_lr, c.weight_decay), (c.score_lr, 0.0), (c.key_lr, 0.0)]),
    ("seta", lambda c: [(c.lr, c.weight_decay), (c.gate_lr, 0.0)]),
])
def test_per_group_learning_rates_come_from_param_groups(name: str, expected):
    """If this fails, a method's per-part learning rates (MoSEs' experts / routers / scores / keys, SETA's sub-blocks /
    gate) are no longer what its knobs say, so its tuned settings train something else."""
    method = build(name)
    begin(method, 0)
    opt = method.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == expected(method.cfg)


def test_ogd_steps_with_plain_sgd_through_build_optimizer():
    """If this fails, OGD's default optimiser is no longer the paper's plain SGD at ``lr`` (its update would leave the
    subspace orthogonal to earlier tasks), or ``optimizer: adamw`` no longer gives the shared AdamW."""
    method = build("ogd")
    begin(method, 0)
    opt = method.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == method.cfg.lr
    assert opt.param_groups[0]["momentum"] == 0 and opt.param_groups[0]["weight_decay"] == 0
    method.cfg.optimizer = "adamw"
    assert isinstance(method.configure_optimizers(), torch.optim.AdamW)


def test_gather_by_index_merges_and_sorts_outside_distributed():
    """If this fails, predictions (or MoSEs' key choices, SETA's gate records) come back out of example order in a
    single-process run, so they are scored against the wrong answers."""
    assert gather_by_index([(2, "c"), (0, "a"), (1, "b")]) == [(0, "a"), (1, "b"), (2, "c")]
