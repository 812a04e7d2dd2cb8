"""The rows of the Ray Data graph, declared once: what each column holds, and how it travels.

    SourceRow    one per planned source: driver -> decode actor (probe, then decode)
    SegmentRow   one per segment of a source (at most ``resources.clips_per_row`` clips), inside the decode actor:
                 the decoded arrays, then the spectrograms (``DecodeStage(finish=False)`` hands these out)
    ResultRow    one per written segment, or one per failed source: decode actor -> driver, metadata only (the
                 segment's tar went to the store; the driver never sees sample bytes)

Between processes Ray Data moves rows in Arrow blocks, where a column has one type across a block. The metadata of
a row changes shape from source to source (a failed source has no probe; a grounding source has queries, a list
file's row its own columns; stages add timings as they go), so each such column travels as a JSON string, and ""
stands for none; numbers, bytes and arrays travel as themselves. ``to_row`` and ``from_row`` are the only places
that encode or decode them: a stage reads its input row once, works on the typed object and writes it once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace

import numpy as np

from tvlt_core.clips import Clip

NO_FRAMES = np.zeros((0, 1, 1, 1, 3), dtype=np.uint8)
NO_AUDIO = np.zeros(0, dtype=np.float32)
NO_BOUNDS = np.zeros(1, dtype=np.int64)


def _dump(value) -> str:
    return "" if value is None else json.dumps(value)


def _load(text: str, empty=None):
    return json.loads(text) if text else empty


def add_time(timing: dict[str, float], stage: str, seconds: float) -> None:
    """Add ``seconds`` spent in ``stage`` to a row's timing (the driver sums these over rows: where the time goes)."""
    timing[stage] = round(timing.get(stage, 0.0) + seconds, 6)


@dataclass
class SourceRow:
    """A planned source on its way through probe and decode."""

    order: int  # position in the plan: the driver packs results into shards in this order
    uri: str  # credential-free: records, manifest, logs
    read_url: str  # what to open (a presigned URL from the current listing, say); lives only in the graph
    sid: str  # the source id that names its samples and parts
    size: int  # bytes, from the listing (< 0: listed but not found)
    etag: str
    mtime: float
    version_id: str = ""  # the object version to read (a version-aware store), else ""
    extra: dict = field(default_factory=dict)  # a list file's other columns, copied into each record   (JSON)
    queries: list = field(default_factory=list)  # grounding: the video's queries                       (JSON)
    failure: dict | None = None  # why the source gives no samples {stage, reason, error, deferred}    (JSON)
    probe: dict | None = None  # the probe's findings: streams, duration, size, rotation                 (JSON)
    clips: list[Clip] = field(default_factory=list)  # the clips the recipe plans from the probe  (JSON triples)
    timing: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed by the driver  (JSON)
    retries: int = 0  # transient failures retried for this row so far

    @classmethod
    def from_plan(cls, plan_row: dict, order: int, read_url: str = "") -> SourceRow:
        """A plan row (``pipelines.manifests.plan_rows``, JSON columns ``extra`` and ``queries``) at plan position
        ``order``, read from ``read_url`` (its ``uri`` when empty)."""
        return cls(order=order, uri=plan_row["uri"], read_url=read_url or plan_row["uri"], sid=plan_row["sid"],
                   size=plan_row["size"], etag=plan_row["etag"], mtime=plan_row["mtime"],
                   version_id=plan_row.get("version_id", ""), extra=_load(plan_row.get("extra", ""), {}),
                   queries=_load(plan_row.get("queries", ""), []))  # fmt: skip

    @classmethod
    def from_row(cls, row: dict) -> SourceRow:
        return cls(order=row["order"], uri=row["uri"], read_url=row["read_url"], sid=row["sid"], size=row["size"],
                   etag=row["etag"], mtime=row["mtime"], version_id=row["version_id"], extra=_load(row["extra"], {}),
                   queries=_load(row["queries"], []), failure=_load(row["failure"]), probe=_load(row["probe"]),
                   clips=[Clip(*c) for c in _load(row["clips"], [])], timing=_load(row["timing"], {}),
                   retries=row["retries"])  # fmt: skip

    def to_row(self) -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row.update(extra=json.dumps(self.extra, sort_keys=True), queries=json.dumps(self.queries),
                   failure=_dump(self.failure), probe=_dump(self.probe),
                   clips=_dump([[c.index, c.start, c.end] for c in self.clips] if self.clips else None),
                   timing=json.dumps(self.timing))  # fmt: skip
        return row


