"""MoSEs as a CLMethod: task life cycle, training loss, generation, bookkeeping.

Task t (0-based) learns, per MoSE layer, a mask m_t = top-k(u_t) over {experts owned by earlier tasks} ∪ {b_t fresh
slots} (straight-through estimator), a router W_r^t that activates k_x of those experts per input, a key k_t and a
task prompt P_t. After the task all of it is frozen; the selected fresh slots become task t's experts. Training loss:
LM loss + λ_p (1 − cos(q(x), k_t)) (the pull constraint). Test: each example takes its nearest key's task
(``--oracle-task-id``: the true task). Layer math: ``layer.py``; per-call routing: ``routing.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clbench.benchmark import IGNORE_INDEX, Task
from clbench.method import CLMethod, gather_by_index

from .._experts import check_layers, inject, num_layers
from .._prompts import check_hidden_layer, mean_over_ranks, nearest_key, pull_loss, query_mask
from .config import MoSEsConfig
from .layer import MoSELinear
from .report import task_params, write_growth, write_usage
from .routing import Routed, routed_call


class MoSEs(CLMethod):
    """MoSEs (Kang, 2025): per-task masks over a pool of LoRA sub-experts, sparse per-input routers, task prompts,
    and keys that pick the task at test time."""

    config_class = MoSEsConfig
    supports_oracle_task_id = True

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: MoSEsConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        n_layers = num_layers(model)
        layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers // 2, n_layers))
        check_layers(model, layers)  # before key_layer, which is derived from them
        self.key_layer = cfg.key_layer if cfg.key_layer is not None else min(layers) - 1
        # the query must not depend on the routing it decides (and must come from the frozen model)
        check_hidden_layer("key_layer", self.key_layer, min(layers),
                           f"below the first MoSE layer {min(layers)}; -1 = token embeddings")
        self._mose_layers: dict[str, MoSELinear] = inject(
            model, list(cfg.target_modules),
            lambda name, linear: MoSELinear(linear, cfg.num_experts, cfg.rank, cfg.alpha, cfg.top_k,
                                            cfg.experts_per_input, num_tasks, cfg.temperature, cfg.new_expert_score),
            layers)
        embeddings = model.get_input_embeddings()
        d = embeddings.embedding_dim
        self.keys = nn.ParameterList([nn.Parameter(0.02 * torch.randn(d)) for _ in range(num_tasks)])
        # task prompts: an offset P_t (L × d, zero init) added at the key layer to the hidden states of L placeholder
        # tokens in front of the input; the placeholders are L random vocabulary tokens shared by all tasks (the
        # input is built before the task is known), so at init a prompt is L random vocabulary tokens (Lester et al.)
        length = cfg.prompt_length
        self.prompts = nn.ParameterList([nn.Parameter(torch.zeros(length, d))
                                         for _ in range(num_tasks if length else 0)])
        self.register_buffer("prompt_ids", torch.randint(0, embeddings.num_embeddings, (length,)))
        self.register_buffer("task_done", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("key_ready", torch.zeros(num_tasks, dtype=torch.bool))
        self._task_names: dict[int, str] = {}
        self._chosen: list[tuple[int, int]] = []

    # ---- task hooks ---------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """Reserve task t's fresh slots in every layer; only its slots, router, scores, key and prompt train."""
        super().begin_task(t, task)
        self._task_names[t] = task.name
        self.freeze_all()
        for layer in self._mose_layers.values():
            layer.reserve(t, self.cfg.budget)
            for p in (layer.A_new, layer.B_new, layer.router_weight[t], layer.scores[t]):
                p.requires_grad_(True)
        self.keys[t].requires_grad_(True)
        if self.cfg.prompt_length > 0:
            self.prompts[t].requires_grad_(True)

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Fix m_t, hand the selected fresh slots to task t (frozen from now on), and mark the task finished."""
        for layer in self._mose_layers.values():
            layer.fix_mask(t)
        self.task_done[t] = True

    # ---- routing ------------------------------------------------------------------------------------------------
    def active_tasks(self) -> torch.Tensor:
        """Tasks an example may be routed to: the finished ones plus the task being trained (bool, per task)."""
        active = self.task_done.clone()
        if 0 <= self.current_task < self.num_tasks:
            active[self.current_task] = True
        return active

    def nearest_task(self, query: torch.Tensor) -> torch.Tensor:
        """τ(x) = argmax over active tasks of cos(q(x), k_t); -1 where no task is active."""
        return nearest_key(query, torch.stack(list(self.keys)), self.active_tasks())

    def _oracle_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "task_id" not in batch:
            return None
        ids = batch["task_id"].to(self.task_done.device)
        # a task not trained yet has no mask: its examples get the base model (as per-task-lora's untrained adapters)
        return torch.where(self.active_tasks()[ids.clamp(0, self.num_tasks - 1)], ids, torch.full_like(ids, -1))

    def _prompt_offsets(self, task_ids: torch.Tensor) -> torch.Tensor:
        """P_τ for each example (batch, L, d); zero rows for examples without a task."""
        offsets = torch.stack(list(self.prompts))[task_ids.clamp(min=0)]
        return offsets * (task_ids >= 0).to(offsets.dtype)[:, None, None]

    def _routed(self, batch: dict[str, torch.Tensor], forced: torch.Tensor | None, train_task: int | None,
                run: Any) -> tuple[Any, Routed, int]:
        """Run ``run(input_ids, attention_mask, labels)`` as one routed call; returns (its output, the decision,
        the number L of placeholder slots in front of the input: 0 when prompts are off or no row can get a task)."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
        qmask = query_mask(batch, getattr(self.tokenizer, "bos_token_id", None))
        keep = forced >= 0 if forced is not None else self.active_tasks().any().expand(ids.shape[0])
        length = self.cfg.prompt_length if bool(keep.any()) else 0
        if length:
            n = ids.shape[0]
            ids = torch.cat([self.prompt_ids.to(ids.device).expand(n, length), ids], 1)
            # rows known to get no task (oracle id of an untrained task) do not see the slots: the base model
            mask = torch.cat([keep.to(mask.device, mask.dtype)[:, None].expand(n, length), mask], 1)
            qmask = torch.cat([torch.zeros(n, length, dtype=qmask.dtype, device=qmask.device), qmask], 1)
            if labels is not None:
                labels = torch.cat([torch.full((n, length), IGNORE_INDEX, dtype=labels.dtype,
                                               device=labels.device), labels], 1)
        with routed_call(self.model, self.key_layer, self._mose_layers, token_mask=qmask, query_mask=qmask,
                         choose=self.nearest_task, forced=forced, train_task=train_task,
                         prompt=self._prompt_offsets if length else None, prompt_length=length) as routed:
            out = run(ids, mask, labels)
        return out, routed, length

    # ---- training -----------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """LM forward. Training: every row is the current task; eval: oracle ``task_id`` if given, else nearest key.

        The output carries the call's decision as tensors: ``query`` (batch, d), ``key_choice`` and ``task_ids``
        (batch,); logits have one row per input token (the prompt slots are cut off).
        """
        train_task = None
        forced = self._oracle_ids(batch)
        if self.training:
            train_task = self.current_task
            if train_task < 0:
                raise RuntimeError("begin_task must be called before training MoSEs")
            forced = torch.full_like(batch["input_ids"][:, 0], train_task)

        def run(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None) -> Any:
            return self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)

        out, routed, length = self._routed(batch, forced, train_task, run)
        if length:
            out["logits"] = out.logits[:, length:]
        out["query"], out["key_choice"], out["task_ids"] = routed.query, routed.key_choice, routed.route.task_ids
        if train_task is not None and self.cfg.key_init == "first_batch" and not bool(self.key_ready[train_task]):
            self._init_key(train_task, routed.query)
        return out

    @torch.no_grad()
    def _init_key(self, t: int, query: torch.Tensor) -> None:
        # Our reading: L2P draws keys at random. LLM hidden states point along a few massive dimensions, and Adam moves
        # every coordinate by ~lr per step, so a random key needs thousands of steps to align; starting k_t at its
        # first batch's mean query (averaged over ranks so DDP replicas agree) leaves the pull only the fine-tuning.
        self.keys[t].copy_(mean_over_ranks(query.float().mean(0)).to(self.keys[t].dtype))
        self.key_ready[t] = True

    def regularizer(self, batch: dict[str, torch.Tensor], out: Any) -> dict[str, torch.Tensor]:
        """Pull constraint λ_p · mean_x (1 − cos(q(x), k_t)), q(x) from ``out`` (the same forward); only k_t learns."""
        return {"pull": self.cfg.pull_weight * pull_loss(out["query"], self.keys[self.current_task])}

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per part: sub-experts (lr), routers (router_lr), mask scores and keys/prompts (no decay); the
        base class drops empty groups, builds AdamW and adds the warm-up."""
        cfg = self.cfg
        layers = list(self._mose_layers.values())
        experts = [p for layer in layers for p in (layer.A_new, layer.B_new) if p.requires_grad]
        routers = [p for layer in layers for p in layer.router_weight if p.requires_grad]
        scores = [p for layer in layers for p in layer.scores if p.requires_grad]
        keys = [p for p in (*self.keys, *self.prompts) if p.requires_grad]
        return [{"params": experts, "lr": cfg.lr}, {"params": routers, "lr": cfg.router_lr},
                {"params": scores, "lr": cfg.score_lr, "weight_decay": 0.0},
                {"params": keys, "lr": cfg.key_lr, "weight_decay": 0.0}]

    # ---- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_routed(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> tuple[torch.Tensor, Routed]:
        """Greedy generation and its routing decision (made once, at the prefill's key layer)."""

        def run(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
            return out[:, ids.shape[1]:]

        tokens, routed, _ = self._routed(batch, self._oracle_ids(batch), None, run)
        return tokens, routed

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        """Greedy generation (new tokens only); see :meth:`generate_routed`."""
        return self.generate_routed(batch, max_new_tokens)[0]

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generate, and record which task each example's key chose (for ``task_id_accuracy``)."""
        tokens, routed = self.generate_routed(batch, int(batch["max_new_tokens"]))
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        index = batch["index"].tolist()
        self._predictions.extend(zip(index, texts, strict=True))
        chosen = routed.key_choice.tolist() if routed.key_choice is not None else [-1] * len(texts)
        self._chosen.extend(zip(index, chosen, strict=True))
        return texts

    def on_predict_epoch_start(self) -> None:
        """Fresh prediction and task-choice buffers."""
        super().on_predict_epoch_start()
        self._chosen = []

    def on_predict_epoch_end(self) -> None:
        """Gather predictions (base class) and the key choices of every rank, in example order."""
        super().on_predict_epoch_end()
        self._chosen = gather_by_index(self._chosen)

    def evaluation_report(self, j: int, task: Task) -> dict[str, float]:
        """``task_id_accuracy``: share of task j's test examples whose nearest key was task j's.

        Reported under ``--oracle-task-id`` too (routing then uses the true id; the number says what keys would do).
        Omitted (NaN in the matrix) for tasks not trained yet, which no key can choose.
        """
        if not bool(self.task_done[j]) or not self._chosen:
            return {}
        return {"task_id_accuracy": sum(c == j for _, c in self._chosen) / len(self._chosen)}

    # ---- bookkeeping --------------------------------------------------------------------------------------------
    def _task_params(self, t: int) -> dict[str, int]:
        """What finished task t added (``report.task_params``)."""
        prompt = self.prompts[t].numel() if self.cfg.prompt_length > 0 else 0
        return task_params(self._mose_layers, t, self.keys[t].numel(), prompt)

    def param_report(self) -> dict[str, int]:
        """Parameter counts for the growth curve.

        ``trainable``: what the latest task's optimiser can move (its fresh slots, the router rows and scores of its
        candidates, its key and prompt; not the pre-allocated rows that never get a gradient); ``frozen``: what the
        finished tasks added and froze; ``added``: ``frozen`` plus the running task's trainables while a task is in
        progress (never the untouched pre-allocated pool); ``total``: base + added, what a deployment stores.
        """
        t = self.current_task
        trainable = 0
        if 0 <= t < self.num_tasks:
            trainable = sum(layer.trained_params(t) for layer in self._mose_layers.values()) + self.keys[t].numel()
            trainable += self.prompts[t].numel() if self.cfg.prompt_length > 0 else 0
        frozen = sum(self._task_params(i)["added"] for i in range(self.num_tasks) if bool(self.task_done[i]))
        running = 0 <= t < self.num_tasks and not bool(self.task_done[t])
        added = frozen + (trainable if running else 0)
        return {"trainable": trainable, "added": added, "frozen": frozen, "total": self.base_param_count + added}

    def write_artifacts(self, run_dir: Path) -> None:
        """``expert_usage.csv`` (+ ``expert_usage.png``) and ``param_growth.csv`` (``report.py``)."""
        run_dir = Path(run_dir)
        done = [t for t in range(self.num_tasks) if bool(self.task_done[t])]
        write_usage(run_dir, self._mose_layers, done, self._task_names)
        write_growth(run_dir, {t: self._task_params(t) for t in done}, self._task_names)
