"""What both training jobs do around ``launch``: pin and check the data before any worker starts, then launch and
turn a deterministic stop into exit code 1 with its message.

    data, dataset = pinned_data(cfg, task, run_folder_url, prog="pretrain")   # ConfigError: bad or wrong data
    return train(cfg, task, run_name, run_folder_url, data, dataset)          # 0 done, 1 stopped
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jobs.config import ConfigError, dump, to_dict, write_resolved
from tvlt_core.data.snapshot import DataSnapshot
from tvlt_core.tracking import DatasetInfo, RunInfo
from tvlt_core.train.config import TrainingConfig
from tvlt_core.train.ray_job import TrainingStopped, TrainJob, launch, pin_data, summary_table
from tvlt_core.train.tasks import Task

log = logging.getLogger("training")


def model_settings(section: Any, model_config_cls: type) -> dict[str, Any]:
    """The fields of a job's model section that are fields of the model's config (same name, same meaning), for its
    size preset: a setting of the model is declared once in the section, its default taken from the config."""
    names = {f.name for f in dataclasses.fields(model_config_cls)}
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}


def pinned_data(cfg: TrainingConfig, task: Task, folder: str, *, prog: str) -> tuple[DataSnapshot, DatasetInfo]:
    """The run's data snapshot and its MLflow identity; a missing manifest, data of another mode or recipe, or
    another folder without ``data.refresh`` is a ``ConfigError`` (exit 2) naming the setting."""
    try:
        return pin_data(cfg.data, folder, task=task.name, mode=task.data_mode)
    except FileNotFoundError as e:
        raise ConfigError(f"{prog}: data.manifest {cfg.data.manifest}: no manifest.json there ({e})") from e
    except ValueError as e:
        raise ConfigError(f"{prog}: {e}") from e


def launch_and_report(job: TrainJob) -> int:
    """Run the job; print its summary table (0), or the reason every rank stopped (1)."""
    try:
        result = launch(job)
    except TrainingStopped as e:
        log.error("%s", e)
        return 1
    print(summary_table(job, result.metrics or {}), flush=True)
    return 0


def train(cfg: TrainingConfig, task: Task, run_name: str, folder: str, data: DataSnapshot, dataset: DatasetInfo) -> int:
    """The body both jobs share once their task is built: the resolved config beside the run (and inside every
    checkpoint as ``config.yaml``), the launch, the exit code of ``launch_and_report``."""
    run = RunInfo(run_name, config=to_dict(cfg), dataset=dataset)
    job = TrainJob(task, cfg, run, files={"config.yaml": dump(cfg).encode()}, snapshot=data)
    write_resolved(cfg, folder)
    return launch_and_report(job)
