"""Configuration of the preprocessing job: one small dataclass per component, validated before any work starts.

    python jobs/preprocess.py --input URL --output URL --mode pretrain --clips.length_s 10 --shards.target_bytes 1e8

Each component receives only its own section: the recipes get ``ClipConfig``/``GroundingConfig``, the writer
``ShardConfig``, the Ray graph ``ResourceConfig``, listing and I/O ``StorageConfig``, probe and decoder
``LimitConfig``, retries ``FailureConfig``. ``mode_recipe()`` is the mode's recipe, which the stages ask what the
mode makes of a video (``pipelines.recipes``), and ``recipe()`` its description: the part of the configuration that
decides the bytes of a sample; its hash is stored in every sample and in the manifest, and an output folder refuses
a second recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pipelines.failures import RetryPolicy, single_try_s3fs
from tvlt_core import input_spec  # torch-free: the Ray workers that import this config need not import torch
from tvlt_core.shards import Mode
from tvlt_core.clips import SAMPLING
from tvlt_core.input_spec import TVLT_IMAGE_SIZE, TVLT_NUM_FRAMES

if TYPE_CHECKING:
    from pipelines.recipes import Recipe

# The longest clip whose spectrogram fits the model: 2048 frames of 512 samples at 44.1 kHz (about 23.8 s).
MAX_CLIP_S = input_spec.MAX_FRAMES * input_spec.HOP_LENGTH / input_spec.SAMPLE_RATE
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")


@dataclass
class StorageConfig:
    """How to reach ``s3://`` URLs. Credentials normally come from the standard AWS environment variables
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or an instance role; the two key
    fields exist for stores that need explicit keys and are masked wherever the config is logged or written."""

    endpoint_url: str | None = None  # any S3-compatible store: MinIO, Ceph, moto, ...
    region: str | None = None
    anon: bool = False
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    # Each request: botocore retries it (5xx, throttling, resets, timeouts) up to request_attempts tries in all;
    # a whole operation (a probe, a download, a commit) is then retried by ``failures.attempts``.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # no byte for this long: the request fails (a stalled connection)
    request_attempts: int = 3
    version_aware: bool = False  # versioned bucket: sources are read by the VersionId their listing saw

    def __post_init__(self):
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError(f"storage.connect_timeout_s={self.connect_timeout_s}, storage.read_timeout_s="
                             f"{self.read_timeout_s}: must be > 0")
        if not 1 <= self.request_attempts <= 10:
            raise ValueError(f"storage.request_attempts={self.request_attempts}: must be in [1, 10]")

    def options(self, url: str) -> dict:
        """fsspec storage options for ``url`` (empty for local paths)."""
        if not url.startswith(("s3://", "s3a://")):
            return {}
        opts: dict = {"anon": self.anon}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", self.region)) if v}
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.aws_access_key_id and self.aws_secret_access_key:
            opts.update(key=self.aws_access_key_id, secret=self.aws_secret_access_key)
        # Retries are botocore's (per request, counted by request_attempts) and ours (per operation).
        single_try_s3fs()
        opts.update(config_kwargs={
            "connect_timeout": self.connect_timeout_s, "read_timeout": self.read_timeout_s,
            "retries": {"mode": "standard", "total_max_attempts": self.request_attempts}})
        if self.version_aware:
            opts["version_aware"] = True
        return opts


@dataclass
class SourceConfig:
    """What counts as an input when ``--input`` is a folder, a glob or a list file (.csv, .jsonl, .parquet)."""

    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    uri_column: str = "uri"  # list files: the column holding each video's URI (relative URIs: to the list file)


@dataclass
class ClipConfig:
    """pretrain mode: windows of ``length_s`` every ``stride_s``; per clip ``frames`` frames at the segment
    centres, shortest edge + centre crop ``size``, and the clip's audio as the TVLT log-mel spectrogram.
    A trailing window (or a whole video) shorter than ``length_s`` is kept when it lasts at least ``min_length_s``.
    ``sampling``: ``exact`` (the frame on screen at each segment centre) or ``keyframe`` (the clip's keyframe nearest
    each centre: several times faster to decode, frames up to half a keyframe interval off; README, "Frame
    sampling")."""

    length_s: float = input_spec.CLIP_LENGTH_S
    stride_s: float = input_spec.CLIP_STRIDE_S
    min_length_s: float = input_spec.CLIP_MIN_LENGTH_S
    frames: int = TVLT_NUM_FRAMES
    size: int = TVLT_IMAGE_SIZE
    sampling: str = "exact"

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise ValueError(f"clips.sampling={self.sampling!r}: must be one of {', '.join(SAMPLING)}")
        if not 0 < self.length_s <= MAX_CLIP_S + 1e-9:
            raise ValueError(
                f"clips.length_s={self.length_s}: must be in (0, {MAX_CLIP_S:.3f}] s, the longest audio a "
                f"{input_spec.MAX_FRAMES}-frame spectrogram holds"
            )
        if self.stride_s <= 0:
            raise ValueError(f"clips.stride_s={self.stride_s}: must be > 0")
        if not 0 < self.min_length_s <= self.length_s:
            raise ValueError(f"clips.min_length_s={self.min_length_s}: must be in (0, clips.length_s]")
        # A log-mel frame needs more than N_FFT / 2 samples at 44.1 kHz (reflect padding).
        shortest = (input_spec.N_FFT // 2 + 1) / input_spec.SAMPLE_RATE
        if self.min_length_s < shortest:
            raise ValueError(f"clips.min_length_s={self.min_length_s}: a spectrogram needs at least {shortest:.3f} s")
        if self.frames < 1 or self.size < 16:
            raise ValueError(f"clips.frames={self.frames}, clips.size={self.size}: need frames >= 1 and size >= 16")


@dataclass
class GroundingConfig:
    """grounding mode: ``frames`` frames uniformly over the whole video, longest edge ``size`` (not padded), and
    every query of the video from the annotation files, stored once per video."""

    annotations: list[str] = field(default_factory=list)  # local paths or URLs
    format: Literal["charades_sta", "activitynet"] = "charades_sta"
    frames: int = input_spec.GROUNDING_FRAMES
    size: int = input_spec.GROUNDING_SIZE

    def __post_init__(self):
        if self.frames < 1 or self.size < 16:
            raise ValueError(f"grounding.frames={self.frames}, grounding.size={self.size}: need >= 1 and >= 16")


@dataclass
class AudioConfig:
    """pretrain mode, a video without a (decodable) audio stream: quarantine it, or keep it with a silent
    spectrogram and ``audio.present = false`` in its record so training turns its audio mask off."""

    missing: Literal["quarantine", "silent"] = "quarantine"


@dataclass
class ShardConfig:
    """Shards close at the source boundary before ``target_bytes`` would be exceeded (one source's samples are
    never split across shards, so a source larger than the target gets a shard of its own)."""

    target_bytes: int = 256 * 1024**2

    def __post_init__(self):
        if self.target_bytes < 1024:
            raise ValueError(f"shards.target_bytes={self.target_bytes}: must be at least 1024")


@dataclass
class LimitConfig:
    """Caps on what one input may cost, checked against each source's size (listing) and probe (before decoding).
    An input over a cap is quarantined as permanent with a reason naming the cap: ``too_large`` (``max_bytes``,
    and anything that does not fit in ``decoder_memory_gib`` while it decodes), ``resolution_too_high``
    (``max_pixels``, displayed width x height), ``too_long`` (``max_duration_s`` of video). The defaults admit
    DCI 4K and three hours; 0 turns a cap off (except the decoder's memory limit)."""

    max_bytes: int = 16 * 1024**3
    max_pixels: int = 4096 * 2160
    max_duration_s: float = 3 * 3600.0
    # The decoder child's data segment (RLIMIT_DATA): about 150 MB when idle, up to 0.5 GB decoding 4K frames.
    decoder_memory_gib: float = 1.0

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_duration_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"limits.{name}={getattr(self, name)}: must be >= 0 (0: no cap)")
        if self.decoder_memory_gib < 0.25:
            raise ValueError(f"limits.decoder_memory_gib={self.decoder_memory_gib}: must be >= 0.25, the decoder "
                             "child needs about 0.15 GiB before it decodes anything")

    def over(self, size: int, width: int, height: int, duration: float) -> tuple[str, str] | None:
        """(reason, message) of the first cap an input of these numbers exceeds, or None."""
        if self.max_bytes and size > self.max_bytes:
            return "too_large", f"{size:,} bytes, more than limits.max_bytes={self.max_bytes:,}"
        if self.max_pixels and width * height > self.max_pixels:
            return "resolution_too_high", (f"{width}x{height} = {width * height:,} pixels a frame, more than "
                                           f"limits.max_pixels={self.max_pixels:,}")
        if self.max_duration_s and duration > self.max_duration_s:
            return "too_long", f"{duration:.1f} s of video, more than limits.max_duration_s={self.max_duration_s:g}"
        return None


@dataclass
class ResourceConfig:
    """Ray resources. The defaults fit a 2-core, 24 GiB machine and scale with the cluster unchanged: as many
    decoders as the cluster's CPUs hold at ``decode_cpus`` each. A decoder actor also probes its sources and runs
    log-mel, encode and write for its rows (about 25% of its time), so one decoder keeps one core busy.

    A decoder reserves ``decode_memory_gib``; it holds one segment of at most ``clips_per_row`` clips at a time, so
    memory per decoder stays bounded however long a video is."""

    decoders: int = 0  # 0: cluster CPUs // decode_cpus
    decode_cpus: float = 0.9
    decode_memory_gib: float = 1.5
    decode_timeout_s: float = 300.0  # per call; a hung decoder is killed and counts as a crash
    clips_per_row: int = 16
    sources_per_block: int = 1
    object_store_gib: float = 2.0  # only when this job starts a local Ray (RAY_ADDRESS unset)
    local_cpus: int = 0  # local Ray: 0 = every core of the machine
    scratch_dir: str = ""  # remote sources are downloaded here before decoding (default: the system temp dir)

    def __post_init__(self):
        if self.decoders < 0 or self.decode_cpus <= 0:
            raise ValueError("resources.decoders must be >= 0 and resources.decode_cpus > 0")
        if self.decode_timeout_s <= 0 or self.clips_per_row < 1 or self.sources_per_block < 1:
            raise ValueError("resources.decode_timeout_s, clips_per_row and sources_per_block must be positive")
        if self.object_store_gib < 0.1:
            raise ValueError(f"resources.object_store_gib={self.object_store_gib}: Ray needs at least 0.1 GiB")


@dataclass
class FailureConfig:
    """Transient failures (``pipelines.failures``): each operation (listing, a probe, a download, a part or shard
    upload, a manifest commit) gets ``attempts`` tries, waiting ``backoff_s``, doubling, at most ``max_backoff_s``
    (times a jitter factor in [0.5, 1]). The run exits non-zero when more than ``max_failed_share`` of the inputs
    it processed ended deferred or quarantined (0 inputs processed: never)."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_failed_share: float = 0.5
    crash_runs: int = 3  # a decoder crash deferred this many runs in a row is quarantined (the file is the cause)

    def __post_init__(self):
        if self.crash_runs < 1:
            raise ValueError(f"failures.crash_runs={self.crash_runs}: must be >= 1")
        if not 1 <= self.attempts <= 20:
            raise ValueError(f"failures.attempts={self.attempts}: must be in [1, 20]")
        if not 0 <= self.backoff_s <= self.max_backoff_s <= 600:
            raise ValueError(f"failures.backoff_s={self.backoff_s}, failures.max_backoff_s={self.max_backoff_s}: "
                             "need 0 <= backoff_s <= max_backoff_s <= 600")
        if not 0 <= self.max_failed_share <= 1:
            raise ValueError(f"failures.max_failed_share={self.max_failed_share}: must be in [0, 1]")

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.attempts, self.backoff_s, self.max_backoff_s)


@dataclass
class LeaseConfig:
    """One writer per output folder (``pipelines/lease.py``): a run holds ``<output>/_lease.json`` while it works and
    rewrites it every ``renew_s``; a run that dies stops renewing, and its lease expires ``ttl_s`` after the last
    renewal, after which the next run takes the folder over and resumes. A shorter TTL frees a crashed run's folder
    sooner; it must leave room for a few renewals that fail or are slow (S3 throttling, a busy driver)."""

    ttl_s: float = 300.0
    renew_s: float = 60.0

    def __post_init__(self):
        if self.ttl_s < 2:
            raise ValueError(f"lease.ttl_s={self.ttl_s}: must be at least 2 s")
        if not 0 < self.renew_s <= self.ttl_s / 3:
            raise ValueError(f"lease.renew_s={self.renew_s}: must be in (0, lease.ttl_s / 3 = {self.ttl_s / 3:g}] "
                             "s, so that two failed renewals in a row still leave the lease valid")


@dataclass
class PreprocessConfig:
    """``python jobs/preprocess.py --input URL --output URL --mode {pretrain,grounding}``."""

    input: str = ""
    output: str = ""
    mode: Mode = "pretrain"
    sources: SourceConfig = field(default_factory=SourceConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    limits: LimitConfig = field(default_factory=LimitConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    failures: FailureConfig = field(default_factory=FailureConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    dry_run: bool = False
    fail_on_quarantine: bool = False
    retry_quarantined: bool = False  # plan the quarantined sources again (after a decoder upgrade, say)
    progress: bool = True  # Ray Data's progress bars

    def __post_init__(self):
        if not self.input:
            raise ValueError("input: required, a folder, glob or list file URL (local or s3://)")
        if not self.output:
            raise ValueError("output: required, the folder URL the shards and manifest.json go to")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError(f"output={self.output!r}: must differ from input")
        self.mode_recipe()  # the mode's own rules (``pipelines.recipes``): grounding needs annotations, say

    def mode_recipe(self) -> Recipe:
        """The recipe of this mode (``pipelines.recipes``): what the stages make of each video."""
        from pipelines import recipes  # they import the stage-side modules, which import this config

        return recipes.for_config(self)

    def recipe(self) -> dict:
        """Everything that decides a sample's bytes (``Recipe.describe``): stored in the manifest, hashed into
        every sample."""
        return self.mode_recipe().describe()
