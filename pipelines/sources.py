"""Sources and listing: what ``--input`` names, as a sorted list of ``Source`` objects with their version.

``--input`` is one of
    a folder            /data/videos, s3://bucket/prefix        every file below it with a video extension
    a glob              s3://bucket/raw/*/clip_*.mp4            what the pattern matches (any extension)
    a list file         s3://bucket/lists/train.csv|.jsonl|.parquet
                        one row per video: a URI column (``sources.uri_column``), optional ``size``/``etag``/``mtime``
                        columns and any extra columns, which are copied into every sample's record

A source is identified by its credential-free URL (``Source.uri``); a URL that carries credentials (presigned,
``user:pw@``) is kept apart as ``Source.read_url``, for reading only (``tvlt_core.redaction.public_uri``).

A source's version is (size, etag, mtime) as the store reports it (and its VersionId on a versioned bucket); an
incremental run reprocesses a source when any of them changed, and reads it at that version (``pipelines.pinned``).
Listing runs in the driver: it is a few paginated LIST calls, not work to distribute.
"""

from __future__ import annotations

import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

from pipelines.config import SourceConfig, StorageConfig
from tvlt_core import shards
from tvlt_core.uris import is_remote
from tvlt_core.redaction import public_uri, redact, redact_text

log = logging.getLogger(__name__)
LIST_FILE_SUFFIXES = (".csv", ".jsonl", ".parquet")
_VERSION_COLUMNS = ("size", "etag", "mtime", "version_id")


class InputNotFound(FileNotFoundError):
    """``--input`` names nothing: a configuration error, not a bad input."""


@dataclass(frozen=True)
class Source:
    """One input object. ``uri`` is its credential-free full URL (local paths are absolute): the source's identity,
    and what every output records. ``read_url`` is what the readers open when it differs (a presigned URL or one
    with userinfo, from a list file): it is never written anywhere. ``extra`` holds list-file columns."""

    uri: str
    size: int
    etag: str = ""
    mtime: str = ""
    version_id: str = ""  # S3 VersionId where the bucket is versioned and the listing gave one: what is read
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    read_url: str = field(default="", hash=False, compare=False, repr=False)

    @property
    def sid(self) -> str:
        return shards.source_id(self.uri)

    def version(self) -> dict:
        return {"size": self.size, "etag": self.etag, "mtime": self.mtime}


def join(base: str, name: str) -> str:
    """``base`` folder URL + ``name`` (no double slashes, works for local paths and s3://)."""
    return base.rstrip("/") + "/" + name.lstrip("/")


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    return fsspec.core.url_to_fs(url, **storage.options(url))


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if is_remote(fs.unstrip_protocol(path)) else path


def _text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else str(value)


def _from_info(fs: fsspec.AbstractFileSystem, info: dict) -> Source:
    """A Source from an fsspec ``info`` dict: s3fs gives ETag/LastModified, local files size/mtime."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    mtime = _text(info.get("LastModified") or info.get("mtime") or info.get("last_modified") or "")
    return Source(uri=_full_uri(fs, info["name"]), size=int(info.get("size") or 0), etag=etag, mtime=mtime,
                  version_id=str(info.get("VersionId") or ""))


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    return path.lower().endswith(tuple(e.lower() for e in extensions))


def _list_tree(url: str, cfg: SourceConfig, storage: StorageConfig) -> list[Source]:
    fs, root = filesystem(url, storage)
    if any(ch in root for ch in "*?["):
        found = fs.glob(root, detail=True)
    else:
        if not fs.exists(root):
            raise InputNotFound(f"input {redact_text(url)}: no such folder or object")
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
        found = {p: i for p, i in found.items() if _has_extension(p, cfg.extensions)}
    files = [info for info in found.values() if info.get("type", "file") == "file"]
    return [_from_info(fs, info) for info in files]


def _read_table(url: str, storage: StorageConfig):
    fs, path = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        if path.endswith(".parquet"):
            return pyarrow.parquet.read_table(f)
        if path.endswith(".jsonl"):
            return pyarrow.json.read_json(f)
        return pyarrow.csv.read_csv(f)


def _list_file(url: str, cfg: SourceConfig, storage: StorageConfig) -> list[Source]:
    table = _read_table(url, storage)
    if cfg.uri_column not in table.column_names:
        raise ValueError(
            f"sources.uri_column={cfg.uri_column!r}: list file {redact_text(url)} has columns {table.column_names}"
        )
    base = posixpath.dirname(url)
    rows, missing_version = [], []
    for row in table.to_pylist():
        url = str(row.pop(cfg.uri_column))
        if "://" not in url and not url.startswith("/"):
            url = join(base, url)  # relative to the list file, like paths in a playlist
        version = {k: row.pop(k, None) for k in _VERSION_COLUMNS}
        # plain JSON types only (they go into records), secret-named columns masked
        extra = redact(json.loads(json.dumps(row, default=_text)))
        rows.append((url, version, extra))
        if version["size"] is None:
            missing_version.append(url)
    # Objects the list gives no size for are looked up (HEAD requests, in parallel: it is I/O, not work).
    infos = _stat_all(missing_version, storage)
    sources = []
    for url, version, extra in rows:
        uri = public_uri(url)
        read_url = url if url != uri else ""
        if url in infos:
            info = infos[url]
            if info is None:
                # Listed but absent: it still goes through the pipeline and is quarantined with a reason.
                sources.append(Source(uri=uri, size=-1, extra=extra, read_url=read_url))
                continue
            version = {"size": info.size, "etag": info.etag, "mtime": info.mtime, "version_id": info.version_id}
        sources.append(Source(uri=uri, size=int(version["size"]), etag=_text(version["etag"]),
                              mtime=_text(version["mtime"]), version_id=_text(version["version_id"]), extra=extra,
                              read_url=read_url))
    return sources


def _stat_all(uris: list[str], storage: StorageConfig) -> dict[str, Source | None]:
    def stat(url: str) -> Source | None:
        fs, path = filesystem(url, storage)
        try:
            return _from_info(fs, fs.info(path))
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(uris, pool.map(stat, uris)))


def list_sources(url: str, cfg: SourceConfig, storage: StorageConfig) -> list[Source]:
    """Every source ``url`` names, deduplicated and sorted by source id (the stable order work is planned in)."""
    path = url.split("?", 1)[0]
    sources = _list_file(url, cfg, storage) if path.endswith(LIST_FILE_SUFFIXES) else _list_tree(url, cfg, storage)
    unique = {s.uri: s for s in sources}
    if len(unique) < len(sources):
        log.warning("input %s lists %d URIs twice; each is processed once", redact_text(url),
                    len(sources) - len(unique))
    return sorted(unique.values(), key=lambda s: (s.sid, s.uri))
