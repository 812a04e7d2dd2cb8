"""TVLT pretraining: windows of ``clips.length_s`` every ``clips.stride_s``, ``clips.frames`` frames each,
shortest edge + centre crop ``clips.size``, and each clip's audio as the TVLT log-mel spectrogram."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pipelines import manifests
from pipelines.recipes.base import Recipe
from tvlt_core import clips as clipping
from tvlt_core import input_spec
from tvlt_core.resize import FrameResize

if TYPE_CHECKING:
    from pipelines.config import AudioConfig, ClipConfig, PreprocessConfig, StorageConfig
    from pipelines.rows import SourceRow
    from pipelines.sources import Source


@dataclass(frozen=True)
class PretrainRecipe(Recipe):
    clips: ClipConfig
    audio_settings: AudioConfig

    mode: ClassVar[str] = "pretrain"
    audio: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> PretrainRecipe:
        if cfg.grounding.annotations:
            raise ValueError("grounding.annotations: given in pretrain mode, where they would be ignored")
        return cls(cfg.clips, cfg.audio)

    @property
    def frames_per_clip(self) -> int:
        return self.clips.frames

    @property
    def resize(self) -> FrameResize:
        return FrameResize("center_crop", self.clips.size)

    @property
    def sampling(self) -> str:
        return self.clips.sampling

    @property
    def requires_audio(self) -> bool:
        return self.audio_settings.missing == "quarantine"

    def plan_clips(self, duration: float) -> list[clipping.Clip]:
        c = self.clips
        return clipping.windows(duration, c.length_s, c.stride_s, c.min_length_s)

    def too_short(self, duration: float) -> str:
        return f"{duration:.3f} s of video, less than clips.min_length_s={self.clips.min_length_s}"

    def plan_rows(self, sources: list[Source], storage: StorageConfig) -> list[dict]:
        return manifests.plan_rows(sources)

    def record_fields(self, source: SourceRow, audio_rate: int, mel_frames: int) -> dict:
        audio = source.probe["audio"] or {}
        return {"audio_present": mel_frames > 0, "sample_rate": audio.get("sample_rate", audio_rate),
                "channels": audio.get("channels", 0), "mel_frames": mel_frames}

    def describe(self) -> dict:
        common = self._common()
        mel = {"sample_rate": input_spec.SAMPLE_RATE, "n_fft": input_spec.N_FFT, "hop": input_spec.HOP_LENGTH,
               "mel_bins": input_spec.NUM_MEL_BINS, "max_frames": input_spec.MAX_FRAMES, "dtype": "float16"}
        c = self.clips
        clips = {"length_s": c.length_s, "stride_s": c.stride_s, "min_length_s": c.min_length_s, "frames": c.frames,
                 "size": c.size}
        if c.sampling == "keyframe":  # exact mode's recipe (and hash) is what it was before the setting
            common["frame_sampling"] = "keyframe-nearest-segment-centre"
        return {**common, "clips": clips, "mel": mel, "missing_audio": self.audio_settings.missing}
