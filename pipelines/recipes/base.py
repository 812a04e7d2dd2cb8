"""The questions a preprocessing mode answers (``Recipe``), asked by the stages and the job."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from tvlt_core import shards
from tvlt_core.clips import Clip
from tvlt_core.resize import FrameResize

if TYPE_CHECKING:
    from pipelines.config import PreprocessConfig, StorageConfig
    from pipelines.rows import SourceRow
    from pipelines.sources import Source


class Recipe(abc.ABC):
    """One mode's sample recipe: which clips a video gives, which frames each clip samples and how they are sized,
    whether audio is decoded, what each record says beyond the common fields, and the description whose hash
    every sample and the manifest carry. Frozen dataclasses in the subclasses: it travels to every Ray actor."""

    mode: ClassVar[str]  # a name of ``tvlt_core.shards.Mode``
    audio: ClassVar[bool]  # decode each clip's audio and store its log-mel spectrogram (mel.npy)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: PreprocessConfig) -> Recipe:
        """The recipe from the config's sections; a setting this mode cannot honour raises ``ValueError`` naming
        it (called while the config validates, before any work starts)."""

    @property
    @abc.abstractmethod
    def frames_per_clip(self) -> int: ...

    @property
    @abc.abstractmethod
    def resize(self) -> FrameResize:
        """How the decoder child sizes frames (``tvlt_core.resize``): only frames at shard size cross its pipe."""

    @property
    def sampling(self) -> str:
        """Which frames the decoder takes (``tvlt_core.clips.SAMPLING``)."""
        return "exact"

    @property
    def requires_audio(self) -> bool:
        """A source (or clip) without decodable audio is quarantined (dropped) rather than kept silent."""
        return False

    @abc.abstractmethod
    def plan_clips(self, duration: float) -> list[Clip]:
        """The clips of a ``duration``-second video (empty: too short for any)."""

    @abc.abstractmethod
    def too_short(self, duration: float) -> str:
        """Why a video of ``duration`` seconds gives no clip (the quarantine record's message)."""

    @abc.abstractmethod
    def plan_rows(self, sources: list[Source], storage: StorageConfig) -> list[dict]:
        """The plan rows (``pipelines.manifests.plan_rows``) of the listed sources this mode takes."""

    @abc.abstractmethod
    def record_fields(self, source: SourceRow, audio_rate: int, mel_frames: int) -> dict:
        """The fields a sample's JSON record adds to the common ones (``pipelines.stages``), from the source's row
        (its probe included), the decoded audio's rate and the clip's spectrogram length (0: none)."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """Everything that decides a sample's bytes (not where it comes from or goes to, nor resources): stored in
        the manifest, and hashed into every sample; an output folder refuses a second one."""

    def _common(self) -> dict:
        return {"format": shards.FORMAT, "mode": self.mode, "jpeg_quality": shards.JPEG_QUALITY,
                "frame_sampling": "segment-centre", "resize": "PIL-bilinear"}
