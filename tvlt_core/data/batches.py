"""Per-task sample transforms and collation: decoded shard samples -> the model's keyword arguments.

TVLT pretraining (``TvltBatcher``), per batch::

    pixel_values        (B, T, 3, S, S) float32 in [-1, 1]   T = num_frames, S = image_size
    pixel_mask          (B, T * (S / P)^2)                    1 on patches of real frames
    audio_values        (B, 1, A, 128) float32                A = longest clip rounded up to 16 frames
    audio_mask          (B, A / 16 * 8)                        1 on patches holding real frames (all 0: no audio)
    pixel_values_mixed  (B, T, 3, S, S)                        the video shown with each clip's audio for matching
    pixel_mask_mixed    (B, T * (S / P)^2)
    labels              (B, 1) float32                         1 when pixel_values_mixed[i] is clip i's own video
    keys                list[str]                              sample keys, for tracing

TVP grounding (``TvpBatcher``), per batch::

    pixel_values        (B, T, 3, S, S) float32               the TVP processor's frames (BGR, padded to S)
    input_ids           (B, L) int64                           one query per sample, padded to L
    attention_mask      (B, L) int64
    labels              (B, 3) float32                         duration, start, end in seconds
    keys, sentences     list[str]
    word_segments       (B, V, 2) float32                      with ``aids=True``, the targets of the from-scratch
    word_segment_mask   (B, V) float32                          aids (``tvlt_core.models.tvp_aids``): V = vocabulary
    query_token_mask    (B, L) float32                          size; 1 on the query's tokens no other sentence has
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tvlt_core import audio, video
from tvlt_core.models.tvp_aids import query_token_mask, word_segment_targets
from tvlt_core.text import TextTokenizer
from tvlt_core.shards import DecodedSample, key_source

log = logging.getLogger(__name__)


def uniform_indices(available: int, wanted: int, *, repeat: bool = False) -> np.ndarray:
    """``wanted`` frame indices spread evenly over ``available`` frames. With fewer frames than wanted: all of them
    (the model masks the missing ones), or with ``repeat`` some frames twice (for models without a frame mask)."""
    if available <= wanted and not repeat:
        return np.arange(available)
    return np.linspace(0, available - 1, wanted).round().astype(int)


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, 3, H, W) -> (T, 3, size, size). Only small presets train on frames smaller than the stored 224 px."""
    if frames.shape[-1] == size and frames.shape[-2] == size:
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class TvltBatcher:
    """Frames, spectrograms and matching pairs for ``TvltForPreTraining``.

    mismatch_prob: share of clips whose audio is shown with another source video's clip for the matching task (the
    published recipe uses 0.5). Set ``matching=False`` when the model's ``task_matching`` is off.
    """

    image_size: int
    num_frames: int
    patch_size: int
    max_audio_frames: int
    matching: bool = True
    mismatch_prob: float = 0.5

    def prepare(self, sample: DecodedSample, rng: random.Random) -> dict[str, Any]:
        frames = sample.frames[uniform_indices(len(sample.frames), self.num_frames)]
        pixels = _resize(video.normalize(frames), self.image_size)
        if sample.mel is not None:
            mel = torch.from_numpy(sample.mel[: self.max_audio_frames])
        else:  # a clip without audio: one patch row of silence (-1 after normalisation), masked off in collate
            mel = torch.full((audio.TIME_PATCH, audio.NUM_MEL_BINS), -1.0)
        return {"key": sample.key, "pixels": pixels, "mel": mel, "silent": sample.mel is None}

    def collate(self, items: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        pixel_values, pixel_mask = video.pad_videos(
            [it["pixels"] for it in items], num_frames=self.num_frames, patch_size=self.patch_size
        )
        audio_values, audio_mask = audio.pad_batch([it["mel"] for it in items])
        audio_mask[torch.tensor([it["silent"] for it in items])] = 0.0  # nothing to attend to or reconstruct
        batch = {
            "pixel_values": pixel_values,
            "pixel_mask": pixel_mask,
            "audio_values": audio_values,
            "audio_mask": audio_mask,
            "keys": [it["key"] for it in items],
        }
        if self.matching:
            shown = self.draw_pairs([key_source(it["key"]) for it in items], rng)
            batch["pixel_values_mixed"] = pixel_values[shown]
            batch["pixel_mask_mixed"] = pixel_mask[shown]
            batch["labels"] = (shown == torch.arange(len(items))).float().unsqueeze(1)
        return batch

    def draw_pairs(self, sources: list[str], rng: random.Random) -> torch.Tensor:
        """(B,) index of the video shown with each clip's audio: itself, or (with ``mismatch_prob``) a clip of another
        source video. Clips of the same source share class, look and rhythm, so one is no negative; it is used only
        when every clip of the batch comes from one source."""
        batch_size = len(sources)
        shown = torch.arange(batch_size)
        if batch_size < 2:
            return shown  # no other clip to pair with; config validation asks for batches of 2 or more
        for i in range(batch_size):
            if rng.random() < self.mismatch_prob:
                others = [j for j in range(batch_size) if sources[j] != sources[i]]
                others = others or [j for j in range(batch_size) if j != i]
                shown[i] = others[rng.randrange(len(others))]
        return shown


@dataclass
class TvpBatcher:
    """Frames, one query per video and its segment for ``TvpForVideoGrounding``.

    A shard sample holds every query of its video (the 48 frames are stored once); each time the video is drawn
    one of its queries is picked at random, so an epoch sees each video once and, over epochs, all its queries.
    """

    tokenizer: TextTokenizer
    image_size: int
    num_frames: int
    aids: bool = False  # also the from-scratch aids' targets (tvlt_core.models.tvp_aids)

    def prepare(self, sample: DecodedSample, rng: random.Random) -> dict[str, Any]:
        queries = sample.record.get("queries") or []
        if not queries:
            raise KeyError("queries: not a grounding sample (were the shards made with --mode grounding?)")
        chosen = rng.randrange(len(queries))
        query = queries[chosen]
        frames = sample.frames[uniform_indices(len(sample.frames), self.num_frames, repeat=True)]
        duration = float(sample.record["duration"])
        item = {
            "key": sample.key,
            "pixels": video.tvp_preprocess(frames, self.image_size),
            "sentence": query["sentence"],
            "label": [duration, float(query["start"]), float(query["end"])],
        }
        if self.aids:
            ids = [self.tokenizer.word_ids(q["sentence"]) for q in queries]
            item["word_segments"] = word_segment_targets(
                ids, [(float(q["start"]) / duration, float(q["end"]) / duration) for q in queries],
                self.tokenizer.vocab_size,
            )  # fmt: skip
            item["own_ids"] = ids[chosen].difference(*(x for i, x in enumerate(ids) if i != chosen))
        return item

    def collate(self, items: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
        text = self.tokenizer([it["sentence"] for it in items])
        batch = {
            "pixel_values": torch.stack([it["pixels"] for it in items]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.float32),
            "keys": [it["key"] for it in items],
            "sentences": [it["sentence"] for it in items],
        }
        if self.aids:
            batch["word_segments"] = torch.stack([it["word_segments"][0] for it in items])
            batch["word_segment_mask"] = torch.stack([it["word_segments"][1] for it in items])
            batch["query_token_mask"] = query_token_mask(text["input_ids"], [it["own_ids"] for it in items])
        return batch
