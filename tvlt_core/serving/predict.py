"""Predictions on what a user has: video URIs (local paths, ``file://``, ``s3://`` or any fsspec URL) and
sentences, turned into model inputs exactly as preprocessing + evaluation turn them, so a served model gives the
numbers its evaluation measured.

    predictor = load_predictor(folder)        # a Hugging Face folder (config.json, model.safetensors, ...)
    predictor.predict(table)                  # pandas DataFrame in, DataFrame out

TVP grounding (``GroundingPredictor``), one output row per input row::

    in   video: str, sentence: str
    out  start_s, end_s: float64 seconds; duration_s: float64 (the video's, as preprocessing measures it)

TVLT (``ClipEmbeddingPredictor``), one output row per clip of each video (the clips preprocessing cuts)::

    in   video: str
    out  video: str, clip: int64, start_s, end_s: float64; embedding: float64 (hidden_size,) pooled cls,
         tanh(pooler(cls)); matching_score: float64 sigmoid of the matching logit of the clip's own audio and video

Where the numbers come from: the video is decoded by ``tvlt_core.media`` (decord frames at the clip's segment
centres, PyAV audio), resized by ``tvlt_core.video`` and JPEG-coded at the shards' quality, so the frames are
byte for byte those a shard of the same video holds; then the evaluator's own transform and forward pass
(``TvpEvaluator.pixels`` / ``predict``, ``TvltBatcher`` + ``TvltEvaluator.embed``) run. The preprocessing recipe
(frames, sizes, clip windows) is read from the checkpoint's ``preprocessing.json`` (the training shards' recipe,
written at export), else the preprocessing defaults.

A row that cannot be used raises ``InputError`` naming the row, the video and the reason (missing column, empty
value, object not found, not a video, no audio for TVLT, ...), before any model work for the request.
TVP regresses a segment and has no confidence output, so no score is reported for it (none would mean anything).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import torch

from tvlt_core import clips as clipping
from tvlt_core import input_spec, media, shards
from tvlt_core.hf_folder import PREPROCESSING_NAME
from tvlt_core.redaction import public_uri

log = logging.getLogger(__name__)



class InputError(ValueError):
    """A request row the model cannot use; the message names the row and why."""


@dataclass(frozen=True)
class ServingRecipe:
    """The part of a preprocessing recipe (``PreprocessConfig.recipe()``) that decides a model's inputs."""

    jpeg_quality: int = shards.JPEG_QUALITY
    grounding_frames: int = input_spec.GROUNDING_FRAMES
    grounding_size: int = input_spec.GROUNDING_SIZE
    clip_length_s: float = input_spec.CLIP_LENGTH_S
    clip_stride_s: float = input_spec.CLIP_STRIDE_S
    clip_min_length_s: float = input_spec.CLIP_MIN_LENGTH_S
    clip_frames: int = input_spec.TVLT_NUM_FRAMES
    clip_size: int = input_spec.TVLT_IMAGE_SIZE
    clip_sampling: str = "exact"  # tvlt_core.clips.SAMPLING

    @classmethod
    def from_recipe(cls, values: dict) -> ServingRecipe:
        clip, default = values.get("clips") or {}, cls()
        return cls(
            jpeg_quality=int(values.get("jpeg_quality", default.jpeg_quality)),
            grounding_frames=int(values.get("frames", default.grounding_frames)),
            grounding_size=int(values.get("longest_edge", default.grounding_size)),
            clip_length_s=float(clip.get("length_s", default.clip_length_s)),
            clip_stride_s=float(clip.get("stride_s", default.clip_stride_s)),
            clip_min_length_s=float(clip.get("min_length_s", default.clip_min_length_s)),
            clip_frames=int(clip.get("frames", default.clip_frames)),
            clip_size=int(clip.get("size", default.clip_size)),
            clip_sampling="keyframe" if values.get("frame_sampling", "").startswith("keyframe") else "exact",
        )  # fmt: skip

    @classmethod
    def of_folder(cls, folder: str) -> ServingRecipe:
        """The recipe saved in a checkpoint folder, or the preprocessing defaults when it saved none."""
        fs, root = fsspec.core.url_to_fs(folder)
        path = f"{root.rstrip('/')}/{PREPROCESSING_NAME}"
        if not fs.exists(path):
            log.info("%s has no %s: the preprocessing defaults decide the inputs", folder, PREPROCESSING_NAME)
            return cls()
        with fs.open(path, "r") as f:
            return cls.from_recipe(json.load(f))


