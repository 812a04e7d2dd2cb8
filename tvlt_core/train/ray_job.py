"""Ray Train glue: the function every worker runs, and the ``TorchTrainer`` that starts N of them.

    job = TrainJob(task, cfg, RunInfo(run_name, to_dict(cfg), dataset), files=..., snapshot=pinned)
    result = launch(job)    # jobs/training.py does both for the two training jobs

Ray. ``launch`` connects to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), or starts a local Ray
bounded to this machine. In Ray 2.60 Train V2 is the default: callbacks such as ``MLflowLoggerCallback`` are
rejected, so MLflow is written from rank 0 inside the training function.

Faults and resuming. Each checkpoint is reported with ``ray.train.report(checkpoint=...)`` to
``<checkpoint.storage_path>/<run name>``; when a worker dies, ``FailureConfig(max_failures)`` restarts the whole
group and every rank restores the latest checkpoint (``ray.train.get_checkpoint``). Launching again with the same
run name and storage path makes Ray find the run's checkpoint snapshot and resume it, finished or crashed.

Data. ``pin_data`` (in the launcher, before any worker) keeps the run's data snapshot in its run folder and refuses
shards of another mode or recipe; the ``TrainJob`` carries the snapshot, so workers, restarted ones included,
never read the live manifest. Failures that would recur on a restart (a damaged shard, too many skipped samples,
a stalled loader, too many non-finite steps: ``loop.DETERMINISTIC_FAILURES``) reach every rank at the same step;
the ranks then end normally, rank 0 leaving the reason in ``<run folder>/stopped.json``, and ``launch`` raises
``TrainingStopped`` with it: no ``max_failures`` restart is spent on them.

Environment. Workers read S3 credentials and the MLflow address from their own environment: on a local Ray they
inherit the launching process's; on a cluster they come from the nodes (Kubernetes secrets) or the job's
runtime environment (``ray job submit --runtime-env-json '{"env_vars": {...}}'``). They are never put into the
job's config, so never into params, logs or checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec

from tvlt_core import distributed, shards
from tvlt_core.data import snapshot
from tvlt_core.data.snapshot import DataSnapshot
from tvlt_core.ray_session import connect_ray
from tvlt_core.redaction import redact
from tvlt_core.tracking import DatasetInfo, RunInfo, RunTracker, tracking_uri
from tvlt_core.train.config import DataConfig, TrainingConfig
from tvlt_core.train.tasks import Task
from tvlt_core.uris import absolute

log = logging.getLogger(__name__)

STOPPED_NAME = "stopped.json"  # in the run folder: why every rank stopped (read and removed by launch)


@dataclass
class TrainJob:
    """Everything a worker needs, picklable (Ray ships it to every worker): the job's whole config, whose sections
    go to the components that read them, and which run this is. Local ``data.manifest`` and ``work_dir`` are made
    absolute here: Ray Train workers run in their own folder, not the launcher's."""

    task: Task
    cfg: TrainingConfig  # the job's config (a subclass, with its model section): data, optim, schedule, ...
    run: RunInfo
    files: dict[str, bytes] = field(default_factory=dict)  # logged with a new run (config.yaml)
    snapshot: DataSnapshot | None = None  # the pinned shards; None: a snapshot of data.manifest taken by each rank
    tracking_uri: str = ""  # resolved by launch() from the launching environment, so all ranks agree

    def __post_init__(self):
        data = replace(self.cfg.data, manifest=absolute(self.cfg.data.manifest))
        self.cfg = replace(self.cfg, data=data, work_dir=absolute(self.cfg.work_dir))


def default_run_name(prefix: str) -> str:
    """A new run's name when none is given: ``PREFIX-YYYYmmdd-HHMMSS`` (pass it again to resume that run)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_folder(storage_path: str, run_name: str) -> str:
    """Where Ray Train keeps the run: ``<storage>/<run name>`` (checkpoints, the resolved config.yaml); local
    paths are made absolute, since workers do not share the launcher's current directory."""
    return f"{absolute(storage_path).rstrip('/')}/{run_name}"


def dataset_info(manifest_url: str) -> DatasetInfo:
    """The shards' identity for MLflow: URL, generation, recipe hash, sample and shard counts."""
    manifest = shards.load_manifest(manifest_url)
    return DatasetInfo(manifest_url, manifest.generation, manifest.recipe_hash, manifest.num_samples, len(manifest.shards))


def pin_data(data: DataConfig, run_folder_url: str, *, task: str, mode: str) -> tuple[DataSnapshot, DatasetInfo]:
    """The run's data snapshot (kept from an earlier launch unless ``data.refresh``), refused when it does not fit
    the task (``ValueError`` naming both); and its identity for MLflow, whose digest is the snapshot's."""
    snap, how = snapshot.pin(run_folder_url, absolute(data.manifest), refresh=data.refresh)
    snapshot.check_needs(snap, task=task, mode=mode, recipe_hash=data.recipe_hash)
    if how != "kept":  # only data that fits is pinned: a refused launch leaves the run free to start on other data
        snapshot.save(run_folder_url, snap)
    log.info("data: %s snapshot %s of %s (generation %d, %d samples in %d shards)", how, snap.digest, snap.folder,
             snap.generation, snap.num_samples, len(snap.shards))  # fmt: skip
    info = DatasetInfo(snap.folder, snap.generation, snap.recipe_hash, snap.num_samples, len(snap.shards), snap.digest,
                       recipe=snap.recipe)
    return snap, info


class TrainingStopped(RuntimeError):
    """Every rank stopped on a failure that would recur on a restart (``loop.DETERMINISTIC_FAILURES``)."""


