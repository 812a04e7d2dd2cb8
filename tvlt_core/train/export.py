"""The end of a training run: its weights as a Hugging Face folder (the task's config, exported weights and files,
the model card, the preprocessing recipe serving needs), logged to MLflow as a model and registered."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tvlt_core import distributed
from tvlt_core.hf_folder import PREPROCESSING_NAME
from tvlt_core.tracking import RunInfo, RunTracker, model_card
from tvlt_core.train.config import TrackingConfig
from tvlt_core.train.engine import full_state_dict
from tvlt_core.train.tasks import Task


def export_and_register(
    engine, task: Task, tracking: TrackingConfig, run: RunInfo, *, rank: distributed.RankInfo,
    tracker: RunTracker | None, step: int, results: dict[str, float], artifact_path: str,
) -> str | None:
    """Consolidate the weights (ZeRO shards gathered), write the folder on rank 0, log it to MLflow and register it
    as ``tracking.registered_model``, with a model card naming ``run``, its config and its data. Every rank must
    call (the gathering is a collective). Returns the registered version on rank 0 (None elsewhere, or without a
    tracker)."""
    state = full_state_dict(engine, rank=rank.rank)
    version = None
    if rank.is_main and tracker is not None:
        card = model_card(
            task=task.name, run_name=run.name, run_id=tracker.run_id, step=step, dataset=run.dataset,
            config=run.config, results=results,
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            folder = str(Path(tmp) / "checkpoint")  # the folder's name inside the MLflow model's artifacts
            files = {**task.export_files(), "README.md": card.encode()}
            if run.dataset is not None and run.dataset.recipe:  # how serving turns a video into inputs
                files[PREPROCESSING_NAME] = json.dumps(dict(run.dataset.recipe), indent=1, sort_keys=True).encode()
            engine.module.save_pretrained(folder, state_dict=state, extra_files=files)  # its own config and layout
            version = tracker.export_model(
                folder, registered_model=tracking.registered_model, aliases=tracking.aliases,
                description=card, artifact_path=artifact_path, step=step,
            )  # fmt: skip
    distributed.barrier()
    return version
