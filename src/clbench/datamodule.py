"""One task's loaders as a LightningDataModule: training records in a seeded global-batch order, scored records for
generation sorted by prompt length.

Both sides collate through :class:`clbench.benchmark.Collator` and shard through :mod:`clbench.sampling`, so N
processes see the batches of one process. The tokenizer and the token budgets come in explicitly
(:class:`LoaderSettings`), built once per run after the model (and its tokenizer) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from clbench.benchmark import Collator
from clbench.sampling import GlobalBatchSampler, ShardSampler


@dataclass(frozen=True)
class LoaderSettings:
    """What every loader of a run shares: the tokenizer, the token budgets and the batch sizes (per device)."""

    tokenizer: Any
    max_prompt_len: int
    max_answer_len: int
    batch_size: int
    eval_batch_size: int


class _WithBudget:
    """A generation collate that also tells ``predict_step`` the task's generation budget."""

    def __init__(self, collate: Collator, max_new_tokens: int):
        self.collate = collate
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.collate(batch)
        out["max_new_tokens"] = self.max_new_tokens
        return out


class TaskDataModule(L.LightningDataModule):
    """The loaders of one task: ``train`` records to fit on (seeded by ``seed``), and/or ``predict`` records (the
    split a row of R scores) to generate for with ``max_new_tokens``, each carrying ``task_id`` when it is given.

    Give ``train`` for a fit (``Trainer.fit(method, datamodule=...)``), ``predict`` for a predict; the loader of the
    last fit stays in :attr:`train_loader` (end_task's Fisher/importance passes read it).
    """

    def __init__(self, settings: LoaderSettings, train: list[dict[str, Any]] | None = None, seed: int = 0,
                 predict: list[dict[str, str]] | None = None, max_new_tokens: int = 16,
                 task_id: int | None = None):
        super().__init__()
        self.settings = settings
        self.train_records = train or []
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.train_loader: DataLoader | None = None
        records = [{"prompt": r["prompt"], "index": i, **({"task_id": task_id} if task_id is not None else {})}
                   for i, r in enumerate(predict or [])]
        # Similar token counts share a batch (less padding); the index restores the file order afterwards. Tokens,
        # not characters: Chinese and code prompts have other tokens per character (trace-mini's test splits at
        # batch 16: 3.6% padded prompt tokens by token count, 9.3% by characters). Sorted here rather than in
        # predict_dataloader, which Lightning calls inside predict: a row's ms per example time generation only.
        n_tokens = {r["index"]: len(settings.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
                    for r in records}
        self.predict_records = sorted(records, key=lambda r: n_tokens[r["index"]])

    def train_dataloader(self) -> DataLoader:
        """Training batches: one seeded permutation cut into global batches, this rank's slice of each."""
        s = self.settings
        collate = Collator(s.tokenizer, s.max_prompt_len, s.max_answer_len, train=True)
        sampler = GlobalBatchSampler(len(self.train_records), s.batch_size, seed=self.seed)
        self.train_loader = DataLoader(self.train_records, batch_size=s.batch_size, sampler=sampler,
                                       collate_fn=collate)
        return self.train_loader

    def predict_dataloader(self) -> DataLoader:
        """Generation batches in prompt-length order, rank r taking items r, r+N, ... (gathered back by index)."""
        s = self.settings
        collate = _WithBudget(Collator(s.tokenizer, s.max_prompt_len, train=False), self.max_new_tokens)
        return DataLoader(self.predict_records, batch_size=s.eval_batch_size, collate_fn=collate,
                          sampler=ShardSampler(len(self.predict_records)))