def stop_marker(job: TrainJob) -> str:
    return f"{run_folder(job.cfg.checkpoint.storage_path, job.run.name)}/{STOPPED_NAME}"


def _write_stop(job: TrainJob, err: BaseException) -> None:
    with fsspec.open(stop_marker(job), "w") as f:
        f.write(json.dumps({"error": type(err).__name__, "message": str(err)}))


def _read_stop(job: TrainJob) -> str | None:
    fs, path = fsspec.core.url_to_fs(stop_marker(job))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        stopped = json.loads(f.read())
    fs.rm(path)  # a relaunch (after fixing the cause) starts clean
    return f"{stopped['error']}: {stopped['message']}"


def summary_table(job: TrainJob, metrics: dict[str, Any]) -> str:
    """The closing summary of a job: what ran, where its outputs are, and the last metrics."""
    tracked = redact(job.tracking_uri or tracking_uri(job.cfg.work_dir))
    model = job.cfg.tracking.registered_model
    rows = [
        ("run", job.run.name),
        ("checkpoints", redact(run_folder(job.cfg.checkpoint.storage_path, job.run.name))),
        ("mlflow", f"{tracked} (experiment {job.cfg.tracking.experiment})"),
        ("model", f"models:/{model}@latest" if model else "not registered (tracking.registered_model is empty)"),
    ]
    rows += [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _storage(path: str):
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig. ``s3://`` goes through s3fs, so the
    endpoint and credentials come from the same AWS_* environment as every other S3 access here."""
    if not path.startswith("s3://"):
        return absolute(path), None
    import pyarrow.fs
    import s3fs

    return path[len("s3://") :], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem()))


def _report(metrics: dict[str, Any], folder: str | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)


def train_worker(config: dict[str, Any]) -> None:
    """The training function of one rank (``train_loop_per_worker``)."""
    import ray
    import ray.train

    from tvlt_core.data.stream import StreamingLoader
    from tvlt_core.train.engine import build_engine
    from tvlt_core.train.loop import DETERMINISTIC_FAILURES, Trainer

    job: TrainJob = config["job"]
    cfg, data = job.cfg, job.cfg.data
    rank = distributed.current()  # Ray Train has set up the process group
    distributed.setup_logging(rank.rank)
    # the launcher's MLflow for everything in this worker, models:/ URIs of checkpoint.init_from included
    os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    model = job.task.build_model()
    loader = StreamingLoader(
        job.snapshot or data.manifest, job.task.batcher(model), batch_size=data.batch_size, rank=rank.rank,
        world_size=rank.world_size, num_workers=data.num_workers, seed=data.seed, shuffle_buffer=data.shuffle_buffer,
        policy=data.read_policy(),
    )  # fmt: skip
    engine = build_engine(model, cfg.optim, cfg.parallel, data.batch_size, rank.world_size)
    tracker = None
    if rank.is_main:
        tracker = RunTracker.start(
            experiment=cfg.tracking.experiment, run_name=job.run.name, params=job.run.config, dataset=job.run.dataset,
            system_metrics=cfg.tracking.system_metrics, work_dir=cfg.work_dir, files=job.files,
        )  # fmt: skip
    nodes = distributed.all_gather_object(ray.get_runtime_context().get_node_id())
    if tracker is not None:
        tracker.set_tag("tvlt.ray_nodes", str(len(set(nodes))))  # how the ranks were spread over machines
    trainer = Trainer(engine, job.task, loader, cfg, job.run, rank=rank, tracker=tracker, report=_report)
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                trainer.restore(folder)
            if tracker is not None:
                tracker.set_tag("tvlt.resumed_from_step", str(trainer.step))
        log.info(
            "%s: %d samples, %d steps per epoch per rank, %d ranks, training steps %d..%d",
            job.run.name, loader.num_samples, loader.steps_per_epoch, rank.world_size, trainer.step,
            cfg.schedule.max_steps,
        )  # fmt: skip
        summary = trainer.train()
    except DETERMINISTIC_FAILURES as err:
        # every rank is here at the same step (the loop agrees on these): end normally so that Ray Train does not
        # restart the group into the same failure; launch() raises it
        trainer.close(status="FAILED")
        if rank.is_main:
            _write_stop(job, err)
        log.error("stopped: %s", err)
        return
    except BaseException:
        trainer.close(status="FAILED")  # a restart or a relaunch sets the MLflow run running again
        raise
    trainer.close()
    if rank.is_main:
        log.info("summary:\n%s", "\n".join(f"  {k:<32} {v:.6g}" for k, v in summary.items()))


def launch(job: TrainJob):
    """Run ``job`` on ``parallel.num_workers`` Ray Train workers; returns Ray's ``Result``."""
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = job.cfg.parallel
    job.tracking_uri = job.tracking_uri or tracking_uri(job.cfg.work_dir)
    connect_ray(need_cpus=p.num_workers * p.cpus_per_worker, dashboard=True)  # a local Ray lives until the process ends
    resources = {"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker} if p.use_gpu else {})}
    storage_path, filesystem = _storage(job.cfg.checkpoint.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=resources,
            placement_strategy=p.placement_strategy,
        ),
        run_config=RunConfig(
            name=job.run.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=RayCheckpointConfig(num_to_keep=job.cfg.checkpoint.keep),
        ),
    )  # fmt: skip
    _read_stop(job)  # a stale one from an earlier launch
    result = trainer.fit()
    stopped = _read_stop(job)
    if stopped is not None:
        raise TrainingStopped(f"run {job.run.name}: {stopped}")
    return result
