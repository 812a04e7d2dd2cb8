"""What kind of place a path or URL names, in one spelling for every job: a local file (a plain path or a
``file://`` URL), an object in a store fsspec reaches (``s3://``, ``gs://``, ...), or a registered model
(``models:/NAME@ALIAS``). Only the standard library: the preprocessing decoder child imports it."""

from __future__ import annotations

import os


def is_remote(uri: str) -> bool:
    """An fsspec URL other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The path of a local ``file://`` URL or plain path."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers and actors do not share the launcher's current directory); URLs
    and ``models:/`` URIs as given."""
    return uri if "://" in uri or uri.startswith("models:/") else os.path.abspath(uri)
