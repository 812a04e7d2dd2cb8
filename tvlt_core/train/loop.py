"""The training loop: a small object with named steps.

    trainer = Trainer(engine, task, loader, cfg, run, rank=..., tracker=..., report=...)   # cfg: TrainingConfig
    trainer.restore(folder)        # optional: DeepSpeed state + loader position + step, from a checkpoint folder
    summary = trainer.train()      # train_step until schedule.max_steps, logging, checkpointing, exporting
    trainer.close()

What a checkpoint folder holds is ``tvlt_core.train.checkpointing``'s; the Hugging Face export and its registration
are ``tvlt_core.train.export``'s. Nothing in here imports Ray or MLflow: ``report(metrics, folder)`` and
``tracker`` are handed in (Ray's ``train.report`` and a ``RunTracker`` in the job; plain functions in tests).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tvlt_core import distributed
from tvlt_core.data.stream import DataError, StreamingLoader
from tvlt_core.tracking import RunInfo, RunTracker
from tvlt_core.train import checkpointing
from tvlt_core.train.export import export_and_register
from tvlt_core.train.config import TrainingConfig
from tvlt_core.train.engine import plain_grad_norm
from tvlt_core.train.lr_schedule import lr_at
from tvlt_core.train.tasks import Task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """More than ``optim.max_nonfinite_steps`` steps had a NaN or infinite loss or gradient on some rank; every
    rank raises it at the same step, after skipping that step's update."""


# Failures that recur when the same step is tried again (same data, same weights): a Ray Train restart would only
# repeat them, so the job stops instead (``tvlt_core.train.ray_job``).
DETERMINISTIC_FAILURES = (DataError, NonFiniteLossError)


@dataclass
class _Window:
    """Sums over the steps since the last progress line."""

    steps: int = 0
    samples: int = 0
    wait_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # steps that gave each part (a skipped step gives none)
    grad_norms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, parts: dict[str, float], samples: int, wait_s: float, grad_norm: float | None) -> None:
        self.steps += 1
        self.samples += samples
        self.wait_s += wait_s
        if grad_norm is not None and math.isfinite(grad_norm):  # None: DeepSpeed computed none (no clipping)
            self.grad_norms.append(grad_norm)
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self, key: str) -> float:
        return self.parts[key] / self.counts[key] if self.counts.get(key) else math.nan


