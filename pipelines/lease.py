"""One writer per output folder, enforced by the store: a lease object that a run takes before any work and renews.

    <output>/_lease.json   {"holder": {"host", "pid", "run_id"}, "taken", "renewed", "expires", "ttl_s", "released"}

    with Lease(output_url, storage_options, cfg.lease) as lease:   # LeaseHeld: another run holds the folder
        ...
        lease.check()     # before every commit; LeaseLost once the lease lapsed or was taken over

Taking: no lease object -> create it (``conditional.create``: S3 ``If-None-Match: *``, locally link(2)); a lease that
expired or was released -> replace it at the version just read (S3 ``If-Match``), so of two runs taking over one
stale lease exactly one wins; a live lease -> ``LeaseHeld``, naming the holder and when its lease expires.

Keeping: a daemon thread rewrites the body every ``renew_s`` (``If-Match`` on its own last version) with a new expiry
``ttl_s`` ahead. Its waits are bounded: it sleeps on an event, and the lease's S3 client has connect and read
timeouts of a quarter of the TTL. A failed renewal is retried at the next tick. ``check`` measures validity on this process's
monotonic clock from the start of the last renewal that succeeded, less a guard of a tenth of the TTL, so a holder
stops committing before any other run may take over; a renewal answered with a conflict (someone took the lease, or
deleted it) marks the lease lost at once. A dead holder stops renewing and its lease expires ``ttl_s`` later.

Expiry is compared with the reader's wall clock: hosts writing to one folder need clocks that agree to well within
the TTL (NTP does). The manifest commit is a compare-and-swap as well (``state.Output.save``), so even a holder
whose clock lied cannot overwrite a commit made after its lease was taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from pipelines import conditional
from pipelines.config import LeaseConfig
from pipelines.sources import join
from tvlt_core.redaction import redact_text

log = logging.getLogger(__name__)
LEASE_NAME = "_lease.json"
_GUARD = 0.1  # share of the TTL kept in reserve: a commit checked this long before expiry still lands in time
_TAKE_ATTEMPTS = 3  # create -> exists -> read -> replace can lose to a concurrent taker; then the winner is read


class LeaseHeld(RuntimeError):
    """Another live run holds the output folder: this run must not start."""


class LeaseLost(RuntimeError):
    """This run's lease lapsed or was taken over: it must stop writing to the output folder."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