def as_stored(frames: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> the same frames after the shards' JPEG round trip (what training and evaluation saw)."""
    return np.stack([shards.decode_jpeg(shards.encode_jpeg(f, quality)) for f in frames])


# --- reading one video -------------------------------------------------------------------------------------------------
@dataclass
class Video:
    """A decoded request video: its duration as preprocessing measures it, and a local path while it is open."""

    uri: str
    path: str
    duration: float
    has_audio: bool


def probe(path: str) -> tuple[float, bool]:
    """(duration in seconds rounded as the shard records it, has an audio stream); raises ValueError with a reason."""
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except FileNotFoundError:
        raise ValueError("object not found") from None
    except av.error.FFmpegError as e:
        raise ValueError(f"not a video: no demuxer recognises it ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError("the container has no video stream")
        duration = round(media.stream_duration(container, container.streams.video[0]), 6)
        if duration <= 0:
            raise ValueError("neither the stream nor the container gives a duration")
        return duration, bool(container.streams.audio)


def decode_clips(path: str, clips: list[clipping.Clip], frames: int, sampling: str = "exact") -> list[np.ndarray]:
    """uint8 (frames, H, W, 3) per clip at the clip's segment centres (``tvlt_core.clips.frame_times``), sampled as
    the shards were (``sampling``)."""
    reader, starts = media.frame_reader(path)
    if len(reader) == 0:
        raise ValueError("decord finds no frames")
    times = [clipping.frame_times(c, frames).tolist() for c in clips]
    return media.frames_at(reader, starts, times, sampling, [(c.start, c.end) for c in clips])["frames"]


# --- the request table ---------------------------------------------------------------------------------------------------
def rows_of(table: pd.DataFrame, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """The request as dicts of non-empty strings; ``InputError`` naming the first row (0-based) that is not."""
    if not isinstance(table, pd.DataFrame):
        table = pd.DataFrame(table)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"the input has no column {missing} (columns: {list(table.columns)}; expected {list(columns)})")
    rows = []
    for i, row in enumerate(table[list(columns)].itertuples(index=False)):
        for name, value in zip(columns, row):
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"row {i}: {name} must be a non-empty string, got {value!r}")
        rows.append(dict(zip(columns, row)))
    return rows


def row_error(i: int, uri: str, reason: str) -> InputError:
    return InputError(f"row {i} (video {public_uri(uri)!r}): {reason}")


class Predictor:
    """Shared by both models: open each distinct video of a request once, in order, with row-named errors."""

    columns: tuple[str, ...] = ("video",)

    def predict(self, table: pd.DataFrame) -> pd.DataFrame:
        rows = rows_of(table, self.columns)
        if not rows:
            raise InputError("the input has no rows")
        by_video: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_video.setdefault(row["video"], []).append(i)
        decoded = {}
        for uri, indices in by_video.items():  # every video is read and checked before the model runs
            try:
                decoded[uri] = self.read(uri)
            except (ValueError, OSError, RuntimeError) as e:  # decord reports unreadable files as RuntimeError
                raise row_error(indices[0], uri, str(e) or type(e).__name__) from None
        return self.run(rows, by_video, decoded)

    def read(self, uri: str):
        raise NotImplementedError

    def run(self, rows, by_video, decoded) -> pd.DataFrame:
        raise NotImplementedError


# --- TVP ---------------------------------------------------------------------------------------------------------------------
class GroundingPredictor(Predictor):
    """(video, sentence) -> (start_s, end_s, duration_s) through ``TvpEvaluator``'s transform and forward pass."""

    columns = ("video", "sentence")

    def __init__(self, evaluator, serving: ServingRecipe):
        self.evaluator, self.recipe = evaluator, serving

    def read(self, uri: str) -> tuple[float, torch.Tensor]:
        """(duration, the model's pixels) of one video: the frames a grounding shard holds, then the evaluator's."""
        with media.local_video(uri) as path:
            duration, _ = probe(path)
            (frames,) = decode_clips(path, [clipping.whole(duration)], self.recipe.grounding_frames)
        from tvlt_core.resize import resize_longest_edge

        stored = as_stored(resize_longest_edge(frames, self.recipe.grounding_size), self.recipe.jpeg_quality)
        return duration, self.evaluator.pixels(stored)

    def run(self, rows, by_video, decoded) -> pd.DataFrame:
        queries = [{"row": i, "sentence": r["sentence"], "duration": decoded[r["video"]][0],
                    "pixels": decoded[r["video"]][1]} for i, r in enumerate(rows)]  # fmt: skip
        size, out = self.evaluator.settings.batch_size, []
        with torch.no_grad():
            for s in range(0, len(queries), size):
                out += self.evaluator.predict(queries[s : s + size])
        return pd.DataFrame({
            "start_s": [float(q["predicted"][0]) for q in out],
            "end_s": [float(q["predicted"][1]) for q in out],
            "duration_s": [float(q["duration"]) for q in out],
        })  # fmt: skip


# --- TVLT --------------------------------------------------------------------------------------------------------------------
class ClipEmbeddingPredictor(Predictor):
    """video -> per clip (pooled embedding, matching score) through ``TvltBatcher`` and ``TvltEvaluator.embed``."""

    def __init__(self, evaluator, serving: ServingRecipe):
        self.evaluator, self.recipe = evaluator, serving

    def read(self, uri: str) -> list[tuple[clipping.Clip, shards.DecodedSample]]:
        """The clips preprocessing cuts from this video, each as the sample its shard would hold."""
        from tvlt_core.audio import log_mel, min_samples
        from tvlt_core.video import resize_center_crop

        r = self.recipe
        with media.local_video(uri) as path:
            duration, has_audio = probe(path)
            if not has_audio:
                raise ValueError("the video has no audio stream; TVLT matches a clip's audio with its frames")
            clips = clipping.windows(duration, r.clip_length_s, r.clip_stride_s, r.clip_min_length_s)
            if not clips:
                raise ValueError(f"{duration:.3f} s of video, shorter than one clip ({r.clip_min_length_s} s)")
            frames = decode_clips(path, clips, r.clip_frames, r.clip_sampling)
            samples, rate, offset = media.decode_audio(path)
        out = []
        for clip, clip_frames in zip(clips, frames):
            first, last = clipping.sample_range(clip, rate, offset)
            wave = samples[first:last]
            if len(wave) < min_samples(rate):
                raise ValueError(f"clip {clip.index} ({clip.start:.3f}-{clip.end:.3f} s) holds too little audio")
            mel = log_mel(wave, rate).numpy().astype(np.float16).astype(np.float32)  # as a shard stores it
            stored = as_stored(np.stack([resize_center_crop(f, r.clip_size) for f in clip_frames]), r.jpeg_quality)
            out.append((clip, shards.DecodedSample(key=f"{clip.index}", frames=stored, record={}, mel=mel)))
        return out

    def run(self, rows, by_video, decoded) -> pd.DataFrame:
        ev, rng = self.evaluator, random.Random(0)  # the batcher draws nothing with matching off
        records, items = [], []
        for row in rows:
            for clip, sample in decoded[row["video"]]:
                records.append({"video": row["video"], "clip": clip.index, "start_s": clip.start, "end_s": clip.end})
                items.append(ev.batcher.prepare(sample, rng))
        pooled, logits = [], []
        with torch.no_grad():
            for s in range(0, len(items), ev.settings.batch_size):
                batch = ev.batcher.collate(items[s : s + ev.settings.batch_size], rng)
                p, g = ev.embed({k: v.to(ev.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                pooled.append(p)
                logits.append(g)
        pooled_all, logits_all = torch.cat(pooled).double(), torch.cat(logits).double()
        table = pd.DataFrame(records)
        table["embedding"] = [v.numpy() for v in pooled_all]
        table["matching_score"] = torch.sigmoid(logits_all).numpy()
        return table


def load_predictor(folder: str) -> Predictor:
    """The predictor for the checkpoint in ``folder``, chosen by its config.json ``model_type``."""
    from tvlt_core.eval.runner import model_type
    from tvlt_core.eval.settings import EvalSettings
    from tvlt_core.eval.tvlt import TvltEvaluator
    from tvlt_core.eval.tvp import TvpEvaluator

    serving = ServingRecipe.of_folder(folder)
    if model_type(folder) == "tvp":
        return GroundingPredictor(TvpEvaluator.load(folder, EvalSettings()), serving)
    evaluator = TvltEvaluator.load(folder, EvalSettings())
    if not evaluator.model.config.task_matching:
        raise ValueError(f"{folder}: a TVLT checkpoint without the matching head cannot score audio-video matching")
    return ClipEmbeddingPredictor(evaluator, serving)
