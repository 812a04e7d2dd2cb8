"""Crash isolation for native decoders: run them in a child process, so a segfault costs one call, not the worker.

decord and FFmpeg are C/C++; a corrupt file can crash them (SIGSEGV, SIGABRT) or hang them. A Ray worker that
dies takes its whole batch and, after Ray's retries, the job with it. So the decode stages keep one long-lived
child (``python -m pipelines.sandbox``) per actor and send it one request at a time over a pipe:

    parent (Ray actor)                                child (this module's ``main``)
    call("decode_frames", path=..., ...)   -- pickle -->   decoders.SANDBOXED["decode_frames"](**kwargs)
                                           <-- pickle --   ("ok", result) | ("error", type, message, reason)

The child may run under a memory limit (``limit_memory``): an input whose decoding fails an allocation under it
is an input error with reason ``too_large`` (the child is then replaced, its libraries' state being unknown).
A child that exits or is killed mid-call (crash), or does not answer within the timeout (killed, counted as a
crash), raises ``SandboxCrash``; the next call starts a fresh child. ``call_with_retry`` retries a crash, and a
store or network failure inside the child (``SandboxError.transient``), with the backoff of its ``RetryPolicy``,
then gives up: the caller defers the input (``pipelines.failures``: both are transient). An input error inside the
child (``decoders.INPUT_ERRORS``: demuxer and decoder errors, local I/O errors) is a clean failure (``SandboxError``,
not retried: decoding the same bytes again gives the same error). Any other exception is a bug or a broken install,
not a bad input: it is raised as ``RuntimeError`` so the job fails instead of quarantining every input.
Only the functions in ``decoders.SANDBOXED`` can be called; messages are pickles between our own two processes.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import selectors
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines import failures
from pipelines.failures import Retries, RetryPolicy, retrying, transient_reason
from tvlt_core.redaction import redact_text

log = logging.getLogger(__name__)
_HEADER = 8  # big-endian payload length
_READY = b"ready\n"
_START_TIMEOUT_S = 300.0
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
TOO_LARGE = "too_large"  # the reason of an input that does not fit in the child's memory limit


class SandboxCrash(RuntimeError):
    """The child died or hung during a call. ``attempts`` calls were made."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


