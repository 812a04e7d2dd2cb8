"""The training loop in one process (a one-rank gloo group, real DeepSpeed): the schedule, the DeepSpeed config,
exact resume from a checkpoint, non-finite loss, safe checkpoint loading, export to the MLflow registry."""

from __future__ import annotations

import io
import math
import os
import pickle
import shutil

import pytest
import torch

from tvlt_core import distributed
from tvlt_core.data import StreamingLoader
from tvlt_core.models.tvlt import TvltForPreTraining, tvlt_tiny
from tvlt_core.tracking import RunInfo, RunTracker
from tvlt_core.train.config import (
    CheckpointConfig, OptimConfig, ParallelConfig, ScheduleConfig, TrackingConfig, TrainingConfig,
)  # fmt: skip
from tvlt_core.train.engine import SafeCheckpointEngine, build_engine, deepspeed_config, full_state_dict
from tvlt_core.train.loop import NonFiniteLossError, Trainer
from tvlt_core.train.lr_schedule import lr_at
from tvlt_core.train.tasks import TvltPretrainTask


# --- pure parts ------------------------------------------------------------------------------------------------------
def test_schedule_warms_up_then_decays_to_the_floor():
    lr = [lr_at(s, base_lr=1.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == pytest.approx(1.0) and lr[20] == pytest.approx(0.1) and lr[12] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lr[3:], lr[4:])), "monotone after the warm-up"
    assert lr_at(0, base_lr=1.0, warmup_steps=0, max_steps=10) == 1.0


@pytest.mark.parametrize("stage, offload, gpu", [(0, False, False), (2, True, False), (3, True, True)])
def test_deepspeed_config_follows_our_config(stage, offload, gpu):
    parallel = ParallelConfig(zero_stage=stage, offload_optimizer=offload, offload_params=offload and stage == 3, use_gpu=gpu)
    cfg = deepspeed_config(OptimConfig(grad_clip=0.5, grad_accum_steps=3), parallel, micro_batch=4, world_size=2)
    assert cfg["train_batch_size"] == 4 * 3 * 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"]["enabled"] is gpu  # precision auto: bf16 on GPU, fp32 on CPU
    assert ("offload_optimizer" in cfg["zero_optimization"]) is offload
    assert ("offload_param" in cfg["zero_optimization"]) is (offload and stage == 3)


def test_bad_parallel_settings_name_the_field():
    with pytest.raises(ValueError, match="parallel.offload_params"):
        ParallelConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="parallel.precision"):
        ParallelConfig(precision="bf16", use_gpu=False)
    with pytest.raises(ValueError, match="tracking.aliases"):
        TrackingConfig(aliases=["Latest"])


def test_a_tracker_leaves_later_jobs_in_this_process_their_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second job in the same process (tests, a notebook)
    must still track and register into its own work folder, not the first job's."""
    from tvlt_core.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = RunTracker.start(experiment="a", run_name="a", params={}, system_metrics=False, work_dir=str(tmp_path / "a"))
    first.end()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = RunTracker.start(experiment="b", run_name="b", params={}, system_metrics=False, work_dir=str(tmp_path / "b"))
    second.end()
    assert tracking_uri(str(tmp_path / "b")) == f"sqlite:///{(tmp_path / 'b').resolve()}/mlflow.db"
    assert second.client.get_run(second.run_id).info.artifact_uri.startswith((tmp_path / "b").resolve().as_uri())


def test_checkpoint_loading_never_unpickles_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"module": Exploit()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        SafeCheckpointEngine(None).load(str(path))
    assert not (tmp_path / "pwned").exists()
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "step": 3}, buf)
    path.write_bytes(buf.getvalue())
    assert SafeCheckpointEngine(None).load(str(path))["step"] == 3


# --- the loop on real DeepSpeed ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank():
    distributed.init_process_group("gloo")
    yield distributed.current()
    distributed.destroy_process_group()


@pytest.fixture
def shards(shard_writer, tmp_path):
    return shard_writer(tmp_path / "shards", counts=[5, 4], frames=4, size=32)


def tiny_task() -> TvltPretrainTask:
    return TvltPretrainTask(model_config=tvlt_tiny(image_size=32, num_frames=4, spectrogram_length=64))


def make_trainer(shards, rank, *, stage, max_steps, task=None, tracker=None, reports=None, registered="", max_nonfinite=3):
    task = task or tiny_task()
    torch.manual_seed(0)
    model = task.build_model()
    loader = StreamingLoader(shards, task.batcher(model), batch_size=2, shuffle_buffer=3)
    cfg = TrainingConfig(
        optim=OptimConfig(lr=2e-3, grad_accum_steps=2, max_nonfinite_steps=max_nonfinite),
        schedule=ScheduleConfig(max_steps=max_steps, warmup_steps=1), checkpoint=CheckpointConfig(every_steps=2),
        parallel=ParallelConfig(num_workers=1, zero_stage=stage),
        tracking=TrackingConfig(registered_model=registered, log_every_steps=1),
    )  # fmt: skip
    engine = build_engine(model, cfg.optim, cfg.parallel, 2, 1)

    def report(metrics, folder):
        if reports is not None:
            reports[metrics["step"]] = shutil.copytree(folder, f"{reports['root']}/step{metrics['step']}")

    return Trainer(engine, task, loader, cfg, RunInfo("t"), rank=rank, tracker=tracker, report=report)