class Trainer:
    """Reads the ``optim``, ``schedule``, ``checkpoint`` and ``tracking`` sections of ``cfg`` (the loader and the
    engine, built from ``data`` and ``parallel``, are handed in); ``run`` names the run for the model card."""

    def __init__(
        self,
        engine,
        task: Task,
        loader: StreamingLoader,
        cfg: TrainingConfig,
        run: RunInfo,
        *,
        rank: distributed.RankInfo,
        tracker: RunTracker | None = None,
        report: Callable[[dict[str, Any], str | None], None] | None = None,
    ):
        self.engine, self.task, self.loader, self.cfg, self.run = engine, task, loader, cfg, run
        self.rank, self.tracker, self.report = rank, tracker, report
        self.step = 0  # optimizer steps done
        self.samples_seen = 0
        self.device = next(engine.module.parameters()).device
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.samples_per_step = loader.batch_size * cfg.optim.grad_accum_steps * rank.world_size
        self.last: tuple[dict[str, Any], Any] | None = None  # (batch, output) of the latest micro-batch
        self.last_metrics: dict[str, float] = {}
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, over the whole run
        self.stage = engine.zero_optimization_stage()
        self._dropped = False

    # --- one optimizer step ------------------------------------------------------------------------------------------
    def lr(self, step: int) -> float:
        sc = self.cfg.schedule
        return lr_at(step, base_lr=self.cfg.optim.lr, warmup_steps=sc.warmup_steps, max_steps=sc.max_steps,
                     min_lr_ratio=sc.min_lr_ratio)  # fmt: skip

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float], float, float | None]:
        """``grad_accum_steps`` micro-batches and one optimizer update. Returns (loss parts averaged over micro-
        batches and ranks, seconds spent waiting for data, global gradient norm before clipping or None).

        A step whose loss or gradients are not finite on some rank makes no update on any rank (DeepSpeed's
        overflow check at ZeRO 1-3, ours at stage 0) and is counted; ``skipped`` in the parts is then 1."""
        lr = self.lr(self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, float] = {}
        wait, accum = 0.0, self.cfg.optim.grad_accum_steps
        norm, bad_loss = None, ""
        self._dropped = False
        self.engine.train()
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = self.next_batch(batches)
            wait += time.perf_counter() - t0
            loss, parts, output = self.task.forward(self.engine, batch, self.device, self.dtype)
            averaged, bad = self.check_finite(parts)
            bad_loss = bad_loss or bad
            for k, v in averaged.items():
                totals[k] = totals.get(k, 0.0) + v / accum
            self.engine.backward(loss)
            last = micro == accum - 1
            if last:
                norm = plain_grad_norm(self.engine)
                self._dropped = bool(bad_loss or not self.stage0_grads_finite(norm)) and self.stage == 0
            self.optimizer_step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            if self.tracker is not None:  # kept for the artifacts only where they are logged
                self.last = (batch, output)
        skipped = bool(bad_loss) or self._dropped or not self.engine.was_step_applied()
        self.step += 1
        self.samples_seen += self.samples_per_step
        if skipped:
            self.note_nonfinite(bad_loss or "gradients (the update was skipped)")
        if norm is None and self.engine.get_global_grad_norm() is not None:
            norm = float(self.engine.get_global_grad_norm())
        return {**totals, "lr": lr, "skipped": float(skipped)}, wait, norm

    def next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch, agreed on by every rank: when any rank's loader fails (a damaged shard, too many skips,
        a stall), every rank raises the same ``DataError`` here, before a collective in the forward could leave
        the others waiting for it."""
        failure, batch = "", None
        try:
            batch = next(batches)
        except DataError as err:
            failure = str(err)
        flags = torch.zeros(self.rank.world_size, dtype=torch.float64)
        flags[self.rank.rank] = float(bool(failure))
        if distributed.all_reduce_sum(flags).sum() > 0:
            messages = [m for m in distributed.all_gather_object(failure) if m]
            raise DataError(f"step {self.step + 1}: " + " | ".join(messages))
        return batch

    def check_finite(self, parts: dict[str, torch.Tensor]) -> tuple[dict[str, float], str]:
        """Average ``parts`` over ranks, and say which ranks' loss is not finite ("" when every rank's is; one
        all-reduce: the values and a per-rank flag travel together)."""
        names = sorted(parts)
        world, here = self.rank.world_size, self.rank.rank
        values = torch.tensor([float(parts[n].detach().float()) for n in names] + [0.0] * world, dtype=torch.float64)
        if not math.isfinite(values[names.index("loss")]):
            values[len(names) + here] = 1.0
        values = distributed.all_reduce_sum(values)
        bad = [r for r in range(world) if values[len(names) + r] > 0]
        if not bad:
            return {n: float(values[i]) / world for i, n in enumerate(names)}, ""
        local = {n: float(parts[n].detach().float()) for n in names}
        return {}, f"loss on rank(s) {bad} (this rank {here}: {local})"

    def stage0_grads_finite(self, norm: float | None) -> bool:
        """At ZeRO stage 0 nothing in DeepSpeed checks the gradients (ZeRO 1-3 skip a non-finite step
        themselves); after the boundary's all-reduce every rank holds the same gradients, so the same answer."""
        if self.stage != 0:
            return True
        if norm is None:
            grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        return math.isfinite(norm)

    def optimizer_step(self) -> None:
        """``engine.step()``; for a dropped stage-0 step without the optimizer's update. DeepSpeed's own step still
        runs, so its micro-step and accumulation counters stay right; the gradients are zeroed (its clipping needs
        finite ones) and the client optimizer's ``step`` is shadowed for this one call, leaving every parameter
        and AdamW moment as it was (zero gradients alone would still decay the moments and the weights)."""
        if not self._dropped:
            self.engine.step()
            return
        for p in self.engine.module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        optimizer = self.engine.optimizer
        optimizer.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            del optimizer.step

    def note_nonfinite(self, what: str) -> None:
        self.nonfinite_steps += 1
        limit = self.cfg.optim.max_nonfinite_steps
        log.warning("step %d: non-finite %s; skipped (%d of at most %d)", self.step, what, self.nonfinite_steps, limit)
        if self.nonfinite_steps > limit:
            raise NonFiniteLossError(
                f"step {self.step}: non-finite {what}; {self.nonfinite_steps} such steps, more than "
                f"optim.max_nonfinite_steps {limit}: stopped on every rank, no update made. Lower optim.lr, raise "
                f"schedule.warmup_steps or check the data; the run resumes from its last checkpoint when launched again."
            )

    # --- the run -------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Train until ``schedule.max_steps``; log, checkpoint and export on the configured steps."""
        max_steps, tr, ck = self.cfg.schedule.max_steps, self.cfg.tracking, self.cfg.checkpoint
        start_step, started = self.step, time.perf_counter()
        if self.step >= max_steps:
            log.info("run %s is already at step %d of %d: nothing to train", self.run.name, self.step, max_steps)
        batches = iter(self.loader)
        window, total = _Window(), _Window()
        while self.step < max_steps:
            parts, wait, grad_norm = self.train_step(batches)
            for w in (window, total):
                w.add(parts, self.samples_per_step, wait, grad_norm)
            at_end = self.step == max_steps
            if self.step % tr.log_every_steps == 0 or at_end:
                self.log_window(window)
                window = _Window()
            if at_end:
                break  # the final checkpoint is written after the export, below
            if tr.artifact_every_steps and self.step % tr.artifact_every_steps == 0:
                self.log_artifacts()
            if self.step % ck.every_steps == 0:
                self.save_and_report()
            if ck.export_every_steps and self.step % ck.export_every_steps == 0:
                self.export(f"model-step-{self.step:08d}")
        summary = self.summary(total, time.perf_counter() - started)
        if self.step > start_step:
            # export before the last checkpoint: a run whose final checkpoint exists has been exported, and a
            # crash in between repeats the last steps and the export instead of losing the export
            self.log_artifacts()
            self.export("model")
            self.save_and_report(summary)
        return summary

    def log_window(self, w: _Window) -> None:
        elapsed = time.perf_counter() - w.started
        metrics = {f"train/{k}": w.mean(k) for k in w.parts if k not in ("lr", "skipped")}
        if w.grad_norms:
            metrics["train/grad_norm"] = sum(w.grad_norms) / len(w.grad_norms)
        metrics.update({
            "train/lr": w.mean("lr"),
            "train/epoch": float(self.loader.epoch),
            "train/nonfinite_steps": float(self.nonfinite_steps),
            **self.skip_metrics(),
            "perf/samples_per_s": w.samples / elapsed,
            "perf/data_wait_s": w.wait_s,
            "perf/data_wait_share": w.wait_s / elapsed,
        })  # fmt: skip
        self.last_metrics = metrics
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, self.step)
        eta = (self.cfg.schedule.max_steps - self.step) * elapsed / w.steps
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  data wait %.0f%%  ETA %s",
            self.step, self.cfg.schedule.max_steps, metrics.get("train/loss", math.nan), metrics["train/lr"],
            metrics["perf/samples_per_s"], 100 * metrics["perf/data_wait_share"], time.strftime("%H:%M:%S", time.gmtime(eta)),
        )  # fmt: skip

    def skip_metrics(self) -> dict[str, float]:
        """Samples and shards each rank's loader skipped so far (a collective: every rank logs at the same step)."""
        counts = distributed.all_gather_object(self.loader.skipped())
        metrics = {}
        for r, c in enumerate(counts):
            metrics[f"data/skipped_samples/rank{r}"] = float(c["samples"])
            metrics[f"data/skipped_shards/rank{r}"] = float(c["shards"])
        metrics["data/skipped_samples"] = float(sum(c["samples"] for c in counts))
        return metrics

    def log_artifacts(self) -> None:
        """Pictures of the last batch with ``log_image`` at this step (the UI's step slider), other files under
        ``samples/step-N/``."""
        if self.tracker is None or self.last is None:
            return
        batch, output = self.last
        out = self.task.artifacts(self.engine.module, batch, output)
        self.tracker.log_images({k: v for k, v in out.items() if not isinstance(v, bytes)}, self.step)
        self.tracker.log_files({k: v for k, v in out.items() if isinstance(v, bytes)}, f"samples/step-{self.step:08d}")

    def summary(self, total: _Window, wall_s: float) -> dict[str, float]:
        """This attempt's totals (the last window's metrics are in ``last_metrics``)."""
        out = {"samples_seen": float(self.samples_seen), "attempt_wall_s": wall_s}
        if total.steps:
            out["attempt_samples_per_s"] = total.samples / wall_s
            out["attempt_data_wait_share"] = total.wait_s / wall_s
        return out

    # --- checkpoints ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the train state besides DeepSpeed's: JSON, no pickle."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "tag": f"step-{self.step:08d}",
            "world_size": self.rank.world_size,
            "loader": self.loader.state_dict(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.loader.load_state_dict(state["loader"])

    def save(self, folder: str) -> None:
        """Write this rank's checkpoint part into the local ``folder`` (a collective: every rank calls)."""
        checkpointing.save_rank(self.engine, folder, self.rank.rank, self.state_dict())

    def restore(self, folder: str) -> None:
        """Load DeepSpeed state, step and loader position from a checkpoint folder (every rank calls)."""
        self.load_state_dict(checkpointing.load_rank(self.engine, folder, self.rank.rank))
        log.info("resumed at step %d (epoch %d, batch %d of it)", self.step, self.loader.epoch, self.loader.step_in_epoch)

    def save_and_report(self, extra: dict[str, float] | None = None) -> None:
        """Save this rank's part into a temporary folder and hand it to ``report`` (which uploads it)."""
        with tempfile.TemporaryDirectory(prefix="ckpt-") as folder:
            self.save(folder)
            if self.report is not None:
                self.report({"step": self.step, **self.last_metrics, **(extra or {})}, folder)

    # --- export --------------------------------------------------------------------------------------------------------
    def export(self, artifact_path: str) -> str | None:
        """Consolidate the weights, write a Hugging Face folder on rank 0, log it to MLflow and register it (every
        rank must call: the gathering is a collective). Returns the registered version on rank 0."""
        return export_and_register(
            self.engine, self.task, self.cfg.tracking, self.run, rank=self.rank, tracker=self.tracker, step=self.step,
            results=self.last_metrics, artifact_path=artifact_path,
        )  # fmt: skip

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED or FAILED) and drop what the loop holds."""
        self.last = None
        if self.tracker is not None:
            self.tracker.end(status)
