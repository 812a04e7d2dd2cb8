"""TVP grounding: one sample per video, ``grounding.frames`` frames uniformly over the whole of it, longest edge
``grounding.size`` (not padded: the loader pads), and every query of the video from the annotation files, stored
once per video. No audio. Frames are always sampled exactly: a segment's edges must be where the annotation puts
them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pipelines import manifests
from pipelines.annotations import load as load_annotations
from pipelines.annotations import queries_for
from pipelines.recipes.base import Recipe
from tvlt_core import clips as clipping
from tvlt_core.resize import FrameResize

if TYPE_CHECKING:
    from pipelines.config import GroundingConfig, PreprocessConfig, StorageConfig
    from pipelines.rows import SourceRow
    from pipelines.sources import Source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundingRecipe(Recipe):
    grounding: GroundingConfig

    mode: ClassVar[str] = "grounding"
    audio: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> GroundingRecipe:
        if not cfg.grounding.annotations:
            raise ValueError("grounding.annotations: grounding mode needs at least one annotation file")
        if cfg.clips.sampling != "exact":
            raise ValueError(f"clips.sampling={cfg.clips.sampling!r}: grounding samples exact frames (a segment's "
                             "edges must be where the annotation puts them); keyframe sampling is for pretraining")
        return cls(cfg.grounding)

    @property
    def frames_per_clip(self) -> int:
        return self.grounding.frames

    @property
    def resize(self) -> FrameResize:
        return FrameResize("longest_edge", self.grounding.size)

    def plan_clips(self, duration: float) -> list[clipping.Clip]:
        return [clipping.whole(duration)]

    def too_short(self, duration: float) -> str:
        return f"{duration:.3f} s of video: nothing to sample"

    def plan_rows(self, sources: list[Source], storage: StorageConfig) -> list[dict]:
        """The listed videos that have queries in the annotation files, each row with its queries."""
        table = load_annotations(self.grounding, storage)
        matched = {s.uri: [q.to_json() for q in queries_for(s.uri, table)] for s in sources}
        annotated = [s for s in sources if matched[s.uri]]
        if len(annotated) < len(sources):
            log.info("grounding: %d listed video(s) have no queries in the annotation files and are skipped",
                     len(sources) - len(annotated))
        return manifests.plan_rows(annotated, matched)

    def record_fields(self, source: SourceRow, audio_rate: int, mel_frames: int) -> dict:
        return {"queries": source.queries}

    def describe(self) -> dict:
        return {**self._common(), "frames": self.grounding.frames, "longest_edge": self.grounding.size}
