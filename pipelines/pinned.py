"""Reading a source at the version its listing saw, so a sample is never recorded under a version it is not from.

    open_source(url, storage_options, etag="", version_id="") -> binary file
    check_local(path, size, mtime)                             raises SourceChanged when the file moved on

On S3 the object is opened by ``version_id`` when the bucket is versioned and the listing gave one (s3fs with
``storage.version_aware``); otherwise its ETag is compared with the listed one when the file is opened, and every
ranged GET carries ``If-Match: <etag>`` (s3fs does this for a file opened for reading), so an object rewritten
between two reads fails with ``FileExpired`` instead of mixing versions. Either way the failure is
``source_changed``: transient, not retried within the run (that would read the new version), deferred to the next
run, whose listing sees the new version. Other URLs (https, presigned) are opened as they are.
"""

from __future__ import annotations

import os

import fsspec

from pipelines.failures import SourceChanged, single_try_s3fs


def open_source(url: str, storage_options: dict, etag: str = "", version_id: str = ""):
    if url.startswith(("s3://", "s3a://")):
        single_try_s3fs()
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if "s3" not in fs.protocol:
        return fs.open(path, "rb")
    pinned = version_id and getattr(fs, "version_aware", False)
    f = fs.open(path, "rb", version_id=version_id) if pinned else fs.open(path, "rb")
    seen = str(f.details.get("ETag", "")).strip('"')
    if etag and not pinned and seen != etag:
        f.close()
        raise SourceChanged(f"the object's ETag is {seen}, the listing saw {etag}: it changed since it was listed")
    return f


def _stat_mtime(mtime: str) -> bool:
    """Whether ``mtime`` is in the form a listing records (``os.stat``'s float), not a list file's own column."""
    try:
        float(mtime)
    except ValueError:
        return False
    return True


def check_local(path: str, size: int, mtime: str) -> None:
    """A local source must still have the listed size and mtime (as ``os.stat`` gives them; an mtime a list file
    wrote in another form is not compared)."""
    st = os.stat(path)
    if st.st_size != size or (_stat_mtime(mtime) and str(st.st_mtime) != mtime):
        raise SourceChanged(f"size/mtime are {st.st_size}/{st.st_mtime}, the listing saw {size}/{mtime}: "
                            "it changed since it was listed")
