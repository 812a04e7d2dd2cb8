"""The shard contract between ``pipelines/`` (writer) and training/evaluation (reader).

Shards are standard WebDataset tars: the files of one sample are adjacent and share a key (the part of the file
name before the first dot), so stock ``webdataset`` and ``tar`` read them. Keys are stable ids derived from the
source URI and the clip index, never sequence numbers, so re-runs produce the same keys.

Per sample (``KEY.EXT``):
    frame000.jpg ... frameNNN.jpg   JPEG q90 RGB frames. pretrain: 8 frames, 224x224 (shortest edge 224 + centre
                                    crop, TVLT recipe). grounding: 48 frames, longest edge 448, not padded.
    mel.npy                         pretrain only: float16 (time, 128) normalised log-mel, ``tvlt_core.audio.log_mel``;
                                    absent when the clip has no audio and the config allows silent clips
                                    (``audio_present`` false: the loader substitutes silence and masks the audio off).
    json                            record (flat): ``uri``, ``size``, ``etag``, ``mtime``, ``extra`` (list-file
                                    columns); ``clip``, ``start``, ``end`` (s), ``frame_times`` (s); ``fps``,
                                    ``duration``, ``width``, ``height`` (as displayed), ``rotation``;
                                    ``audio_present``, ``sample_rate``, ``channels``, ``mel_frames``; ``frames``;
                                    ``recipe`` (hash), ``mode``. Grounding samples also hold ``queries``:
                                    [{"sentence", "start", "end"}] (s) and ``duration``.
One grounding sample per video holds all its queries, so 48 frames are stored once however many queries a video has.

Per output folder: ``manifest.json`` (``Manifest``), ``quarantine.jsonl`` (``QuarantineRecord`` per line) and
``stats.json``. A shard is listed in the manifest only after its bytes are fully written and renamed into place;
``quarantine.jsonl`` and ``stats.json`` are views of the manifest, rewritten after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
from PIL import Image

FORMAT = "tvlt-shards/1"
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
STATS_NAME = "stats.json"
MEL_EXT = "mel.npy"
JSON_EXT = "json"
JPEG_QUALITY = 90
Mode = Literal["pretrain", "grounding"]


def frame_ext(i: int) -> str:
    return f"frame{i:03d}.jpg"


def source_id(uri: str) -> str:
    """Stable 16-hex id of a source object (its URI without credentials or query)."""
    return hashlib.sha1(uri.split("?", 1)[0].encode()).hexdigest()[:16]


def shard_name(generation: int, index: int) -> str:
    """Stable shard file name: the generation that wrote it and its index within that generation."""
    return f"{shard_prefix(generation)}{index:05d}.tar"


def shard_prefix(generation: int) -> str:
    """What every shard name of ``generation`` starts with."""
    return f"shard-{generation:06d}-"


def shard_index(name: str) -> int:
    """The index within its generation of a shard named by ``shard_name``."""
    return int(name[-len("00000.tar") : -len(".tar")])


def generation_folder(generation: int) -> str:
    """The name of a generation's work folder (its plan and spooled parts) under the output's ``_work/``."""
    return f"gen-{generation:06d}"


def sample_key(uri: str, clip_index: int) -> str:
    """Stable WebDataset key: ``<source id>_<clip index>``; no dots (WebDataset splits keys at the first dot)."""
    return f"{source_id(uri)}_{clip_index:04d}"


def key_source(key: str) -> str:
    """The source id of a sample key (``sample_key``'s inverse, less the clip index)."""
    return key.rsplit("_", 1)[0]


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Hash of the preprocessing recipe (canonical JSON): samples made by different recipes never mix silently."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# --- sample encoding ------------------------------------------------------------------------------------------------
def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(key: str, frames: np.ndarray, record: dict, mel: np.ndarray | None = None) -> dict[str, bytes]:
    """Build the WebDataset entries of one sample.

    frames: uint8 (T, H, W, 3) RGB; mel: (time, 128), stored as float16; record: JSON-serialisable dict.
    Returns ``{"__key__": key, ext: bytes, ...}`` in the order the entries go into the tar.
    """
    sample: dict[str, Any] = {"__key__": key}
    for i, frame in enumerate(frames):
        sample[frame_ext(i)] = encode_jpeg(frame)
    if mel is not None:
        sample[MEL_EXT] = encode_npy(np.asarray(mel, dtype=np.float16))
    sample[JSON_EXT] = json.dumps(record, sort_keys=True).encode()
    return sample


@dataclass
class DecodedSample:
    key: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    record: dict
    mel: np.ndarray | None  # float32 (time, 128) or None for a silent clip


def decode_sample(sample: dict[str, Any]) -> DecodedSample:
    """Inverse of ``encode_sample`` for a dict of raw bytes as ``webdataset`` yields it."""
    names = sorted(k for k in sample if k.startswith("frame") and k.endswith(".jpg"))
    frames = np.stack([decode_jpeg(sample[n]) for n in names])
    mel = decode_npy(sample[MEL_EXT]).astype(np.float32) if MEL_EXT in sample else None
    raw = sample[JSON_EXT]
    record = json.loads(raw if isinstance(raw, (str, bytes)) else bytes(raw))
    return DecodedSample(key=sample["__key__"], frames=frames, record=record, mel=mel)


# --- manifest -------------------------------------------------------------------------------------------------------
@dataclass
class ShardEntry:
    name: str  # file name relative to the output folder
    samples: int
    bytes: int
    generation: int
    sha256: str = ""


@dataclass
class Generation:
    """One run's worth of new or changed sources. ``finished`` stays empty until every planned source is committed;
    a restart resumes the unfinished generation from its plan (``plan``, relative to the output folder)."""

    id: int
    started: str
    finished: str = ""
    inputs: int = 0  # sources planned
    quarantined: int = 0
    deferred: int = 0  # transient failures (the store, the network, a killed decoder): the next run retries them
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    plan: str = ""
    attempts: int = 1  # 1 + restarts after a kill
    retired: list[str] = field(default_factory=list)  # older shards rewritten without this generation's changed sources


@dataclass
class QuarantineRecord:
    """One line of ``quarantine.jsonl``: an input that gave no samples, where it failed and why; or, with ``clip``
    set, one clip lost to damage in a source whose other clips were kept (``start``/``end`` in seconds)."""

    uri: str
    stage: str  # listing | probe | decode | log_mel | encode
    reason: str  # short code for the summary: not_a_video, no_audio, too_short, decoder_crash, ...
    error: str  # the readable detail
    generation: int = 0
    size: int = 0
    etag: str = ""
    mtime: str = ""
    clip: int | None = None
    start: float | None = None
    end: float | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> QuarantineRecord:
        return cls(**json.loads(line))


@dataclass
class Manifest:
    """``manifest.json``: the committed shards of an output folder and how they were made."""

    mode: Mode
    recipe: dict
    recipe_hash: str
    format: str = FORMAT
    shards: list[ShardEntry] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    # source URI -> {"size", "etag", "mtime", "generation", "status": "ok" | "quarantined" | "deferred", "samples",
    #                "shard", "annotations" (grounding: hash of the video's queries), "stage", "reason", "error",
    #                "deferrals" (deferred: how many runs in a row),
    #                "lost_clips": [{"clip", "start", "end", "reason", "error"}] (clips lost to damage)}
    sources: dict[str, dict] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def generation(self) -> int:
        return self.generations[-1].id if self.generations else 0

    @property
    def pending(self) -> Generation | None:
        """The generation a killed run left unfinished, if any."""
        return self.generations[-1] if self.generations and not self.generations[-1].finished else None

    def quarantine(self, status: str = "quarantined") -> list[QuarantineRecord]:
        """Every source whose latest attempt was quarantined (or has another ``status``: "deferred"), in URI order."""
        return [
            QuarantineRecord(uri=uri, stage=s.get("stage", ""), reason=s.get("reason", ""), error=s.get("error", ""),
                             generation=s.get("generation", 0), size=s.get("size", 0), etag=s.get("etag", ""),
                             mtime=s.get("mtime", ""))
            for uri, s in sorted(self.sources.items()) if s.get("status") == status
        ]

    def lost_clips(self) -> list[QuarantineRecord]:
        """Every clip lost to damage in a source that kept its other clips, in URI and clip order."""
        return [
            QuarantineRecord(uri=uri, stage="decode", reason=c["reason"], error=c["error"], clip=c["clip"],
                             start=c["start"], end=c["end"], generation=s.get("generation", 0), size=s.get("size", 0),
                             etag=s.get("etag", ""), mtime=s.get("mtime", ""))
            for uri, s in sorted(self.sources.items()) if s.get("status") == "ok" for c in s.get("lost_clips", [])
        ]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r} is not {FORMAT!r}")
        data["shards"] = [ShardEntry(**s) for s in data.get("shards", [])]
        data["generations"] = [Generation(**g) for g in data.get("generations", [])]
        return cls(**data)


def manifest_url(folder_url: str) -> str:
    return folder_url.rstrip("/") + "/" + MANIFEST_NAME


def load_manifest(url: str) -> Manifest:
    """Read a manifest from a folder URL or the manifest file's URL (local path or fsspec URL)."""
    if not url.endswith(".json"):
        url = manifest_url(url)
    with fsspec.open(url, "r") as f:
        return Manifest.from_json(f.read())


def shard_urls(url: str, manifest: Manifest | None = None) -> list[str]:
    """URLs of every committed shard of the folder (or manifest) at ``url``, in manifest order."""
    manifest = manifest or load_manifest(url)
    folder = url.rsplit("/", 1)[0] if url.endswith(".json") else url.rstrip("/")
    return [f"{folder}/{s.name}" for s in manifest.shards]
