"""The CLMethod contract: a LightningModule with per-task hooks that every continual-learning method subclasses.

Life cycle the harness drives, for each task ``t`` of the order (0-based)::

    begin_task(t, task)          grow / freeze parameters; must set requires_grad from scratch (resume replays it)
    train_examples(t, tasks)     the records to fit on (replay mixes its buffer in, mtl returns every task)
    Trainer.fit(...)             configure_optimizers: build_optimizer(param_groups()) (AdamW) + optional warm-up;
                                 training_step = LM loss on answer tokens + Σ regularizer(batch, out) terms
    second_pass_examples(t, …)   optional records for one more epoch, fitted after the first (TRACE's replay pass)
    finish_task(t, task, …)      runs end_task (state kept in parameters/buffers: Fisher, anchors, keys) on the device
                                 and under the precision documented there, then drops every gradient; not re-run on
                                 resume
    predict_step(batch)          greedy generation with NO task id, unless the method is task-aware or the run
                                 asks for the oracle task id (``batch["task_id"]`` is present then)

A joint-training method (``joint_training``: mtl, the multi-task upper bound) goes through this once, for
t = T − 1, and its ``train_examples`` returns every task's records.

Resume: the harness rebuilds the method (after the same seed), replays ``begin_task`` for finished tasks (each after
the same per-task seed as in the first run) and loads :meth:`checkpoint_state`. So all state that must survive a
crash lives in parameters or buffers, never in plain Python attributes (this is also what makes DDP spawn/fork work,
where only the state dict returns to the parent). ``tests/test_method_contract.py`` runs this life cycle, a resume
and a continued task for every registered method.

Rules for a method author (each one a thing an earlier method had to find out by reading another):

1. ``begin_task`` calls ``super().begin_task(t, task)`` first (it records ``current_task``), then sets
   ``requires_grad`` of EVERY parameter from scratch: :meth:`CLMethod.freeze_all`, then unfreeze what task t trains.
   On resume it runs on a freshly built method, without the earlier tasks' fits and end_tasks, and must leave the
   same parameters trainable as the uninterrupted run.
2. Allocate every tensor any task will use up front, in ``__init__`` (or grow it in ``begin_task`` to a size that
   depends on t only, as OGD's basis): :meth:`load_checkpoint_state` refuses names the rebuilt method does not have.
   Random initial values are drawn from the seeded global RNG, in the same order in a fresh and a resumed run.
3. ``end_task`` runs where Lightning left the module after fit: on the CPU (the strategy's teardown moves it back), in
   fp32 and outside autocast, unless the run sets ``frozen_dtype`` (frozen base linears stored in bf16/fp16): then
   under the run's autocast. A method whose end_task runs the model (Fisher, importance, directions) sets
   ``end_task_on_training_device = True``, and :meth:`finish_task` moves it to the training accelerator for the call
   (:meth:`finish_task` has the exact terms). end_task need not zero gradients: finish_task does.
4. An ``on_train_start`` override calls ``super().on_train_start()``: it records which base weights were trained (so
   they go into the checkpoint) and refuses non-fp32 trainable weights.
5. Per-group learning rates or weight decay: override :meth:`param_groups`; another optimiser: :meth:`build_optimizer`.
   :meth:`configure_optimizers` (empty-group check, warm-up) stays the base class's.
6. A method with pre-allocated pools (future tasks' adapters, prompts, sub-experts) overrides :meth:`param_report`, so
   ``added`` counts what tasks have used, not the allocation.
7. Per-example records of a predict epoch that rank 0 needs in example order (besides the predictions, which the base
   class gathers) go through :func:`gather_by_index`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from clbench.benchmark import Task


def gather_by_index(records: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """``(example index, value)`` records of every rank, merged by index and sorted (an object all-gather when
    torch.distributed is initialised, else just these): how per-example results of a predict epoch reach rank 0 in
    example order. Every rank must call it (a collective)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        merged = {i: value for part in gathered for i, value in part}
    else:
        merged = dict(records)
    return sorted(merged.items())


@dataclass(kw_only=True)
class MethodConfig:
    """Knobs every method has; subclasses add theirs (``config_class``).

    Fields carry types, not defaults: a built-in method's defaults live in one place, its
    ``configs/methods/<name>.yaml`` (commented, cited, and what ``clbench tune`` studies start from), which
    :meth:`CLMethod.default_config` reads under every run, bench and tune. A third-party method that ships no YAML
    inherits the YAML of the registered method it subclasses, or gives its defaults in its own dataclass, which is
    then its one source. kw_only, so a subclass may add fields without defaults.
    """

    lr: float
    weight_decay: float
    warmup_steps: int

    # knobs added after run folders were published (see clbench.config.config_identity)
    identity_if_set: ClassVar[tuple[str, ...]] = ()


