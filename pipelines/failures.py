"""Failure classes: what a failure means for the input and for the run.

    permanent   the input itself cannot become samples (not a video, truncated, no audio, ...): quarantined with
                a reason; retried only with ``--retry-quarantined`` (after a decoder upgrade, say)
    transient   the store, the network or the node failed, not the input: throttling (503 SlowDown), 5xx, timeouts,
                connection resets, credentials the store rejects, a decoder killed from outside (SIGKILL, OOM), a
                source that changed since it was listed. Retried within the run with bounded backoff
                (``retrying``); what still fails is *deferred*: recorded with its reason, retried by the next run
    bug         anything else: the job fails with the traceback

    transient_reason(exc) -> str   the transient reason code of an exception ("" when it is not transient)
    retrying(fn, policy, what)     fn() with up to ``policy.attempts`` tries, exponential backoff with jitter

Only the standard library is imported at module level: the decoder child (``pipelines.sandbox``) imports this.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tvlt_core.redaction import redact_text

log = logging.getLogger(__name__)
T = TypeVar("T")

# Transient reason codes (deferred inputs carry one): what to look at when a run defers many inputs.
THROTTLED, STORE_ERROR, TIMEOUT, CONNECTION = "throttled", "store_error", "timeout", "connection"
CREDENTIALS, DECODER_CRASH, SOURCE_CHANGED = "credentials", "decoder_crash", "source_changed"
# Not retried within the run: reading again now would read the new version, not the listed one.
NOT_RETRIED = frozenset({SOURCE_CHANGED})

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                   "TooManyRequestsException", "RequestThrottled", "ServiceUnavailable"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AccessDenied",
                     "TokenRefreshRequired", "RequestExpired", "ExpiredTokenException", "InvalidClientTokenId",
                     "AuthFailure", "403"}
_TIMEOUT_CODES = {"RequestTimeout", "RequestTimeoutException"}


class SourceChanged(OSError):
    """The object's version is not the one its listing saw (``pipelines.pinned``): read it on the next run."""


class Transient(RuntimeError):
    """A transient failure that a stage reports as such (``reason`` is one of the codes above)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _client_error_reason(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _THROTTLE_CODES or status in (429, 503):
        return THROTTLED
    if code in _CREDENTIAL_CODES or status == 403:
        return CREDENTIALS
    if code in _TIMEOUT_CODES:
        return TIMEOUT
    if code == "PreconditionFailed" or status == 412:
        return SOURCE_CHANGED
    if status >= 500 or code in ("InternalError", "500"):
        return STORE_ERROR
    return ""


def _own_reason(exc: BaseException) -> str:
    """The reason of one exception, not looking at its causes."""
    if isinstance(exc, Transient):
        return exc.reason
    if isinstance(exc, SourceChanged) or type(exc).__name__ == "FileExpired":  # s3fs: the ETag moved mid-read
        return SOURCE_CHANGED
    if isinstance(getattr(exc, "response", None), dict):  # botocore's ClientError and its modelled subclasses
        return _client_error_reason(exc)
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, socket.timeout)) or name in ("ConnectTimeoutError", "ReadTimeoutError",
                                                                   "FSTimeoutError", "ServerTimeoutError"):
        return TIMEOUT
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return CREDENTIALS
    if isinstance(exc, ConnectionError) or name in ("EndpointConnectionError", "ConnectionClosedError",
                                                    "IncompleteRead", "ResponseParserError", "ProxyConnectionError"):
        return CONNECTION
    if module.startswith("aiohttp") or (module.startswith("botocore") and name.endswith("HTTPClientError")):
        return CONNECTION
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT,
                                                  errno.EHOSTUNREACH, errno.ENETUNREACH):
        return CONNECTION
    return ""


def transient_reason(exc: BaseException) -> str:
    """The transient reason code of ``exc`` or of an exception in its cause/context chain, else "".

    s3fs turns a store's error into ``OSError``/``PermissionError`` with the botocore error as ``__cause__``, so a
    local ``PermissionError`` stays permanent (unreadable) while a rejected credential is transient."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _own_reason(current)
        if reason:
            return reason
        current = current.__cause__ or current.__context__
    return ""


def single_try_s3fs() -> None:
    """s3fs retries some errors (timeouts, SlowDown) five times on its own, with no option to change it (a class
    attribute). One try there: retries are then botocore's per request (``storage.request_attempts``) and ours per
    operation (``failures.attempts``), and a stalled store costs a known, bounded time. Called by every process
    before it opens an S3 filesystem (``StorageConfig.options``, ``pinned.open_source``)."""
    import s3fs

    s3fs.S3FileSystem.retries = 1


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per operation; the k-th retry waits ``min(max_backoff_s, backoff_s * 2**(k-1))`` seconds
    times a random factor in [0.5, 1] (jitter, so workers throttled together do not come back together)."""

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def wait_s(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1.0)


class Retries:
    """A counter of retries made, for the run's stats (``retried``)."""

    def __init__(self):
        self.count = 0


def retrying(fn: Callable[[], T], policy: RetryPolicy, what: str, counter: Retries | None = None,
             reason_of: Callable[[BaseException], str] = transient_reason) -> T:
    """``fn()``; a transient failure (``reason_of(exc)`` non-empty) is retried up to ``policy.attempts`` tries in
    all, waiting ``policy.wait_s`` between them; the last one is raised. Permanent failures and bugs are raised
    at once, as are reasons in ``NOT_RETRIED``."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right here; anything not transient is re-raised
            reason = reason_of(exc)
            if not reason or reason in NOT_RETRIED or attempt == policy.attempts:
                raise
            wait = policy.wait_s(attempt)
            log.warning("%s: transient failure (%s: %s), attempt %d of %d; retrying in %.1f s", redact_text(what),
                        reason, redact_text(str(exc))[:300], attempt, policy.attempts, wait)
            if counter is not None:
                counter.count += 1
            time.sleep(wait)
    raise AssertionError("unreachable")
