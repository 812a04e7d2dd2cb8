"""Temporal grounding annotations: Charades-STA text files and ActivityNet Captions JSON, to queries per video.

    Charades-STA   one query per line:  ``VIDEO_ID START END##SENTENCE``   (seconds; the sentence may hold '#')
    ActivityNet    ``{"v_ID": {"duration": D, "timestamps": [[s, e], ...], "sentences": [...]}, ...}``

Both parse to ``{video_id: [Query, ...]}``. A video matches a source when its id equals the source file's name
without extension (ActivityNet ids also match without their ``v_`` prefix, as the videos are often saved).
Malformed lines are errors that name the file and line: annotations are configuration, not data to skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import defaultdict
from dataclasses import asdict, dataclass

import fsspec

from pipelines.config import GroundingConfig, StorageConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    sentence: str
    start: float  # seconds
    end: float  # seconds
    duration: float | None = None  # the annotated video duration, when the format gives one (ActivityNet)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_charades_sta(text: str, name: str = "<text>") -> dict[str, list[Query]]:
    """``VIDEO_ID START END##SENTENCE`` per line; blank lines are skipped."""
    out: dict[str, list[Query]] = defaultdict(list)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3 or not sentence.strip():
            raise ValueError(f"{name}:{lineno}: expected 'VIDEO_ID START END##SENTENCE', got {line!r}")
        try:
            start, end = float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"{name}:{lineno}: START and END must be seconds, got {parts[1]!r} {parts[2]!r}") from None
        out[parts[0]].append(_checked(Query(sentence.strip(), start, end), name, lineno))
    return dict(out)


def parse_activitynet(data: dict, name: str = "<json>") -> dict[str, list[Query]]:
    """ActivityNet Captions: per video ``duration``, ``timestamps`` [[start, end], ...] and ``sentences``."""
    out: dict[str, list[Query]] = {}
    for video_id, entry in data.items():
        try:
            stamps, sentences, duration = entry["timestamps"], entry["sentences"], float(entry["duration"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: video {video_id!r} needs 'duration', 'timestamps' and 'sentences'") from None
        if len(stamps) != len(sentences):
            raise ValueError(f"{name}: video {video_id!r} has {len(stamps)} timestamps, {len(sentences)} sentences")
        out[video_id] = [
            _checked(Query(str(s).strip(), float(t[0]), float(t[1]), duration), name, f"{video_id}[{i}]")
            for i, (t, s) in enumerate(zip(stamps, sentences))
        ]
    return out


def _checked(query: Query, name: str, where) -> Query:
    if query.start < 0 or query.end < query.start:
        raise ValueError(f"{name}:{where}: need 0 <= start <= end, got start={query.start} end={query.end}")
    return query


def load(cfg: GroundingConfig, storage: StorageConfig) -> dict[str, list[Query]]:
    """Every annotation file of ``cfg``, merged; a video in several files keeps all its queries, in file order."""
    merged: dict[str, list[Query]] = defaultdict(list)
    for url in cfg.annotations:
        with fsspec.open(url, "r", **storage.options(url)) as f:
            text = f.read()
        name = posixpath.basename(url)
        parsed = parse_charades_sta(text, name) if cfg.format == "charades_sta" else parse_activitynet(
            json.loads(text), name)
        for video_id, queries in parsed.items():
            merged[video_id].extend(queries)
    log.info("annotations: %d queries for %d videos from %d file(s)", sum(map(len, merged.values())), len(merged),
             len(cfg.annotations))
    return dict(merged)


def video_id(uri: str) -> str:
    """The id a source's annotations are filed under: its file name without extension."""
    return posixpath.splitext(posixpath.basename(uri.split("?", 1)[0]))[0]


def queries_for(uri: str, table: dict[str, list[Query]]) -> list[Query]:
    vid = video_id(uri)
    return table.get(vid) or table.get(f"v_{vid}") or (table.get(vid[2:]) if vid.startswith("v_") else None) or []


def queries_hash(queries: list[Query]) -> str:
    """Changes when a video's queries change, so an incremental run redoes the video's sample."""
    return hashlib.sha256(json.dumps([q.to_json() for q in queries], sort_keys=True).encode()).hexdigest()[:16]
