"""A production-shaped cluster on one machine: two Ray nodes, an MLflow tracking server and an S3 server.

    eval "$(infra/local/up.sh)"        # python -m infra.local.cluster up: starts what is not running, prints exports
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/tvlt_tiny.yaml
    infra/local/down.sh                # python -m infra.local.cluster down: stops what `up` started
    python -m infra.local.cluster status | env      (--work-dir DIR and --free-ports on every subcommand)

What runs (each in a session of its own; pid, start time and ports in <work dir>/state.json, logs in <work dir>/logs):
    s3          moto_server -H 127.0.0.1        in-memory S3 (its buckets vanish on `down`)
    mlflow      mlflow server --host 127.0.0.1  sqlite backend, artifacts in a local folder or on the S3 server
    ray-head    ray start --head --block        the dashboard (job submission API) on 127.0.0.1
    ray-worker  ray start --address --block     a second raylet with its own temp dir: a second node

Loopback: moto, MLflow and the Ray dashboard bind 127.0.0.1. Ray's GCS and raylet RPC ports cannot: Ray 2.60 binds
them on all interfaces and replaces ``--node-ip-address 127.0.0.1`` with the machine's address. So the cluster
runs with Ray token authentication: a random token in <work dir>/ray-auth-token (mode 0600) that every client
names with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, both among the printed exports.

The Ray nodes start with the environment the jobs read (MLFLOW_TRACKING_URI, AWS_*), so a job sent with
``ray job submit`` sees what a job on Kubernetes gets from its ConfigMap and Secrets.

``up`` is idempotent: running, healthy services are kept; the others are started on the ports in state.json.
``down`` stops only processes this work dir started, by pid checked against the recorded start time, plus their
descendants; it never calls ``ray stop``, which would stop every Ray cluster of the user on the machine.
Linux only (it reads /proc), like Ray's own multi-node support.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WORK_DIR = ROOT / "work" / "local-cluster"  # work/ is git-ignored, so `--working-dir .` never uploads it
SERVICES = ("s3", "mlflow", "ray-head", "ray-worker")  # start order; `down` goes in reverse
S3_KEY = "testing"  # moto accepts any key pair; these are placeholders, not secrets
REGION = "us-east-1"
STOP_GRACE_S = 8.0


class ClusterError(RuntimeError):
    """A service did not start or is not healthy; the message names it and its log file."""


@dataclass
class Ports:
    """Loopback ports of the services. The defaults are the tools' usual ports (moto's 5000 would clash with
    MLflow's, so S3 takes 9000); ``Ports.free()`` picks unused ones, for tests and parallel clusters."""

    s3: int = 9000
    mlflow: int = 5000
    ray_gcs: int = 6379
    ray_dashboard: int = 8265
    ray_client: int = 10001
    head_agent: int = 52365  # each raylet's dashboard agent listens on a fixed port: the two nodes need two
    worker_agent: int = 52366

    @classmethod
    def free(cls) -> Ports:
        sockets = []
        try:
            for _ in dataclasses.fields(cls):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


# --- processes ------------------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[3] == started