@dataclass
class LeaseBody:
    """What ``_lease.json`` holds: who holds the folder, since when, and until when unless renewed."""

    host: str
    pid: int
    run_id: str
    taken: str
    renewed: str
    expires: str
    ttl_s: float
    released: bool = False

    def to_bytes(self) -> bytes:
        d = asdict(self)
        holder = {k: d.pop(k) for k in ("host", "pid", "run_id")}
        return json.dumps({"holder": holder, **d}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseBody:
        d = json.loads(data)
        return cls(**d.pop("holder"), **d)

    def free(self, now: datetime) -> bool:
        return self.released or now >= datetime.fromisoformat(self.expires)

    def describe(self, now: datetime) -> str:
        left = (datetime.fromisoformat(self.expires) - now).total_seconds()
        return (f"run {self.run_id} (pid {self.pid} on {self.host}), taken {self.taken}, renewed {self.renewed}, "
                f"expires {self.expires} ({f'in {left:.0f} s' if left > 0 else f'{-left:.0f} s ago'}) unless renewed")


class Lease:
    """This run's claim on one output folder (see the module docstring). Use as a context manager."""

    def __init__(self, output_url: str, options: dict, cfg: LeaseConfig, run_id: str | None = None):
        self.url = join(output_url, LEASE_NAME)
        self.output = output_url
        self.cfg = cfg
        self.run_id = run_id or uuid.uuid4().hex[:12]
        # Bounded waits for the renewer: no S3 request it makes waits longer than a quarter of the TTL.
        timeouts = {"connect_timeout": cfg.ttl_s / 4, "read_timeout": cfg.ttl_s / 4}
        self.options = ({**options, "config_kwargs": {**timeouts, **options.get("config_kwargs", {})}}
                        if options else {})
        self.taken = ""
        self.version = ""
        self._valid_until = 0.0  # time.monotonic() after which this run must not commit
        self._lost = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- the lease body
    def _body(self, released: bool = False) -> bytes:
        now = _now()
        expires = now if released else now + timedelta(seconds=self.cfg.ttl_s)
        return LeaseBody(host=socket.gethostname(), pid=os.getpid(), run_id=self.run_id, taken=self.taken or _iso(now),
                         renewed=_iso(now), expires=_iso(expires), ttl_s=self.cfg.ttl_s,
                         released=released).to_bytes()

    def _written(self, version: str, started: float) -> None:
        self.version = version
        self._valid_until = started + self.cfg.ttl_s * (1 - _GUARD)

    # ---- taking
    def take(self) -> None:
        """Hold the folder, or raise ``LeaseHeld`` naming the live holder. Writes nothing else."""
        for _ in range(_TAKE_ATTEMPTS):
            started = time.monotonic()
            body = self._body()
            try:
                self._written(conditional.create(self.url, body, self.options), started)
                self.taken = LeaseBody.from_bytes(body).taken
                log.info("took the lease on %s: run %s, renewed every %g s, expires %g s after the last renewal",
                         redact_text(self.output), self.run_id, self.cfg.renew_s, self.cfg.ttl_s)
                return
            except conditional.Conflict:
                pass
            try:
                data, version = conditional.read(self.url, self.options)
            except FileNotFoundError:
                continue  # released by deletion in between: create again
            current = self._parse(data)
            now = _now()
            if not current.free(now):
                raise LeaseHeld(f"output {redact_text(self.output)} is being written by {current.describe(now)}; "
                                "this run did nothing. One writer per output folder: wait for that run to end, or, "
                                "if it died, for its lease to expire (README: 'One writer per output folder').")
            try:
                self._written(conditional.replace(self.url, body, version, self.options), started)
            except conditional.Conflict:
                continue  # another run took it over first: the next read names it
            self.taken = LeaseBody.from_bytes(body).taken
            if current.released:
                log.info("took the lease on %s (released by run %s): run %s", redact_text(self.output),
                         current.run_id, self.run_id)
            else:
                log.warning("took over the lease on %s from %s: that run stopped renewing it; run %s resumes its "
                            "work", redact_text(self.output), current.describe(now), self.run_id)
            return
        raise LeaseHeld(f"output {redact_text(self.output)}: the lease changed hands {_TAKE_ATTEMPTS} times while "
                        "this run tried to take it; another run holds it now")

    def _parse(self, data: bytes) -> LeaseBody:
        try:
            return LeaseBody.from_bytes(data)
        except (ValueError, TypeError, KeyError) as e:
            raise LeaseHeld(f"{redact_text(self.url)} is not a lease this job wrote ({e}); make sure no run is "
                            "writing to the folder, then delete it") from e

    # ---- keeping
    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds the lease with time to spare for one commit."""
        if self._lost:
            raise LeaseLost(f"{redact_text(self.output)}: {self._lost}; this run stops without committing more")
        left = self._valid_until - time.monotonic()
        if left <= 0:
            raise LeaseLost(f"{redact_text(self.output)}: the lease was not renewed for "
                            f"{self.cfg.ttl_s * (1 - _GUARD) - left:.0f} s (renewals failing: see the log); "
                            "another run may take it over, so this run stops without committing more")

    def renew(self) -> None:
        """One renewal; the renewer thread calls this every ``renew_s``."""
        started = time.monotonic()
        try:
            self._written(conditional.replace(self.url, self._body(), self.version, self.options), started)
        except conditional.Conflict as e:
            self._lost = f"the lease was taken over or removed by someone else ({e})"
            log.error("%s: %s", redact_text(self.output), self._lost)
            self._stop.set()
        except OSError as e:  # the store is unreachable or slow: try again at the next tick while the lease holds
            log.warning("renewing the lease on %s failed (%s); %.0f s of validity left, retrying in %g s",
                        redact_text(self.output), e, self._valid_until - time.monotonic(), self.cfg.renew_s)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.cfg.renew_s):
            self.renew()

    def release(self) -> None:
        """Stop renewing and mark the lease released (the next run takes it at once). Never raises for the store."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.cfg.renew_s * 2)
        if self._lost or not self.version:
            return
        try:
            conditional.replace(self.url, self._body(released=True), self.version, self.options)
        except (conditional.Conflict, OSError) as e:
            log.warning("could not release the lease on %s (%s); it expires by itself %g s after its last renewal",
                        redact_text(self.output), e, self.cfg.ttl_s)

    def __enter__(self) -> Lease:
        self.take()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
