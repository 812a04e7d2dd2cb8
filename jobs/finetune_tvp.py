"""TVP temporal-grounding fine-tuning (TDIoU loss) on N DeepSpeed ZeRO workers under Ray Train, tracked and
registered in MLflow with its tokenizer.

    python jobs/finetune_tvp.py --config tvp_tiny --data.manifest work/shards/grounding        # local Ray, 2 CPU workers
    ray job submit --working-dir . -- python jobs/finetune_tvp.py --config jobs/configs/tvp_tiny.yaml
    python jobs/finetune_tvp.py --config tvp_base --checkpoint.init_from /models/tvp-base --data.manifest s3://b/shards/g

Tokenizer: ``--text.tokenizer DIR`` (tokenizer.json or vocab.txt), else the one in ``checkpoint.init_from`` (a
Hugging Face folder or models:/ URI), else a WordPiece vocabulary built from the shards' query sentences (from
scratch only). It is copied to ``<storage>/<run name>/tokenizer`` for the workers and saved with every export.
Relaunching with the same ``--tracking.run_name`` resumes the run. Exit codes: 0 done, 1 failed, 2 bad config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

import fsspec

from jobs.cli import run
from jobs.training import model_settings, pinned_data, train
from jobs.config import ConfigError, parse
from tvlt_core import shards
from tvlt_core.data.snapshot import DataSnapshot
from tvlt_core.data.stream import read_shard
from tvlt_core.models.tvp import TVP_PRESETS, TvpConfig
from tvlt_core.text import DEFAULT_VOCAB_SIZE, TextTokenizer, build_vocab
from tvlt_core.tracking import resolve_model_uri
from tvlt_core.train.config import TrackingConfig, TrainingConfig
from tvlt_core.train.ray_job import default_run_name, run_folder
from tvlt_core.train.tasks import TvpGroundingTask

log = logging.getLogger("finetune_tvp")


PRESET_SHAPE = ("num_frames", "max_img_size", "visual_prompt_size")  # model settings where 0 = the preset's


@dataclass
class TvpModelSection:
    """Size preset and loss weights (sizes are ignored with ``checkpoint.init_from``: it brings its config)."""

    preset: Literal["tiny", "base"] = "tiny"
    # Input shape, 0 = the preset's: frames per video (sampled from the stored ones), the padded square frame
    # side, and the width of the visual prompt's frame border.
    num_frames: int = 0
    max_img_size: int = 0
    visual_prompt_size: int = 0
    # Fields named like TvpConfig's go to the preset as they are (jobs.training.model_settings; the shape's only when
    # not 0), with its defaults (one definition, TvpConfig's: the reference's values).
    distance_loss_weight: float = TvpConfig.distance_loss_weight
    duration_loss_weight: float = TvpConfig.duration_loss_weight
    # The reference's floors under the distance and length terms leave a model trained from scratch with no
    # gradient once its start passes its end (see tvlt_core.models.tvp.tvp_loss); 0 keeps a gradient everywhere.
    distance_loss_floor: float = TvpConfig.distance_loss_floor
    duration_loss_floor: float = TvpConfig.duration_loss_floor

    def __post_init__(self):
        if self.distance_loss_floor < 0 or self.duration_loss_floor < 0:
            raise ValueError("model.distance_loss_floor and model.duration_loss_floor must be >= 0")
        for name in PRESET_SHAPE:
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 1 (or 0 for the preset's), got {getattr(self, name)}")

    def build(self, vocab_size: int) -> TvpConfig:
        settings = {k: v for k, v in model_settings(self, TvpConfig).items() if v or k not in PRESET_SHAPE}
        return TVP_PRESETS[self.preset](**settings, vocab_size=vocab_size)


@dataclass
class TextSection:
    tokenizer: str = ""  # folder with tokenizer.json / vocab.txt; "" = the checkpoint's, or built from the shards
    max_text_length: int = TvpGroundingTask.max_text_length
    vocab_size: int = DEFAULT_VOCAB_SIZE  # when building a vocabulary from the shards

    def __post_init__(self):
        if self.max_text_length < 2 or self.vocab_size < 10:
            raise ValueError("text.max_text_length must be >= 2 and text.vocab_size >= 10")


@dataclass
class AidsSection:
    """From-scratch aids: training help outside the reference recipe, for runs without pretrained backbones (off by
    default: the tvp_base and tvp_tiny presets are the reference recipe). See ``tvlt_core.models.tvp_aids``."""

    # Weight of the word-segment loss: the visual tokens predict, for each token found in exactly one of the
    # video's sentences, that sentence's segment (0 = off). Only training uses it; exports hold no trace of it.
    word_segment_weight: float = TvpGroundingTask.word_segment_weight
    # Weight of the query-token loss: each query token no other sentence of the video has predicts, from its hidden
    # state halfway up the encoder, the query's segment (0 = off).
    query_token_weight: float = TvpGroundingTask.query_token_weight

    def __post_init__(self):
        for name in ("word_segment_weight", "query_token_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"aids.{name} must be >= 0 (0 = off), got {getattr(self, name)}")


@dataclass
class FinetuneConfig(TrainingConfig):
    model: TvpModelSection = field(default_factory=TvpModelSection)
    text: TextSection = field(default_factory=TextSection)
    aids: AidsSection = field(default_factory=AidsSection)
    tracking: TrackingConfig = field(
        default_factory=lambda: TrackingConfig(experiment="tvp-grounding", registered_model="tvp-grounding")
    )

    def __post_init__(self):
        if not self.data.manifest:
            raise ValueError(
                "data.manifest: no shards given; make them with `python jobs/preprocess.py --mode grounding ...` "
                "and pass --data.manifest FOLDER"
            )


def query_sentences(data: DataSnapshot) -> list[str]:
    """Every query sentence in the pinned shards (reads only the JSON records' bytes, decodes no image)."""
    sentences = []
    for url, entry in zip(data.urls(), data.shards):
        for raw in read_shard(url, entry, verify="length"):
            sentences += [q["sentence"] for q in json.loads(raw[shards.JSON_EXT]).get("queries", [])]
    return sentences


def prepare_tokenizer(cfg: FinetuneConfig, folder: str, data: DataSnapshot) -> TextTokenizer:
    """The run's tokenizer, saved to ``folder`` (kept from an earlier attempt of the same run, so a resumed run
    tokenises exactly as before)."""
    fs, root = fsspec.core.url_to_fs(folder)
    if fs.exists(f"{root}/tokenizer.json") or fs.exists(f"{root}/vocab.txt"):
        return TextTokenizer.from_folder(folder, cfg.text.max_text_length)
    source = cfg.text.tokenizer or cfg.checkpoint.init_from
    if source.startswith("models:/"):
        source = resolve_model_uri(source, cfg.work_dir)
    if source:
        tokenizer = TextTokenizer.from_folder(source, cfg.text.max_text_length)
    else:
        sentences = query_sentences(data)
        if not sentences:
            raise ConfigError(f"finetune_tvp: no query sentences in {cfg.data.manifest}; are these grounding shards?")
        tokenizer = TextTokenizer.from_vocab(build_vocab(sentences, cfg.text.vocab_size), cfg.text.max_text_length)
        log.info("built a %d-token vocabulary from %d query sentences", tokenizer.vocab_size, len(sentences))
    tokenizer.save(folder)
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    return run_finetuning(parse(FinetuneConfig, argv, prog="finetune_tvp", description=__doc__.split("\n\n")[0]))


def run_finetuning(cfg: FinetuneConfig) -> int:
    """The job without its command line (the main job calls it); the exit code above."""
    run_name = cfg.tracking.run_name or default_run_name("tvp-grounding")
    folder = run_folder(cfg.checkpoint.storage_path, run_name)
    # the data is pinned and checked before the tokenizer: a vocabulary is built from the pinned shards only
    data, dataset = pinned_data(cfg, TvpGroundingTask(), folder, prog="finetune_tvp")
    tokenizer = prepare_tokenizer(cfg, f"{folder}/tokenizer", data)
    task = TvpGroundingTask(
        model_config=cfg.model.build(vocab_size=tokenizer.vocab_size), tokenizer_dir=f"{folder}/tokenizer",
        max_text_length=cfg.text.max_text_length, init_from=cfg.checkpoint.init_from,
        word_segment_weight=cfg.aids.word_segment_weight, query_token_weight=cfg.aids.query_token_weight,
    )  # fmt: skip
    return train(cfg, task, run_name, folder, data, dataset)


if __name__ == "__main__":
    raise SystemExit(run(main))