def _members(leader: int) -> dict[int, int]:
    """pid -> start time of every process in the leader's session and of their descendants.

    Ray's job supervisor starts each job driver in a session of its own, so the session alone misses drivers."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[0] != "Z":
            table[int(entry.name)] = st
    members = {pid: st[3] for pid, st in table.items() if st[2] == leader}
    grew = True
    while grew:
        grew = False
        for pid, st in table.items():
            if pid not in members and st[1] in members:
                members[pid] = st[3]
                grew = True
    return members


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid, started in pids.items():
        if _alive(pid, started):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def stop_session(leader: int, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process of the session ``leader`` leads (a process started with ``start_new_session``) and of
    their descendants, SIGKILL what is left after ``grace_s``. Only those: other Ray clusters on the machine stay
    (``ray stop`` would stop every one)."""
    members = _members(leader)
    _signal_all(members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid, t) for pid, t in members.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(members, signal.SIGKILL)


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- the cluster ----------------------------------------------------------------------------------------------------
class LocalCluster:
    """The four services of one work dir. ``up()`` returns the environment a client needs; ``down()`` stops all.

    In tests, as a context manager: everything started is stopped on the way out, also after a failure.

        with LocalCluster(tmp_path, ports=Ports.free(), buckets=("raw",)) as cluster:
            subprocess.run([...], env={**os.environ, **cluster.env()})
    """

    def __init__(
        self,
        work_dir: str | Path = DEFAULT_WORK_DIR,
        *,
        ports: Ports | None = None,
        num_cpus: int = 2,
        object_store_bytes: int = 512 * 1024**2,
        buckets: tuple[str, ...] = (),
        artifacts: Literal["local", "s3"] = "local",
        start_timeout_s: float = 300.0,
    ):
        self.work_dir = Path(work_dir).resolve()
        self.logs = self.work_dir / "logs"
        self.state_file = self.work_dir / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        recorded = self.state.get("ports")
        self.ports = Ports(**recorded) if recorded else (ports or Ports())
        if recorded and ports and ports != self.ports:
            log.warning("%s already records ports %s; keeping them", self.state_file, self.ports)
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.buckets = tuple(dict.fromkeys((*buckets, "mlflow") if artifacts == "s3" else buckets))
        self.artifacts = artifacts
        self.start_timeout_s = start_timeout_s
        self.token_file = self.work_dir / "ray-auth-token"
        # Ray puts unix sockets under its temp dir and they must stay under 108 bytes: a short path under /tmp.
        self.ray_tmp = Path(self.state["ray_tmp"]) if self.state.get("ray_tmp") else None
        self._children: dict[str, subprocess.Popen] = {}

    # -- what clients read
    def env(self) -> dict[str, str]:
        """The environment variables the jobs and the Ray CLI read, pointing at this cluster."""
        p = self.ports
        s3 = f"http://127.0.0.1:{p.s3}"
        env = {
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{p.ray_dashboard}",  # ray job submit/status/logs
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p.mlflow}",
            "AWS_ENDPOINT_URL": s3,  # s3fs/botocore
            "MLFLOW_S3_ENDPOINT_URL": s3,  # MLflow's S3 artifact client reads its own variable
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }
        if gcs := self.state.get("gcs_address"):
            env["RAY_ADDRESS"] = gcs  # ray.init() on this machine joins the cluster instead of starting one
        return env

    def exports(self) -> str:
        return "".join(f"export {k}={v}\n" for k, v in self.env().items())

    # -- lifecycle
    def up(self) -> dict[str, str]:
        """Start every service that is not running; return ``env()``. Safe to call again.

        S3, MLflow and the Ray head start side by side (each takes tens of seconds on a busy machine); the second
        Ray node joins once the head is up, and again whenever the head was restarted (that is a new cluster)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.ray_tmp = self.ray_tmp or Path(tempfile.mkdtemp(prefix="tvlt-ray-"))
        self.state.update(ports=dataclasses.asdict(self.ports), ray_tmp=str(self.ray_tmp))
        self.state.setdefault("services", {})
        self._save()
        if not self.token_file.exists():
            self.token_file.touch(mode=0o600)
            self.token_file.write_text(secrets.token_hex(32))
        started = {}
        for name in ("s3", "mlflow", "ray-head"):
            if self._running(name):
                log.info("%s: running (pid %s)", name, self.state["services"][name]["pid"])
            else:
                started[name] = self._launch(name)
        for name, ready in started.items():
            self._wait(name, ready)
        self._create_buckets()
        if "ray-head" in started:
            # Ray advertises the machine's address, not 127.0.0.1; clients must use the address it wrote.
            self.state["gcs_address"] = (self.ray_tmp / "head" / "ray_current_cluster").read_text().strip()
            self._save()
        if "ray-head" in started or not self._running("ray-worker"):
            self._wait("ray-worker", self._launch("ray-worker"))
        else:
            log.info("ray-worker: running (pid %s)", self.state["services"]["ray-worker"]["pid"])
        return self.env()

    def down(self, purge: bool = False) -> None:
        """Stop every service of this work dir (reverse start order); ``purge`` also deletes the work dir."""
        for name in reversed(SERVICES):
            self._stop(name)
        if self.ray_tmp is not None:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
            self.ray_tmp = None
        self.state.pop("gcs_address", None)
        self.state.pop("ray_tmp", None)
        if purge:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif self.work_dir.exists():
            self._save()

    def status(self) -> dict[str, bool]:
        return {name: self._running(name) for name in SERVICES}

    def __enter__(self) -> LocalCluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # -- services
    def _launch(self, name: str) -> Callable[[], bool]:
        """Stop leftovers of ``name``, spawn it in a session of its own; return its readiness check."""
        self._stop(name)
        p = self.ports
        ray_node = ["--disable-usage-stats", "--num-cpus", str(self.num_cpus),
                    "--object-store-memory", str(self.object_store_bytes)]  # fmt: skip
        if name == "s3":
            argv = [_tool("moto_server"), "-H", "127.0.0.1", "-p", str(p.s3)]
            ready = partial(_http_ok, f"http://127.0.0.1:{p.s3}/")
        elif name == "mlflow":
            destination = "s3://mlflow/artifacts" if self.artifacts == "s3" else str(self.work_dir / "mlflow-artifacts")
            argv = [
                _tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(p.mlflow), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.work_dir / 'mlflow.db'}",
                "--artifacts-destination", destination,
            ]  # fmt: skip
            ready = partial(_http_ok, f"http://127.0.0.1:{p.mlflow}/health")
        elif name == "ray-head":
            argv = [
                _tool("ray"), "start", "--head", "--block", *ray_node, "--temp-dir", str(self.ray_tmp / "head"),
                "--port", str(p.ray_gcs), "--ray-client-server-port", str(p.ray_client),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p.ray_dashboard),
                "--dashboard-agent-listen-port", str(p.head_agent),
            ]  # fmt: skip
            address_file = self.ray_tmp / "head" / "ray_current_cluster"
            address_file.unlink(missing_ok=True)
            health = f"http://127.0.0.1:{p.ray_dashboard}/api/gcs_healthz"
            ready = lambda: address_file.exists() and _http_ok(health, self._auth_header())  # noqa: E731
        else:  # ray-worker
            argv = [
                _tool("ray"), "start", "--block", *ray_node, "--temp-dir", str(self.ray_tmp / "worker"),
                "--address", self.state["gcs_address"], "--dashboard-agent-listen-port", str(p.worker_agent),
            ]  # fmt: skip
            ready = lambda: self._alive_ray_nodes() >= 2  # noqa: E731
        log_path = self.logs / f"{name}.log"
        log.info("%s: starting (log %s)", name, log_path)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self._service_env(), cwd=self.work_dir, start_new_session=True,
            )  # fmt: skip
        self._children[name] = proc
        st = _stat(proc.pid)
        self.state["services"][name] = {"pid": proc.pid, "started": st[3] if st else -1, "log": str(log_path)}
        self._save()
        return ready

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        proc, log_path = self._children[name], self.state["services"][name]["log"]
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with status {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {self.start_timeout_s:.0f} s; see {log_path}")
            time.sleep(0.5)
        log.info("%s: ready", name)

    def _service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env())
        env.pop("RAY_ADDRESS", None)  # the caller's cluster, or ours: either would confuse `ray start`
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run `python`
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner serves GenAI scorers, not tracking
        return env

    def _create_buckets(self) -> None:
        if not self.buckets:
            return
        import s3fs  # a project dependency; imported here so `down` and `env` work without it

        # No region: s3fs would send it as a LocationConstraint, which S3 refuses for us-east-1.
        fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_KEY, endpoint_url=f"http://127.0.0.1:{self.ports.s3}")
        for bucket in self.buckets:
            if not fs.exists(bucket):
                fs.mkdir(bucket)

    def _auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def _alive_ray_nodes(self) -> int:
        url = f"http://127.0.0.1:{self.ports.ray_dashboard}/nodes?view=summary"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self._auth_header()), timeout=5) as r:
                nodes = json.load(r)["data"]["summary"]
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return 0
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def _running(self, name: str) -> bool:
        info = self.state.get("services", {}).get(name)
        return bool(info) and _alive(info["pid"], info["started"])

    def _stop(self, name: str) -> None:
        info = self.state.get("services", {}).pop(name, None)
        if info and _alive(info["pid"], info["started"]):
            log.info("%s: stopping (pid %s)", name, info["pid"])
            stop_session(info["pid"])
        proc = self._children.pop(name, None)
        if proc is not None:
            proc.wait(timeout=30)  # reap our own child so it does not linger as a zombie
        if self.work_dir.exists():
            self._save()

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        tmp.replace(self.state_file)


def _tool(name: str) -> str:
    """A console script of this virtual environment, so the services run the project's pinned versions."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="state, logs, sqlite db, artifacts")
    parser.add_argument("--free-ports", action="store_true", help="pick unused ports instead of the defaults")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of each Ray node")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket on the S3 server")
    parser.add_argument("--artifacts", choices=["local", "s3"], default="local", help="MLflow artifact store")
    parser.add_argument("--purge", action="store_true", help="down: also delete the work dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cluster = LocalCluster(
        args.work_dir,
        ports=Ports.free() if args.free_ports else None,
        num_cpus=args.num_cpus,
        buckets=tuple(args.bucket),
        artifacts=args.artifacts,
    )
    if args.command == "up":
        try:
            cluster.up()
        except ClusterError as e:
            log.error("%s; stopping what was started", e)
            cluster.down()
            return 1
        except BaseException:
            cluster.down()
            raise
        print(cluster.exports(), end="")  # stdout holds only the exports, for eval
    elif args.command == "env":
        print(cluster.exports(), end="")
    elif args.command == "status":
        status = cluster.status()
        for name, running in status.items():
            print(f"{name:<11} {'running' if running else 'stopped'}")
        return 0 if all(status.values()) else 3
    else:
        cluster.down(purge=args.purge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
