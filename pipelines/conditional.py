"""Conditional writes, the store's answer to two writers: create only if absent, replace only if unchanged.

    version = create(url, data, options)             # Conflict when ``url`` exists
    data, version = read(url, options)               # FileNotFoundError when absent
    version = replace(url, data, expected, options)  # Conflict when ``url`` is no longer at version ``expected``

On S3 these are the store's own conditional requests, atomic on the server: a PUT with ``If-None-Match: *``
(s3fs ``pipe_file(mode="create")``) and a PUT with ``If-Match: <ETag>`` (passed through s3fs to ``put_object``);
the version is the object's ETag, and a read is pinned to the ETag it saw (s3fs reads with ``If-Match``).
Locally the version is the sha256 of the content. ``create`` publishes a complete temporary file under the name with
link(2), which fails like ``O_EXCL`` when the name exists (so no reader ever sees a half-written object);
``replace`` compares and renames while holding flock(2) on the object's current file, which the kernel releases
when its holder dies, so a killed process never leaves the object locked (and no lock file is left behind).

A conditional request answered with a conflict although it was carried out (the reply was lost and a retry found
the object already written) is recognised by its content: when the object now holds exactly ``data``, the write
counts as done.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from contextlib import contextmanager

import fsspec

from pipelines import writer
from tvlt_core.uris import is_remote

_READ_ATTEMPTS = 3  # an object replaced between s3fs's HEAD and GET fails the pinned GET: read it again
_LOCK_ATTEMPTS = 10  # local: the name moved on to a newer file while this writer waited for the lock


class Conflict(RuntimeError):
    """The object exists (create) or was changed by someone else since it was read (replace)."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _etag(value: str) -> str:
    return value.strip('"')


def read(url: str, options: dict) -> tuple[bytes, str]:
    """``(content, version)`` of the object at ``url``; FileNotFoundError when there is none."""
    if not is_remote(url):
        with open(url, "rb") as f:
            data = f.read()
        return data, _digest(data)
    fs, path = fsspec.core.url_to_fs(url, **options)
    attempt = 1
    while True:
        fs.invalidate_cache(path)  # a listing's cached ETag may be older than the object
        try:
            with fs.open(path, "rb") as f:
                return f.read(), _etag(f.details["ETag"])
        except OSError as e:
            if e.errno != errno.EINVAL or attempt >= _READ_ATTEMPTS:
                raise
            attempt += 1


def _already_written(url: str, data: bytes, options: dict) -> str | None:
    """The object's version when it holds exactly ``data`` (our own write, acknowledged late), else None."""
    try:
        current, version = read(url, options)
    except FileNotFoundError:
        return None
    return version if current == data else None


def create(url: str, data: bytes, options: dict) -> str:
    """Write ``data`` to ``url`` unless an object is there; returns its version. Conflict when one is."""
    try:
        return _create(url, data, options)
    except FileExistsError as e:
        version = _already_written(url, data, options)
        if version is None:
            raise Conflict(f"{url} exists") from e
        return version


def _create(url: str, data: bytes, options: dict) -> str:
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url, **options)
        return _etag(fs.pipe_file(path, data, mode="create")["ETag"])  # If-None-Match: *
    tmp = writer.local_temporary(url, data)
    try:
        os.link(tmp, url)  # FileExistsError when the name is taken
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _digest(data)


def replace(url: str, data: bytes, expected: str, options: dict) -> str:
    """Write ``data`` to ``url`` if it is still at version ``expected``; returns the new version. Conflict when
    another writer changed or removed it in between (nothing is written then)."""
    try:
        return _replace(url, data, expected, options)
    except (FileNotFoundError, _Stale) as e:
        version = _already_written(url, data, options)
        if version is None:
            raise Conflict(f"{url} changed since version {expected} was read ({e or 'removed'})") from e
        return version


class _Stale(Exception):
    pass


def _replace(url: str, data: bytes, expected: str, options: dict) -> str:
    if is_remote(url):
        fs, path = fsspec.core.url_to_fs(url, **options)
        try:
            out = fs.pipe_file(path, data, IfMatch=f'"{expected}"')
        except OSError as e:  # 412 Precondition Failed (s3fs: EINVAL); a missing key is FileNotFoundError
            if isinstance(e, FileNotFoundError) or e.errno != errno.EINVAL:
                raise
            raise _Stale("its ETag differs") from e
        fs.invalidate_cache(path)
        return _etag(out["ETag"])
    with _locked(url) as f:
        current = _digest(f.read())
        if current != expected:
            raise _Stale(f"now at version {current}")
        writer.publish(url, data, {})  # temporary + rename, under the lock
    return _digest(data)


@contextmanager
def _locked(url: str):
    """The file at ``url``, open and locked (flock), still the one the name points to. A writer that waited for the
    lock while the previous holder renamed a new file over the name finds the name moved on and locks that file."""
    for _ in range(_LOCK_ATTEMPTS):
        f = open(url, "rb")  # FileNotFoundError: removed, which replace reports as a conflict
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held for one compare-and-rename: microseconds
            if os.fstat(f.fileno()).st_ino == os.stat(url).st_ino:
                yield f
                return
        finally:
            f.close()  # closing releases the lock
    raise _Stale(f"replaced {_LOCK_ATTEMPTS} times while this writer waited")
