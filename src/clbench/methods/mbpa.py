"""MbPA++ on the LoRA adapter (de Masson d'Autume, Ruder, Kong & Yogatama, 2019, "Episodic Memory in Lifelong
Language Learning", NeurIPS, Sec. 3): an episodic memory used for sparse experience replay while training and for
local adaptation at test time, with no task id.

Memory. When task t ends, ``memory_per_task`` records of its training split (a seeded sample) are written as
(key u, record index). The key network must be frozen so keys do not drift (the paper: a frozen BERT's [CLS]); here
it is the frozen base model itself with the adapter switched off: u = mean over the prompt tokens of hidden state
``key_layer`` (a causal LM has no [CLS]; its first position sees only BOS). Being frozen, a key is the same whenever it
is computed, so writing at task end equals writing while the example streams by.

Sparse experience replay (paper: 100 stored examples per 10,000 new ones): task t trains on D_t plus
round(ρ·|D_t|) records drawn uniformly from the memories of tasks < t, seeded; the loader shuffles them in.

Local adaptation (the paper's Eq. for W̃_i, α_k = 1/K): for test example x_i, retrieve its K nearest memory entries
(Euclidean distance between keys), then from the trained adapter θ take L plain gradient steps on ::

    ℓ_i(θ̃) = λ ‖θ̃ − θ‖² + NLL(θ̃; neighbours)        θ̃ ← θ̃ − η ∇ℓ_i(θ̃)

NLL = mean negative log-likelihood per answer token of the K neighbours (the training loss), θ̃ = every LoRA tensor.
x_i is answered with θ̃, then θ is restored bit for bit. K = 32, L = 30, λ = 1e-3 as the paper; η = ``local_lr``.
The steps run in eval mode (no dropout): an answer depends on the example only, not on the RNG or the DDP split.
``local_steps: 0`` switches it off (LoRA + sparse replay). Cost: L forward+backward passes over K records per test
example. TRACE (model/Replay/MbPAplusplus.py @462e39f: full fine-tuning, first-token keys of the trained model, dot
product, no replay by default, Adam steps per neighbour) differs in many places: see docs/methods/mbpa.md.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.benchmark import Collator, Task
from clbench.config import ConfigError
from clbench.registry import register_method

from ._prompts import pool
from .lora import LoRA, LoRAMethodConfig

DISTANCES = ("euclidean", "cosine", "dot")
_INPUTS = ("input_ids", "attention_mask", "labels")


@dataclass(kw_only=True)
class MbPAConfig(LoRAMethodConfig):
    """MbPA++ knobs: the LoRA shape, the memory and its keys, sparse replay and local adaptation."""

    memory_per_task: int  # records of each task's training split written to the memory (a seeded sample)
    memory_seed: int | None  # seed of the memory and replay draws; None = the run's seed
    memory_batch_size: int  # records per forward for keys and local adaptation (memory use only)
    key_layer: int  # hidden_states index pooled into a key (-1 = last layer, 0 = embeddings)
    distance: str  # "euclidean" (paper), "cosine", or "dot" (TRACE: largest inner product)
    replay_rate: float  # ρ: replayed memory records per new training record (paper: 0.01)
    neighbours: int  # K: memory entries retrieved per test example
    local_steps: int  # L: gradient steps of local adaptation; 0 = off
    local_lr: float  # η: SGD step size of local adaptation
    local_lambda: float  # λ: weight of ‖θ̃ − θ‖² in the local loss
    local_batch: int  # test examples sharing one adaptation (1 = per example, the paper)

    def __post_init__(self) -> None:
        for name, low in (("memory_per_task", 1), ("memory_batch_size", 1), ("neighbours", 1), ("local_steps", 0),
                          ("local_batch", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.replay_rate <= 1.0:
            raise ValueError(f"replay_rate must be in [0, 1], got {self.replay_rate}")
        if self.local_lr <= 0:
            raise ValueError(f"local_lr must be > 0, got {self.local_lr}")
        if self.local_lambda < 0:
            raise ValueError(f"local_lambda must be >= 0, got {self.local_lambda}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, distance: str = "euclidean") -> torch.Tensor:
    """[B, min(k, N)] indices of the keys [N, d] nearest each query [B, d], nearest first; ties go to the earlier
    entry (a stable sort), so retrieval is deterministic. ``dot`` ranks by largest inner product (TRACE)."""
    q, m = queries.float(), keys.float()
    if distance == "euclidean":  # exact differences, not the ‖q‖² − 2q·k + ‖k‖² shortcut (cancellation)
        d = torch.cdist(q, m, compute_mode="donot_use_mm_for_euclid_dist")
    elif distance == "cosine":
        d = 1 - F.normalize(q, dim=-1) @ F.normalize(m, dim=-1).T
    else:
        d = -(q @ m.T)
    return torch.sort(d, dim=-1, stable=True).indices[:, : min(k, m.shape[0])]


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The token ids of each row where ``mask`` is 1 (a left-padded generation batch -> BOS + prompt per row)."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


@register_method("mbpa")
class MbPA(LoRA):
    """LoRA plus an episodic memory (frozen-base keys -> training records): sparse replay and local adaptation."""

    config_class = MbPAConfig
    end_task_on_training_device = True  # end_task runs the base model to compute the keys

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: MbPAConfig, num_tasks: int):
        super().__init__(model, tokenizer, cfg, num_tasks)
        config = self.model.get_base_model().config
        states = config.num_hidden_layers + 1  # hidden_states: the embeddings, then every layer
        if not -states <= cfg.key_layer < states:
            raise ConfigError(f"key_layer must be in [{-states}, {states - 1}] for this model, got {cfg.key_layer}")
        self.memory_seed = cfg.memory_seed if cfg.memory_seed is not None else torch.initial_seed()  # as replay
        # pre-allocated for every task (rule 2): index -1 = empty slot; the records are the tasks' own training
        # splits (begin_task, replayed on resume, hands them in), so 8 bytes per entry instead of token ids
        self.register_buffer("mbpa_index", torch.full((num_tasks, cfg.memory_per_task), -1, dtype=torch.long))
        self.register_buffer("mbpa_keys", torch.zeros(num_tasks, cfg.memory_per_task, config.hidden_size))
        default = Collator(tokenizer)  # the run's token budgets, recorded at the first end_task
        self.register_buffer("mbpa_lengths", torch.tensor([default.max_prompt_len, default.max_answer_len]))
        self._records: dict[int, list[dict[str, Any]]] = {}

    # ---- memory ---------------------------------------------------------------------------------------------------
    def begin_task(self, t: int, task: Task) -> None:
        """LoRA's trainability; keep task t's training records (the memory's values) by reference."""
        super().begin_task(t, task)
        if task is not None:
            self._records[t] = task.train

    def stored(self, j: int) -> list[int]:
        """Record indices of task ``j``'s training split held in the memory."""
        row = self.mbpa_index[j]
        return row[row >= 0].tolist()

    def memory(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Every stored key [N, d] and its (task, record index), in (task, slot) order."""
        valid = self.mbpa_index >= 0
        entries = [(j, int(self.mbpa_index[j, s])) for j, s in valid.nonzero().tolist()]
        return self.mbpa_keys[valid], entries

    def record(self, entry: tuple[int, int]) -> dict[str, Any]:
        """The training record a memory entry points to."""
        j, i = entry
        if j not in self._records:
            raise RuntimeError(f"mbpa: the memory holds task {j} but begin_task({j}) was not given its records")
        return self._records[j][i]

    @torch.no_grad()
    def prompt_keys(self, prompts: list[list[int]]) -> torch.Tensor:
        """Keys [n, d] of token-id prompts: hidden state ``key_layer`` of the frozen base model (adapter off, eval
        mode), averaged over the prompt tokens. Right-padded, so causal attention makes a key independent of the
        batch it is computed in."""
        backbone = self.model.get_base_model().base_model  # no LM head: only hidden states are needed
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        keys, was_training = [], self.training
        self.eval()
        try:
            with self.model.disable_adapter():
                for start in range(0, len(prompts), self.cfg.memory_batch_size):
                    chunk = prompts[start : start + self.cfg.memory_batch_size]
                    width = max(len(p) for p in chunk)
                    ids = torch.tensor([p + [pad] * (width - len(p)) for p in chunk], device=self.device)
                    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], device=self.device)
                    out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    keys.append(pool(out.hidden_states[self.cfg.key_layer], mask))
        finally:
            self.train(was_training)
        return torch.cat(keys)

    def end_task(self, t: int, task: Task, train_loader: Any = None) -> None:
        """Write task t's memory: a seeded sample of its training records and their keys (buffers: checkpointed)."""
        collate = getattr(train_loader, "collate_fn", None)
        if isinstance(collate, Collator):  # neighbours are later tokenised as the training batches were
            self.mbpa_lengths.copy_(torch.tensor([collate.max_prompt_len, collate.max_answer_len]))
        rng = random.Random(f"{self.memory_seed}:mbpa-memory:{t}:{task.name}")
        picked = sorted(rng.sample(range(len(task.train)), min(self.cfg.memory_per_task, len(task.train))))
        if not picked:
            return
        batch = Collator(self.tokenizer, int(self.mbpa_lengths[0]), train=False)([task.train[i] for i in picked])
        keys = self.prompt_keys(unpadded(batch["input_ids"], batch["attention_mask"]))
        with torch.no_grad():
            self.mbpa_index[t, : len(picked)] = torch.tensor(picked)
            self.mbpa_keys[t, : len(picked)] = keys.to(self.mbpa_keys)

    # ---- sparse experience replay ---------------------------------------------------------------------------------
    def train_examples(self, t: int, tasks: list[Task]) -> list[dict[str, Any]]:
        """D_t followed by round(ρ·|D_t|) memory records of tasks < t (at least one when ρ > 0), drawn uniformly
        without replacement (again from the full memory once it is used up), seeded by (seed, t)."""
        self._records.update({j: task.train for j, task in enumerate(tasks)})
        pool = [(j, i) for j in range(t) for i in self.stored(j)]
        if not pool or self.cfg.replay_rate == 0:
            return list(tasks[t].train)
        n = max(1, round(self.cfg.replay_rate * len(tasks[t].train)))
        rng = random.Random(f"{self.memory_seed}:mbpa-replay:{t}")
        picks: list[tuple[int, int]] = []
        while len(picks) < n:
            picks += rng.sample(pool, min(len(pool), n - len(picks)))
        return list(tasks[t].train) + [self.record(e) for e in picks]

    # ---- local adaptation -----------------------------------------------------------------------------------------
    def neighbours(self, queries: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The K nearest memory entries (task, record index) of each query key, nearest first."""
        keys, entries = self.memory()
        picked = nearest(queries, keys.to(queries.device), self.cfg.neighbours, self.cfg.distance)
        return [[entries[i] for i in row] for row in picked.tolist()]

    def adapter_parameters(self) -> list[nn.Parameter]:
        """θ of the local loss: every LoRA tensor."""
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def adapted(self, records: list[dict[str, Any]]) -> Iterator[list[float]]:
        """Inside the block the adapter is θ̃ after ``local_steps`` SGD steps on λ‖θ̃ − θ‖² + NLL(records); on exit
        θ is restored bit for bit. Yields the NLL before each step. Runs with autograd on, also inside Lightning's
        inference mode, on fresh (non-inference) tensors."""
        params, lam, lr = self.adapter_parameters(), self.cfg.local_lambda, self.cfg.local_lr
        with torch.inference_mode(False), torch.enable_grad():
            saved = [p.detach().clone() for p in params]
            flags, was_training = [p.requires_grad for p in params], self.training
            collate = Collator(self.tokenizer, *map(int, self.mbpa_lengths.tolist()), train=True)
            size = self.cfg.memory_batch_size
            batches = [{k: v.to(self.device) for k, v in collate(records[s : s + size]).items() if k in _INPUTS}
                       for s in range(0, len(records), size)]
            counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]  # tokens HF's loss averages over
            total = max(sum(counts), 1)
            losses: list[float] = []
            self.eval()
            try:
                for p in params:
                    p.requires_grad_(True)
                for _ in range(self.cfg.local_steps):
                    grads, nll = [torch.zeros_like(p) for p in params], 0.0
                    for batch, n in zip(batches, counts, strict=True):
                        if n == 0:
                            continue
                        loss = self.model(**batch).loss * (n / total)  # chunks add up to the mean over all tokens
                        for g, part in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                            if part is not None:
                                g += part
                        nll += float(loss.detach())
                    losses.append(nll)
                    with torch.no_grad():  # ∇(λ‖θ̃ − θ‖²) = 2λ(θ̃ − θ), added in closed form
                        for p, g, p0 in zip(params, grads, saved, strict=True):
                            p.sub_(lr * (g + 2 * lam * (p - p0)))
                yield losses
            finally:
                with torch.no_grad():
                    for p, p0, flag in zip(params, saved, flags, strict=True):
                        p.copy_(p0)
                        p.requires_grad_(flag)
                self.train(was_training)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Per group of ``local_batch`` examples: keys, the union of their K neighbours, local adaptation, greedy
        generation with θ̃, restore. With ``local_steps: 0`` or an empty memory: the adapter's plain prediction."""
        if self.cfg.local_steps == 0 or not bool((self.mbpa_index >= 0).any()):
            return super().predict_step(batch, batch_idx, dataloader_idx)
        texts: list[str] = []
        for start in range(0, batch["input_ids"].shape[0], self.cfg.local_batch):
            ids = batch["input_ids"][start : start + self.cfg.local_batch]
            mask = batch["attention_mask"][start : start + self.cfg.local_batch]
            keep = mask.bool().any(0)  # drop columns that pad every row of the group: a lone row is unpadded
            ids, mask = ids[:, keep], mask[:, keep]
            entries = sorted({e for row in self.neighbours(self.prompt_keys(unpadded(ids, mask))) for e in row})
            with self.adapted([self.record(e) for e in entries]):
                new = self.generate({"input_ids": ids.clone(), "attention_mask": mask.clone(),
                                     "stopping_criteria": batch.get("stopping_criteria")}, int(batch["max_new_tokens"]))
            texts += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        self._predictions.extend(zip(batch["index"].tolist(), texts, strict=True))
        return texts

    def param_report(self) -> dict[str, int]:
        """LoRA's counts (keys are buffers, not parameters) plus ``memory_entries``, the records stored."""
        return {**super().param_report(), "memory_entries": int((self.mbpa_index >= 0).sum())}