@dataclass
class SegmentRow:
    """Up to ``clips_per_row`` clips of one source, decoded (``seg`` -1, ``n_segs`` 0: the source failed)."""

    source: SourceRow  # its own copy: timings and retries are this segment's (source-level ones on segment 0)
    seg: int
    n_segs: int
    frames: np.ndarray = field(default_factory=lambda: NO_FRAMES)  # (kept clips, T, H, W, 3) uint8
    audio: np.ndarray = field(default_factory=lambda: NO_AUDIO)  # every clip's samples, concatenated, float32
    audio_bounds: np.ndarray = field(default_factory=lambda: NO_BOUNDS)  # (clips + 1,) where each clip's audio starts
    # The decoder's report: per clip "frame_times" (s), "audio_rate" (Hz, 0: none), "audio_error" (why none),
    # "lost": {position in the segment: [reason, error]} for clips damage made undecodable.
    decoded: dict = field(default_factory=dict)
    mel: np.ndarray | None = None  # (frames, 128) float16, every clip's spectrogram concatenated (log-mel stage)
    mel_bounds: np.ndarray = field(default_factory=lambda: NO_BOUNDS)  # (clips + 1,) where each clip's mel starts

    @classmethod
    def failed_source(cls, source: SourceRow) -> SegmentRow:
        return cls(replace(source), -1, 0)

    def to_row(self) -> dict:
        row = {**self.source.to_row(), "seg": self.seg, "n_segs": self.n_segs, "frames": self.frames,
               "audio": self.audio, "audio_bounds": self.audio_bounds, "decoded": _dump(self.decoded or None)}
        if self.mel is not None:
            row.update(mel=self.mel, mel_bounds=self.mel_bounds)
        return row


@dataclass
class ResultRow:
    """What the driver learns of a segment (or of a failed source)."""

    order: int
    uri: str
    sid: str
    seg: int
    n_segs: int
    failure: dict | None  # (JSON)
    # The encode stage's account: samples, keys, clips, dropped_no_audio, lost clips, seconds, duration  (JSON)
    summary: dict | None
    timing: dict[str, float]  # (JSON)
    retries: int
    part: bytes = b""  # the segment's tar, from encode to write; never sent to the driver
    part_url: str = ""  # where write put it ("": no samples, or failed)
    part_bytes: int = 0

    @classmethod
    def of(cls, seg: SegmentRow, summary: dict | None = None, part: bytes = b"") -> ResultRow:
        s = seg.source
        return cls(order=s.order, uri=s.uri, sid=s.sid, seg=seg.seg, n_segs=seg.n_segs, failure=s.failure,
                   summary=summary, timing=s.timing, retries=s.retries, part=part)  # fmt: skip

    @classmethod
    def from_row(cls, row: dict) -> ResultRow:
        return cls(order=row["order"], uri=row["uri"], sid=row["sid"], seg=row["seg"], n_segs=row["n_segs"],
                   failure=_load(row["failure"]), summary=_load(row["summary"]), timing=_load(row["timing"], {}),
                   retries=row["retries"], part_url=row["part_url"], part_bytes=row["part_bytes"])  # fmt: skip

    def to_row(self) -> dict:
        return {"order": self.order, "uri": self.uri, "sid": self.sid, "seg": self.seg, "n_segs": self.n_segs,
                "failure": _dump(self.failure), "summary": _dump(self.summary), "timing": json.dumps(self.timing),
                "retries": self.retries, "part_url": self.part_url, "part_bytes": self.part_bytes}
