"""Keep secrets out of logs, MLflow params, artifacts, manifests and shards.

Secrets reach the jobs through the environment (AWS_*, MLFLOW_TRACKING_TOKEN, ...), through settings whose name
says so (``aws_secret_access_key``), or inside URLs: userinfo (``s3://user:password@host``, ``https://TOKEN@host``)
and signed-URL query parameters (S3 presigned ``X-Amz-Signature`` / ``X-Amz-Credential`` /
``X-Amz-Security-Token``, GCS ``X-Goog-*``, Azure SAS ``sig``, CloudFront ``Signature``/``Policy``).

Two tools, for two jobs:
- ``redact`` / ``redact_text`` mask secrets in anything written for people to read (configs, logs, error text);
- ``public_uri`` gives the credential-free identity of an object's URL: what a source is recorded as everywhere
  (sample records, manifest, quarantine, stats), so the record holds no secret and a re-signed URL of the same
  object is the same source with the same sample keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Setting names are split into words (snake_case, kebab-case, dots, camelCase), so "text.tokenizer" is not a secret
# while "auth_token", "MLFLOW_TRACKING_TOKEN" and "secretAccessKey" are.
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "token", "tokens", "credential",
                 "credentials", "apikey", "sig", "signature"}
_SECRET_KEY_QUALIFIERS = {"access", "api", "private", "secret", "signing", "account", "sas"}
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# Userinfo: the user has no ':' '/' '@'; a password may hold '/' and '@' (people write them unescaped), so it runs
# to the last '@' that is followed by a host. A bare user (no password) is a token (``https://TOKEN@host``).
_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+)(?::(?P<pw>[^\s]*?))?@(?=[^\s/@?#]+(?:[/:?#\s]|$))")
_QUERY_PARAM = re.compile(r"(?P<k>[?&;](?P<name>[^=&;\s#]+)=)(?P<v>[^&;\s#]*)")
_SIGNED_PREFIXES = ("x-amz-", "x-goog-")  # every parameter of an S3 or GCS signature belongs to it
_AZURE_SAS = {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "sip", "si", "skoid", "sktid", "skt", "ske",
              "sks", "skv", "sdd", "rscc", "rscd", "rsce", "rscl", "rsct"}
_CLOUDFRONT = {"signature", "policy", "key-pair-id", "expires"}


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    """True for setting names that hold credentials (``aws_secret_access_key``, ``tracking_token``, ``apiKey``)."""
    words = _words(name)
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(w in ("key", "keys") and i > 0 and words[i - 1] in _SECRET_KEY_QUALIFIERS for i, w in enumerate(words))


def _is_secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(_SIGNED_PREFIXES) or is_secret_name(name) or lowered in _CLOUDFRONT


def _mask_userinfo(m: re.Match) -> str:
    if m["pw"] is not None:
        return f"{m['scheme']}{m['user']}:{REDACTED}@"
    return f"{m['scheme']}{REDACTED}@"


def redact_text(text: str) -> str:
    """Mask URL userinfo secrets (``s3://user:***@host``, ``https://***@host``) and secret query parameters."""
    text = _USERINFO.sub(_mask_userinfo, text)
    return _QUERY_PARAM.sub(lambda m: f"{m['k']}{REDACTED}" if _is_secret_param(m["name"]) and m["v"] else m[0], text)


def redact(value: Any, name: str = "") -> Any:
    """A copy of ``value`` (nested dicts/lists/strings) with secret-named fields (lists of them too) and URL
    secrets masked."""
    if name and is_secret_name(name) and value not in (None, ""):
        if isinstance(value, (list, tuple)):
            return type(value)(REDACTED if v not in (None, "") else v for v in value)
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def public_uri(uri: str) -> str:
    """``uri`` without credentials: no userinfo, no signature or secret query parameters (other parameters, such as
    an S3 ``versionId``, stay, in their order). Local paths and plain URLs come back unchanged."""
    if "://" not in uri:
        return uri
    uri = _USERINFO.sub(lambda m: m["scheme"], uri)
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    params = parse_qsl(parts.query, keep_blank_values=True)
    azure = any(k.lower() == "sig" for k, _ in params)
    kept = [(k, v) for k, v in params if not (_is_secret_param(k) or (azure and k.lower() in _AZURE_SAS))]
    return urlunsplit(parts._replace(query=urlencode(kept)))
