"""The Lightning side of a run: Trainers built from the run config, the train-throughput meter, quiet logs.

Every Trainer of a run (each task's fit, each row's predict, the general-ability suite's autocast) comes from
:func:`make_trainer`, so they share accelerator, strategy and precision; :func:`fit_trainer` adds what a fit needs.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from clbench.run_config import RunConfig

if TYPE_CHECKING:
    from clbench.method import CLMethod


class ThroughputMeter(Callback):
    """Train tokens/s and seconds per optimiser step (first step excluded).

    A step is timed from the start of its first micro-batch to the end of the micro-batch after which the optimiser
    stepped (``trainer.global_step`` moved), so with ``accumulate_grad_batches: K`` one step covers K micro-batches,
    as "seconds per optimiser step" promises.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self._t0: float | None = None
        self._window_tokens = 0
        self._global_step = 0
        self._first_seconds = 0.0
        self._first_tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start counting from the step this fit begins at (a second pass continues the meter)."""
        self._global_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Open a step's time window at its first micro-batch."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the micro-batch's tokens; close the window when the optimiser has stepped."""
        self._window_tokens += int(batch["attention_mask"].sum()) * trainer.world_size
        if trainer.global_step == self._global_step or self._t0 is None:
            return  # still accumulating: the optimiser has not stepped yet
        self._global_step = trainer.global_step
        elapsed, tokens = time.perf_counter() - self._t0, self._window_tokens
        self._t0, self._window_tokens = None, 0
        if self.steps == 0:  # warm-up step (allocator, autocast caches) is kept apart
            self._first_seconds, self._first_tokens = elapsed, tokens
        else:
            self.seconds += elapsed
            self.tokens += tokens
        self.steps += 1

    def summary(self) -> dict[str, float]:
        """tokens/s and s/step over the measured steps (falls back to the single step when only one ran)."""
        seconds, tokens, steps = self.seconds, self.tokens, self.steps - 1
        if steps <= 0:
            seconds, tokens, steps = self._first_seconds, self._first_tokens, max(self.steps, 1)
        return {
            "steps": self.steps,
            "tokens_per_s": tokens / seconds if seconds else float("nan"),
            "step_time_s": seconds / steps if steps else float("nan"),
        }


def quiet_lightning() -> None:
    """Silence Lightning's info logs and the warnings that do not apply to these runs (tiny loaders, no workers)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*predict_dataloader.*")
    warnings.filterwarnings("ignore", message=r".*is a wrapper around.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


def strategy_name(cfg: RunConfig, method_cls: type[CLMethod]) -> str:
    """The Lightning strategy of the run's Trainers: ``cfg.strategy``, adapted to the method where it must be."""
    # Methods whose active experts change per batch leave some trainable parameters without a gradient in a step;
    # DDP must then look for unused parameters or it stops with an error.
    if cfg.strategy == "ddp" and method_cls.ddp_find_unused_parameters:
        return f"{cfg.strategy}_find_unused_parameters_true"
    return cfg.strategy


def make_trainer(cfg: RunConfig, method_cls: type[CLMethod], **kwargs: Any) -> L.Trainer:
    """A Trainer on the run's accelerator, devices, strategy and precision; ``kwargs`` go to ``L.Trainer``."""
    callbacks = list(kwargs.pop("callbacks", []))
    if cfg.progress:
        callbacks.append(RichProgressBar(leave=False))
    return L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=strategy_name(cfg, method_cls), precision=cfg.precision,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=cfg.progress,
        use_distributed_sampler=False,  # clbench.sampling shards data so N processes match one process
        callbacks=callbacks, **kwargs,
    )


def fit_trainer(cfg: RunConfig, method_cls: type[CLMethod], run_dir: Path, max_epochs: int, log_name: str,
                meter: ThroughputMeter) -> L.Trainer:
    """The Trainer of one fit: the run's step limit, accumulation and clipping, its losses logged to
    ``<run_dir>/logs/<log_name>/metrics.csv`` and its throughput counted by ``meter``."""
    return make_trainer(
        cfg, method_cls, max_epochs=max_epochs, max_steps=cfg.max_steps_per_task or -1, callbacks=[meter],
        logger=CSVLogger(run_dir, name="logs", version=log_name), log_every_n_steps=5,
        accumulate_grad_batches=cfg.accumulate_grad_batches, gradient_clip_val=cfg.gradient_clip_val,
    )