class CLMethod(L.LightningModule):
    """Base class of every continual-learning method (see the module docstring for the life cycle).

    Class attributes: ``name`` (set by ``@register_method``), ``config_class`` (a dataclass; unknown keys are an
    error), ``task_aware`` (True only for oracle references that are told the task id at test time),
    ``joint_training`` (True for the multi-task upper bound, trained once on all tasks),
    ``supports_oracle_task_id`` (accepts ``batch["task_id"]`` under ``--oracle-task-id``),
    ``ddp_find_unused_parameters`` (some trainable parameters may get no gradient in a step, e.g. routed experts),
    ``end_task_on_training_device`` (:meth:`finish_task` moves the method to the training accelerator for end_task).
    """

    name: ClassVar[str] = "base"
    config_class: ClassVar[type] = MethodConfig
    task_aware: ClassVar[bool] = False
    joint_training: ClassVar[bool] = False
    supports_oracle_task_id: ClassVar[bool] = False
    ddp_find_unused_parameters: ClassVar[bool] = False
    end_task_on_training_device: ClassVar[bool] = False

    @classmethod
    def default_config(cls, overrides: dict[str, Any] | None = None, where: str | None = None) -> Any:
        """``config_class`` built from the method's ``configs/methods/<name>.yaml`` (its one default source) with
        ``overrides`` on top; an unknown key is a ConfigError naming the nearest knob (``where`` says whose).

        A method that subclasses a registered one (a plugin built on ``LoRA``, say) starts from its ancestors' YAMLs,
        for the knobs its config shares with theirs, so it needs no YAML of its own unless it adds knobs.
        """
        import dataclasses

        from clbench.config import build
        from clbench.configs_dir import method_defaults

        knobs = {f.name for f in dataclasses.fields(cls.config_class)}
        values: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):  # the farthest ancestor first, the method's own YAML last
            name = klass.__dict__.get("name")  # set by registration on that class itself
            if isinstance(name, str):
                values.update({k: v for k, v in method_defaults(name).items() if k in knobs})
        return build(cls.config_class, {**values, **(overrides or {})}, where=where or f"method '{cls.name}' config")

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: MethodConfig, num_tasks: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.num_tasks = num_tasks
        self.current_task = -1
        self.base_param_count = sum(p.numel() for p in model.parameters())
        # Base tensors are tracked by identity: adapters (peft) rename their keys but keep the same tensors.
        self._base_ids = {id(t) for t in (*model.parameters(), *model.buffers())}
        self._trained_names: set[str] = set()
        self._predictions: list[tuple[int, str]] = []
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ---- task hooks -------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Prepare for task ``t``: grow and set trainability (from scratch: rule 1 of the module docstring).

        Default: nothing besides recording the task index; subclasses call it first.
        """
        self.current_task = t

    def freeze_all(self) -> None:
        """``requires_grad = False`` on every parameter (base model and the method's own tensors): the first step of
        a ``begin_task`` that sets trainability from scratch, before it unfreezes what the task trains."""
        for p in self.parameters():
            p.requires_grad_(False)

    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Records to fit on for task ``t`` given every task of the order; default: task t's training split."""
        return tasks[t].train

    def second_pass_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """Records for one more epoch after task ``t``'s main fit (e.g. TRACE's replay pass); default: none."""
        return []

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """After fitting task ``t``: compute state kept in buffers (Fisher, anchors, keys). Default: nothing.

        Called through :meth:`finish_task`, which says on which device and under which precision it runs.
        ``train_loader`` is task t's training loader of the main fit (not the second pass's), or None.
        """

    def finish_task(self, t: int, task: Task, train_loader: Any = None,
                    forward_context: contextlib.AbstractContextManager | None = None) -> None:
        """The one call after task ``t`` was fitted (and its second pass, if any): :meth:`end_task`, then the
        bookkeeping every method needs at task end. Not re-run on resume (its results are in the checkpoint).

        1. With ``end_task_on_training_device`` the method moves to :meth:`training_device` for the call, and back to
           where it was afterwards (also when end_task raises). Otherwise it stays where it is.
        2. ``end_task(t, task, train_loader=train_loader)`` runs inside ``forward_context`` (None: no context).
        3. Every gradient is dropped (``zero_grad(set_to_none=True)``): Lightning leaves the last step's gradients on
           the parameters, also on those end_task just froze; they would hold memory through evaluation.

        What end_task sees when the harness calls this right after ``Trainer.fit`` (passing its trainer's
        ``precision_plugin.forward_context()`` as ``forward_context`` only when the run sets ``frozen_dtype``):

        - device: the CPU (Lightning's strategy teardown moved the module back after fit), or the training device
          (``cuda:<local rank>`` under DDP) with ``end_task_on_training_device``;
        - precision: trainable tensors in fp32 always; without ``frozen_dtype`` the frozen base weights are fp32
          too and no autocast is active (the run's ``precision`` applies to fit and evaluation only); with
          ``frozen_dtype`` the frozen base linears are stored in that dtype and the run's autocast is active. That
          autocast is for the training device's type, so it only takes effect with ``end_task_on_training_device``
          (or on a CPU run): a method left on the CPU of a GPU run that runs the base model in end_task meets
          bf16/fp16 weights without autocast (a dtype error), which is why such methods set the flag;
        - under DDP (Lightning's launcher runs the whole harness in every process) every rank calls it, with the
          process group still up: collectives such as an all-reduce work, and every rank must make the same ones.
        """
        home = self.device
        if self.end_task_on_training_device:
            self.to(self.training_device())
        try:
            with forward_context if forward_context is not None else contextlib.nullcontext():
                self.end_task(t, task, train_loader=train_loader)
        finally:
            if self.end_task_on_training_device:
                self.to(home)
        self.zero_grad(set_to_none=True)

    def training_device(self) -> torch.device:
        """Where training ran: the attached trainer's root device (Lightning moves the module back to the CPU when
        fit ends, so ``self.device`` says CPU then), or the method's own device when no trainer is attached."""
        trainer = getattr(self, "_trainer", None)
        return trainer.strategy.root_device if trainer is not None else self.device

    # ---- training ---------------------------------------------------------------------------------------------
    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms by name (each logged); the training loss is LM loss + their sum. Default: none."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """LM forward on a collated training batch; methods that route per example override this."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """LM loss on answer tokens (labels are -100 elsewhere) plus every regularizer term."""
        out = self(batch)
        terms = self.regularizer(batch, out)
        loss = out.loss + sum(terms.values()) if terms else out.loss
        bs = batch["input_ids"].shape[0]
        self.log("train/lm_loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in terms.items():
            self.log(f"train/{key}", value.detach(), prog_bar=True, batch_size=bs)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups, as torch optimisers take them: dicts with a ``params`` list and
        optionally ``lr`` / ``weight_decay`` (default ``cfg.lr`` / ``cfg.weight_decay``). Groups with no parameters
        are dropped. Default: one group of :meth:`trainable_parameters`; override for per-group learning rates."""
        return [{"params": self.trainable_parameters()}]

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimiser over ``groups``: AdamW with ``cfg.lr`` and ``cfg.weight_decay`` as group defaults.
        Override for another optimiser (OGD's plain SGD)."""
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def configure_optimizers(self) -> Any:
        """:meth:`build_optimizer` over the non-empty :meth:`param_groups`, with an optional linear warm-up: the lr
        factor is min(1, (step + 1) / ``cfg.warmup_steps``), stepped after every optimiser step."""
        groups = [group for group in self.param_groups() if group["params"]]
        if not groups:
            raise RuntimeError(f"method '{self.name}' has no trainable parameters for task {self.current_task}")
        opt = self.build_optimizer(groups)
        if self.cfg.warmup_steps <= 0:
            return opt
        warm = self.cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        """Put every submodule in training mode (HF loads models in eval mode; predict leaves them there)."""
        self.train()

    def on_train_start(self) -> None:
        """Remember which base weights were trained (they must go into the checkpoint); refuse non-fp32 trainables.

        Overrides must call ``super().on_train_start()``.
        """
        self._trained_names |= {n for n, p in self.named_parameters() if p.requires_grad and id(p) in self._base_ids}
        low = [n for n, p in self.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:  # AdamW would keep low-precision master weights: updates below bf16's resolution are lost
            raise RuntimeError(f"method '{self.name}' trains non-fp32 parameters ({low[0]}, ...); trainable "
                               f"weights must keep fp32 master copies")

    def store_frozen_linears(self, dtype: torch.dtype) -> int:
        """Keep every frozen ``nn.Linear`` weight (and bias) in ``dtype``; return how many values were cast.

        Under autocast to ``dtype``, ``F.linear`` casts an fp32 weight to ``dtype`` at every call (autocast caches the
        cast only for weights that require grad), so a weight stored in ``dtype`` gives bit-identical outputs while
        halving its memory and skipping the per-call cast: one cast per layer per decoding step in generation. Only
        base-model weights are cast: a method's own tensors (adapters, experts, prompts) stay fp32 even while frozen,
        because methods pre-allocate future tasks' adapters frozen and unfreeze them later, and a trainable weight
        must have an fp32 master copy for the optimiser. An output head tied to the input embeddings gets its own
        frozen copy in ``dtype`` (the embedding lookup is not autocast, so the table stays fp32): the tied head is
        the largest matrix of all (a fifth of SmolLM2-135M), and casting it at every decoding step is what made frozen
        weights generate slower than trained ones. Safe to call again after ``begin_task`` froze more weights.
        """
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
        cast = 0
        for module in self.modules():
            if not isinstance(module, nn.Linear):
                continue
            for attr in ("weight", "bias"):
                p = getattr(module, attr)
                if p is None or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                    continue
                if id(p) not in self._base_ids:
                    continue  # a method's own tensor: may be unfrozen for a later task
                if id(p) in tied:
                    head = nn.Parameter(p.data.to(dtype), requires_grad=False)
                    setattr(module, attr, head)
                    self._base_ids.add(id(head))  # a base weight: never checkpointed
                else:
                    p.data = p.data.to(dtype)  # same Parameter object: checkpoint identity tracking still holds
                cast += p.numel()
        return cast

    # ---- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation for a left-padded batch; returns only the new tokens. Methods may route first."""
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            # lm-eval's stop sequences (general-ability suites): the text is cut there anyway, this stops early
            stopping_criteria=batch.get("stopping_criteria"),
        )
        return out[:, batch["input_ids"].shape[1] :]

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generate answers; collected with their example index so multi-process runs can gather and sort them."""
        new_tokens = self.generate(batch, int(batch["max_new_tokens"]))
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        self._predictions.extend(zip(batch["index"].tolist(), texts, strict=True))
        return texts

    def on_predict_epoch_start(self) -> None:
        """Start a fresh prediction buffer."""
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        """Gather every rank's predictions (:func:`gather_by_index`) so rank 0 can write them in example order."""
        self._predictions = gather_by_index(self._predictions)

    def collected_predictions(self) -> list[str]:
        """Predictions of the last predict epoch, in example order."""
        return [text for _, text in self._predictions]

    def evaluation_report(self, j: int, task: Task) -> dict[str, float]:
        """Called after task ``j``'s test split was predicted (the method was not told ``j`` while predicting).

        Return extra per-task metrics by name (e.g. MoSEs' ``task_id_accuracy``); the harness stores each as a
        matrix beside R (``<name>.csv`` in the run folder). Default: none.
        """
        return {}

    def write_artifacts(self, run_dir: Path) -> None:
        """Write method-specific files into the run folder at the end of a run (e.g. an expert-usage map)."""

    def served_lm(self) -> nn.Module:
        """The model as this method serves it, as a Hugging Face causal LM for lm-eval (``--general``).

        It must behave like a HF causal LM (``forward(input_ids, attention_mask)`` -> ``.logits``, ``generate``,
        ``.config``, ``.device``) with the method's task-agnostic routing active and no task id. Default:
        :class:`clbench.general.ServedLM`, which calls this method's own eval-mode ``forward`` and greedy
        ``generate``, so methods that route inside those (keys, prompts, routers) need nothing special.
        """
        from clbench.general import ServedLM

        return ServedLM(self)

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def param_report(self) -> dict[str, int]:
        """Parameter counts: ``trainable`` now, ``added`` beyond the base model, ``total``.

        Methods with pre-allocated pools must override it, so that ``added`` counts only what tasks actually use.
        """
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "added": total - self.base_param_count, "total": total}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """State that must survive a crash: every tensor the method added plus any base weight it trained.

        Frozen base weights are never copied.
        """
        state = {n: p.detach().clone() for n, p in self.named_parameters()
                 if id(p) not in self._base_ids or n in self._trained_names}
        state.update({n: b.detach().clone() for n, b in self.named_buffers() if id(b) not in self._base_ids})
        return state

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state` after ``begin_task`` has been replayed for the finished tasks."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        unknown = [k for k in state if k not in own]
        if unknown:
            raise RuntimeError(f"checkpoint has tensors this method does not: {unknown[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        self._trained_names |= {k for k in state if id(own[k]) in self._base_ids}
