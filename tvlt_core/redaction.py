"""Keep secrets out of logs, MLflow params, artifacts and manifests.

Secrets reach the jobs through the environment (AWS_*, MLFLOW_TRACKING_TOKEN, ...) or through URLs that carry
``user:password@``. Anything written for people to read goes through ``redact`` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
_SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private_key)", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@")
_QUERY_SECRET = re.compile(r"(?P<k>[?&](?:[^=&\s]*(?:token|signature|secret|password|key)[^=&\s]*)=)[^&\s]+", re.I)


def is_secret_name(name: str) -> bool:
    """True for setting names that hold credentials (``aws_secret_access_key``, ``tracking_token``, ...)."""
    return bool(_SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    """Remove passwords embedded in URLs (``s3://user:pw@host``) and secret query parameters."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['k']}{REDACTED}", text)


def redact(value: Any, name: str = "") -> Any:
    """Return a copy of ``value`` (nested dicts/lists/strings) with secret fields and URL passwords masked."""
    if name and is_secret_name(name) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
