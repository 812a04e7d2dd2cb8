"""Shard writing: deterministic tar bytes, atomic publication on local folders and object stores, shard assembly.

Two kinds of tar are written:
    parts    ``_work/gen-GGGGGG/run-<run id>/<source id>-<segment>.tar``: the samples of one decoded segment,
             written by the pipeline's last stage as soon as the segment is encoded (so workers, not the driver,
             move the bytes)
    shards   ``shard-GGGGGG-NNNNN.tar``: the parts of consecutive sources in plan order, concatenated by a Ray task
             (``concatenate``) once every source in the shard is done; the driver then lists it in manifest.json

Both appear under their final name only when complete: a local file is written to a hidden temporary name in the
same folder and renamed (``os.replace`` is atomic on POSIX); an object store object becomes visible only when its
upload completes. Tar members carry fixed metadata (mtime 0, mode 0444, no owner), so the same samples give the
same bytes and the same sha256 on every run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator

import fsspec

from tvlt_core.uris import is_remote

TMP_MARK = ".tmp-"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info


def tar_bytes(samples: Iterable[dict[str, bytes]]) -> bytes:
    """Samples as ``shards.encode_sample`` builds them (``__key__`` + ext -> bytes) -> one tar, entries in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext != "__key__":
                    tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


def tar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for info in tar:
            yield info.name, tar.extractfile(info).read()


def part_url(work_url: str, sid: str, seg: int) -> str:
    """Where segment ``seg`` of source ``sid`` is spooled: fixed by the pair, so a retried write replaces it."""
    return f"{work_url.rstrip('/')}/{sid}-{seg:04d}.tar"


def read_bytes(url: str, storage_options: dict) -> bytes:
    with fsspec.open(url, "rb", **storage_options) as f:
        return f.read()


def publish(url: str, data: bytes, storage_options: dict) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or all of it."""
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        fs.pipe_file(path, data)  # one PUT (or a multipart upload completed at once): never half an object
        return
    tmp = local_temporary(url, data)
    try:
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def local_temporary(url: str, data: bytes) -> str:
    """Write ``data`` durably to a hidden temporary beside the local path ``url``; returns the temporary's path, for
    the caller to rename (or link) to ``url`` and to remove."""
    folder, name = os.path.split(url)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def publish_text(url: str, text: str, storage_options: dict) -> None:
    publish(url, text.encode(), storage_options)


def remove(urls: Iterable[str], storage_options: dict) -> None:
    urls = list(urls)
    if not urls:
        return
    fs, _ = fsspec.core.url_to_fs(urls[0], **storage_options)
    paths = [fsspec.core.url_to_fs(u, **storage_options)[1] for u in urls]
    existing = [p for p in paths if fs.exists(p)]
    if existing:
        fs.rm(existing)


def abort_uploads(folder_url: str, storage_options: dict) -> int:
    """Abort the multipart uploads still open under ``folder_url`` (what a writer killed mid-upload leaves: parts
    that cost storage and never become an object). Local folders have none. Returns how many were aborted."""
    if not is_remote(folder_url):
        return 0
    fs, path = fsspec.core.url_to_fs(folder_url, **storage_options)
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for upload in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return len(uploads)


def remove_tree(url: str, storage_options: dict) -> None:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str, storage_options: dict) -> list[str]:
    """Full URLs of the files directly in folder ``url`` (hidden temporaries included)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if not fs.exists(path):
        return []
    return [url.rstrip("/") + "/" + os.path.basename(info["name"].rstrip("/")) for info in fs.ls(path, detail=True)
            if info.get("type") == "file"]


def concatenate(part_urls: list[str], shard_url: str, storage_options: dict, drop_prefixes: tuple[str, ...] = ()
                ) -> dict:
    """Write the members of ``part_urls`` (in order) as one tar at ``shard_url``, skipping members whose name
    starts with one of ``drop_prefixes``. Returns ``{"bytes", "sha256", "keys"}`` of the written shard.

    Members go through a local temporary file, so a shard of any size costs disk, not memory.
    """
    keys: list[str] = []
    with tempfile.NamedTemporaryFile(prefix="shard-", suffix=".tar") as tmp:
        with tarfile.open(fileobj=tmp, mode="w", format=tarfile.USTAR_FORMAT) as out:
            for url in part_urls:
                for name, data in tar_members(read_bytes(url, storage_options)):
                    if drop_prefixes and name.startswith(drop_prefixes):
                        continue
                    key = name.split(".", 1)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
                    out.addfile(_member(name, len(data)), io.BytesIO(data))
        tmp.flush()
        tmp.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: tmp.read(1 << 20), b""):
            digest.update(block)
        size = tmp.tell()
        _publish_file(tmp.name, shard_url, storage_options)
    return {"bytes": size, "sha256": digest.hexdigest(), "keys": keys}


def _publish_file(local: str, url: str, storage_options: dict) -> None:
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        fs.put_file(local, path)  # multipart above a threshold; the object appears when the upload completes
        return
    folder, name = os.path.split(url)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(local, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
