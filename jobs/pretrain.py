"""TVLT pretraining (masked autoencoding of frames and spectrograms + video-audio matching) on N DeepSpeed ZeRO
workers under Ray Train, tracked and registered in MLflow.

    python jobs/pretrain.py --config tvlt_tiny --data.manifest work/shards/pretrain        # local Ray, 2 CPU workers
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/tvlt_tiny.yaml
    python jobs/pretrain.py --config tvlt_base --data.manifest s3://bucket/shards/pretrain --tracking.run_name exp1

Relaunching with the same ``--tracking.run_name`` (and storage path) resumes that run from its latest checkpoint,
whether it crashed or finished (raise ``--schedule.max_steps`` to train a finished run further); the MLflow run
continues too. Settings: tvlt_core/train/config.py (``--optim.lr``, ``--parallel.zero_stage 3``, ...) and the
model section below; presets in jobs/configs/tvlt_*.yaml. Exit codes: 0 done, 1 training failed, 2 bad config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from jobs.cli import run
from jobs.training import model_settings, pinned_data, train
from jobs.config import parse
from tvlt_core.models.tvlt import TVLT_PRESETS, AudioMaskType, TvltConfig
from tvlt_core.train.config import TrackingConfig, TrainingConfig
from tvlt_core.train.ray_job import default_run_name, run_folder
from tvlt_core.train.tasks import TvltPretrainTask

log = logging.getLogger("pretrain")


@dataclass
class TvltModelSection:
    """The model: a size preset and the pretraining objectives (ignored sizes when ``checkpoint.init_from`` is set:
    a checkpoint brings its own config)."""

    preset: Literal["tiny", "base"] = "tiny"
    # Fields named like TvltConfig's go to the preset as they are (jobs.training.model_settings), with its defaults
    # (one definition, TvltConfig's: the reference's values).
    pixel_mask_ratio: float = TvltConfig.pixel_mask_ratio
    audio_mask_ratio: float = TvltConfig.audio_mask_ratio
    audio_mask_type: AudioMaskType = TvltConfig.audio_mask_type
    task_matching: bool = TvltConfig.task_matching
    task_mae: bool = TvltConfig.task_mae
    mismatch_prob: float = TvltPretrainTask.mismatch_prob  # share of clips shown with another clip's video (matching)

    def __post_init__(self):
        if not (self.task_matching or self.task_mae):
            raise ValueError("model.task_matching and model.task_mae are both false: nothing to train")
        for name in ("pixel_mask_ratio", "audio_mask_ratio", "mismatch_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    def build(self) -> TvltConfig:
        return TVLT_PRESETS[self.preset](**model_settings(self, TvltConfig))


@dataclass
class PretrainConfig(TrainingConfig):
    model: TvltModelSection = field(default_factory=TvltModelSection)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="tvlt-pretrain", registered_model="tvlt-pretrain")
    )

    def __post_init__(self):
        if not self.data.manifest:
            raise ValueError(
                "data.manifest: no shards given; make them with `python jobs/preprocess.py --mode pretrain "
                "--input VIDEOS --output work/shards/pretrain` and pass --data.manifest work/shards/pretrain"
            )
        if self.model.task_matching and self.data.batch_size < 2:
            raise ValueError("data.batch_size must be >= 2 for the matching task (negatives come from the batch)")


def main(argv: list[str] | None = None) -> int:
    return run_pretraining(parse(PretrainConfig, argv, prog="pretrain", description=__doc__.split("\n\n")[0]))


def run_pretraining(cfg: PretrainConfig) -> int:
    """The job without its command line (the main job calls it); the exit code above."""
    run_name = cfg.tracking.run_name or default_run_name("tvlt-pretrain")
    task = TvltPretrainTask(
        model_config=cfg.model.build(), init_from=cfg.checkpoint.init_from, mismatch_prob=cfg.model.mismatch_prob
    )
    folder = run_folder(cfg.checkpoint.storage_path, run_name)
    data, dataset = pinned_data(cfg, task, folder, prog="pretrain")
    return train(cfg, task, run_name, folder, data, dataset)


if __name__ == "__main__":
    raise SystemExit(run(main))