class SandboxError(RuntimeError):
    """The input failed in the child (one of ``decoders.INPUT_ERRORS``): ``type_name``, message, ``reason`` if any;
    ``transient`` is the ``failures`` reason code when the store or the network failed, not the input."""

    def __init__(self, type_name: str, message: str, reason: str = "", transient: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.reason = reason
        self.transient = transient


def failure_reason(exc: BaseException) -> str:
    """The transient reason of a sandbox call's failure: a crash or hang (``decoder_crash``), a store or network
    failure inside the child; "" for a bad input."""
    if isinstance(exc, SandboxCrash):
        return failures.DECODER_CRASH
    if isinstance(exc, SandboxError):
        return exc.transient
    return ""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _send(stream, obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=5)
    stream.write(len(payload).to_bytes(_HEADER, "big") + payload)
    stream.flush()


class Sandbox:
    """One child process, started on first use and restarted after a crash. ``role`` only labels the child's
    command line (``python -m pipelines.sandbox decode``), so operators can tell probe and decode children apart."""

    def __init__(self, role: str = "decode", timeout_s: float = 300.0, retry: RetryPolicy | None = None,
                 memory_bytes: int = 0):
        self.role = role
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy(attempts=2, backoff_s=0.0, max_backoff_s=0.0)
        self.memory_bytes = memory_bytes  # the child's RLIMIT_DATA; 0: no limit
        self._proc: subprocess.Popen | None = None
        self.crashes = 0
        self.retries = Retries()  # retries made by ``call_with_retry``, for the run's stats

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")  # one decoder per core: processes scale, decoder threads did not
        command = [sys.executable, "-m", "pipelines.sandbox", self.role, str(self.memory_bytes)]
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)
        # A child that cannot even import its decoders is a broken install, not a bad input: fail loudly.
        try:
            self._read_exact(len(_READY), time.monotonic() + _START_TIMEOUT_S)
        except (EOFError, TimeoutError):
            raise RuntimeError(f"sandbox child ({self.role}) did not start: {self._kill()}; see its stderr") from None
        return self._proc

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self._proc.stdout.fileno()
        chunks, got = [], 0
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while got < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(timeout=remaining):
                    raise TimeoutError
                chunk = os.read(fd, min(n - got, 1 << 22))
                if not chunk:
                    raise EOFError
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def _kill(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return "not started"
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()
        return _describe_exit(code)

    def start(self) -> None:
        """Have a live child (started now if there is none): lets a worker pay the start-up before its first input."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self._kill()
            self._start()

    def call(self, name: str, timeout_s: float | None = None, **kwargs) -> Any:
        """One attempt of ``decoders.SANDBOXED[name](**kwargs)`` in the child."""
        self.start()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            _send(self._proc.stdin, (name, kwargs))
            deadline = time.monotonic() + timeout
            size = int.from_bytes(self._read_exact(_HEADER, deadline), "big")
            reply = pickle.loads(self._read_exact(size, deadline))
        except TimeoutError:
            self.crashes += 1
            raise SandboxCrash(f"decoder hung: no answer in {timeout:.0f} s ({self._kill()})") from None
        except (EOFError, BrokenPipeError):
            self.crashes += 1
            raise SandboxCrash(f"decoder crashed: {self._kill()}") from None
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "bug":  # not the input's fault: fail the task (and, after Ray's retries, the job)
            raise RuntimeError(redact_text(f"sandboxed {name} failed with {reply[1]}: {reply[2]}\n{reply[3]}"))
        if reply[3] == TOO_LARGE:
            self._kill()  # an allocation failed somewhere in the child: the next input gets a fresh one
        raise SandboxError(*reply[1:])

    def call_with_retry(self, name: str, **kwargs) -> Any:
        """``call``, repeated after a crash (in a fresh child) or a transient failure in the child (the store,
        the network), with the backoff of ``self.retry``. A crash that outlasts it says how many calls were made."""
        before = self.retries.count
        try:
            return retrying(lambda: self.call(name, **kwargs), self.retry, f"sandboxed {name}", self.retries,
                            reason_of=failure_reason)
        except SandboxCrash as crash:
            raise SandboxCrash(str(crash), attempts=self.retries.count - before + 1) from None

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()  # EOF: the child leaves its loop
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass


def limit_memory(limit_bytes: int) -> None:
    """Cap this process's data segment (heap, anonymous and private mappings) at ``limit_bytes``.

    ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: the address space also counts shared libraries and untouched
    reservations (a Python with decord and PyAV maps about 350 MB before doing anything), the data segment counts
    what decoded frames and audio take. A per-process limit needs no cgroup, so it works in any container."""
    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


def main() -> None:
    """Child loop: read a request, run it, answer; exit on EOF (the parent closed the pipe or died).
    ``python -m pipelines.sandbox ROLE [MEMORY_BYTES]``."""
    # The pipe to the parent is a private copy of stdout; fd 1 then points at stderr, so anything a C library
    # prints cannot corrupt the protocol.
    reply_stream = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from pipelines import decoders  # imported here: the child pays decord/PyAV start-up, not the parent

    limit_memory(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    reply_stream.write(_READY)
    reply_stream.flush()
    requests = sys.stdin.buffer
    while True:
        header = requests.read(_HEADER)
        if len(header) < _HEADER:
            return
        name, kwargs = pickle.loads(requests.read(int.from_bytes(header, "big")))
        try:
            reply = ("ok", decoders.SANDBOXED[name](**kwargs))
        except MemoryError as e:  # over the limit (numpy, PyAV's ENOMEM): the input is too large for this decoder
            reply = ("error", type(e).__name__, f"out of memory under the decoder's limit: {e}"[:2000], TOO_LARGE, "")
        except Exception as e:  # noqa: BLE001 - classified here: the store's fault, the input's, or a bug
            transient = transient_reason(e)  # a remote read the store or the network failed: not the input
            if transient or isinstance(e, decoders.INPUT_ERRORS):
                reply = ("error", type(e).__name__, str(e)[:2000], getattr(e, "reason", ""), transient)
            else:  # a bug or a broken install: goes back whole, so the job fails loudly
                reply = ("bug", type(e).__name__, str(e)[:2000], traceback.format_exc())
        _send(reply_stream, reply)


if __name__ == "__main__":
    main()