def test_resume_from_a_checkpoint_continues_the_run_exactly(shards, one_rank, tmp_path):
    tracker = RunTracker.start(experiment="loop", run_name="t", params={"x": 1}, system_metrics=False, work_dir=str(tmp_path / "work"))
    reports = {"root": str(tmp_path)}
    # ZeRO-3 on purpose: its parameter gathering must see through the models' dataclass outputs
    full = make_trainer(shards, one_rank, stage=3, max_steps=4, tracker=tracker, reports=reports, registered="loop-tvlt")
    summary = full.train()
    assert full.step == 4 and summary["samples_seen"] == 4 * 2 * 2
    assert sorted(k for k in reports if k != "root") == [2, 4]
    reference = full_state_dict(full.engine, rank=0)
    full.close()

    resumed = make_trainer(shards, one_rank, stage=3, max_steps=4)
    resumed.restore(reports[2])
    assert resumed.step == 2 and resumed.loader.step_in_epoch == 4  # 2 steps x 2 accumulated micro-batches
    resumed.train()
    weights = full_state_dict(resumed.engine, rank=0)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)

    # the export registered at the end loads back from the registry with the trained weights
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/work/mlflow.db"
    try:
        loaded = TvltForPreTraining.from_pretrained("models:/loop-tvlt@latest")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


class NanAfterFirstStep(TvltPretrainTask):
    def forward(self, model, batch, device, dtype):
        loss, parts, out = super().forward(model, batch, device, dtype)
        if getattr(self, "calls", 0) >= 2:  # both micro-batches of step 1 are fine, step 2 is not
            loss = loss * float("nan")
            parts["loss"] = loss
        self.calls = getattr(self, "calls", 0) + 1
        return loss, parts, out


def test_non_finite_loss_stops_before_the_update(shards, one_rank):
    task = NanAfterFirstStep(model_config=tiny_task().model_config)
    trainer = make_trainer(shards, one_rank, stage=0, max_steps=3, task=task, max_nonfinite=0)
    before = {}
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite loss on rank\(s\) \[0\].*optim\.max_nonfinite_steps 0.*optim.lr"):
        _, _, norm = trainer.train_step(batches := iter(trainer.loader))
        assert norm is not None and norm > 0, "stage 0 in fp32 reports a gradient norm too"
        before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.train_step(batches)
    assert trainer.step == 2 and trainer.nonfinite_steps == 1
    for name, value in trainer.engine.module.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed by a non-finite step"


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (an overflow in the backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanGradientOnSteps(TvltPretrainTask):
    """Gradients made non-finite on the given optimizer steps (1-based; two micro-batches per step)."""

    bad_steps: tuple[int, ...] = ()

    def forward(self, model, batch, device, dtype):
        loss, parts, out = super().forward(model, batch, device, dtype)
        self.calls = getattr(self, "calls", 0) + 1
        if (self.calls + 1) // 2 in self.bad_steps:
            loss = _NanGradient.apply(loss)
        return loss, parts, out


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in full_state_dict(trainer.engine, rank=0).items()}


@pytest.mark.parametrize("stage", [0, 2])  # ours at stage 0, DeepSpeed's overflow check at ZeRO 1-3
def test_a_non_finite_gradient_is_skipped_and_counted_then_stops_the_run(shards, one_rank, stage):
    task = NanGradientOnSteps(model_config=tiny_task().model_config)
    task.bad_steps = (2, 4)
    trainer = make_trainer(shards, one_rank, stage=stage, max_steps=6, task=task, max_nonfinite=1)
    batches = iter(trainer.loader)
    parts, _, _ = trainer.train_step(batches)
    assert parts["skipped"] == 0 and math.isfinite(parts["loss"])
    after_one = weights(trainer)
    parts, _, _ = trainer.train_step(batches)  # step 2: finite loss, NaN gradients
    assert parts["skipped"] == 1 and math.isfinite(parts["loss"]) and trainer.nonfinite_steps == 1
    for name, value in weights(trainer).items():
        assert torch.equal(value, after_one[name]), f"{name} changed by the skipped step"
    trainer.train_step(batches)  # step 3 trains again
    assert any(not torch.equal(v, after_one[k]) for k, v in weights(trainer).items()), "step 3 updated the weights"
    assert trainer.state_dict()["nonfinite_steps"] == 1, "the count is part of the checkpoint"
    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite gradients.*2 such steps, more than optim\.max_nonfinite_steps 1"):
        trainer.train_step(batches)


def test_zero3_with_parameter_and_optimizer_offload_trains_and_restores(shards, one_rank, tmp_path):
    task = tiny_task()
    torch.manual_seed(0)
    model = task.build_model()
    loader = StreamingLoader(shards, task.batcher(model), batch_size=2)
    cfg = TrainingConfig(
        schedule=ScheduleConfig(max_steps=2, warmup_steps=1),
        parallel=ParallelConfig(num_workers=1, zero_stage=3, offload_optimizer=True, offload_params=True),
    )  # fmt: skip
    engine = build_engine(model, cfg.optim, cfg.parallel, 2, 1)
    trainer = Trainer(engine, task, loader, cfg, RunInfo(), rank=one_rank)
    before = full_state_dict(engine, rank=0)
    parts, _, norm = trainer.train_step(iter(loader))
    after = full_state_dict(engine, rank=0)
    assert math.isfinite(parts["loss"]) and norm is not None and norm > 0
    assert any(not torch.equal(before[k], after[k]) for k in before), "the offloaded optimizer updated the weights"
    trainer.save(str(tmp_path))
    trainer.step = 0
    trainer.restore(str(tmp_path))
    assert trainer.step == 1
    for name, value in full_state_dict(engine, rank=0).items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0)
