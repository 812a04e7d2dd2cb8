"""The local cluster of infra/local, end to end, and the scheduled preprocessing simulated on it.

    .venv/bin/python -m pytest tests/test_infra_local_cluster.py -q      # 4-8 minutes on 2 busy cores

One cluster for the module (two Ray nodes, an MLflow server, moto's S3 server, on free loopback ports); it is
stopped at the end whatever happens, and the teardown checks that no process it started is left. Jobs go in the
way the README sends them: ``ray job submit`` and ``python -m infra.schedule submit`` in subprocesses, with
nothing but the environment ``up`` printed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import s3fs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repository root off sys.path
    sys.path.insert(0, str(ROOT))

from infra.local.cluster import LocalCluster, Ports, _alive, _members  # noqa: E402

pytestmark = pytest.mark.slow
PYTHON = sys.executable
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("local-cluster"), ports=Ports.free(), buckets=("raw", "shards"),
                     artifacts="s3")
    try:
        c.up()
        yield c
    finally:
        started = {}
        for info in c.state.get("services", {}).values():
            started.update(_members(info["pid"]))  # the services and everything they spawned, job drivers too
        c.down()
        left = [pid for pid, t in started.items() if _alive(pid, t)]
        assert not left, f"down() left processes running: {left}"


def run_env(cluster: LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    return {**env, **cluster.env()}


def run(argv: list[str], cluster: LocalCluster, timeout: float = 900, cwd: Path = ROOT):
    return subprocess.run(argv, env=run_env(cluster), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def s3(cluster: LocalCluster) -> s3fs.S3FileSystem:
    env = cluster.env()
    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def listening_hosts(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6, from /proc/net)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.add(address)
    return hosts


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}

CHECK_JOB = '''
import json, os, ray, mlflow, s3fs
ray.init()
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=1)
def node():
    return ray.get_runtime_context().get_node_id()
strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
ran_on = set(ray.get([node.options(scheduling_strategy=strategy(n, soft=False)).remote() for n in nodes]))
text = s3fs.S3FileSystem().cat("raw/hello.txt").decode()  # endpoint and keys from the environment only
mlflow.set_experiment("infra-smoke")
with mlflow.start_run() as run:
    mlflow.log_params({"nodes": len(nodes), "ran_on": len(ran_on), "s3_text": text})
    mlflow.log_text("artifact through the server", "note.txt")
print("RUN", json.dumps({"run_id": run.info.run_id}))
'''


def test_two_nodes_mlflow_and_s3_reach_a_submitted_job(cluster, tmp_path):
    pids = {name: info["pid"] for name, info in cluster.state["services"].items()}
    assert cluster.up() == cluster.env()
    assert {name: info["pid"] for name, info in cluster.state["services"].items()} == pids, "up is idempotent"
    p = cluster.ports
    for port in (p.ray_dashboard, p.mlflow, p.s3):
        assert listening_hosts(port) and listening_hosts(port) <= LOOPBACK, f"port {port} is not loopback only"
    token = Path(cluster.env()["RAY_AUTH_TOKEN_PATH"])
    assert token.stat().st_mode & 0o077 == 0, "the Ray token file must be private"

    s3(cluster).pipe("raw/hello.txt", b"from moto")
    (tmp_path / "check.py").write_text(CHECK_JOB)
    result = run([RAY, "job", "submit", "--submission-id", "infra-smoke", "--working-dir", str(tmp_path),
                  "--", "python", "check.py"], cluster)
    assert "Job 'infra-smoke' succeeded" in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    run_id = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RUN "))[4:])["run_id"]
    client = MlflowClient(tracking_uri=cluster.env()["MLFLOW_TRACKING_URI"])
    params = client.get_run(run_id).data.params
    assert params == {"nodes": "2", "ran_on": "2", "s3_text": "from moto"}
    assert Path(client.download_artifacts(run_id, "note.txt", str(tmp_path))).read_text() == \
        "artifact through the server"
    assert [p for p in s3(cluster).find("mlflow/artifacts") if p.endswith(f"{run_id}/artifacts/note.txt")], \
        "the server proxies artifacts to the S3 store"

    again = run([RAY, "job", "submit", "--submission-id", "infra-smoke", "--working-dir", str(tmp_path),
                 "--", "python", "check.py"], cluster)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


def schedule_tick(cluster: LocalCluster, slot: str) -> subprocess.CompletedProcess:
    """What cron runs each slot (README): submit the slot's preprocessing job and wait for it."""
    return run([PYTHON, "-m", "infra.schedule", "submit", "--slot", slot, "--wait", "--timeout", "900", "--",
                "python", "jobs/preprocess.py", "--config", "jobs/configs/preprocess_tiny.yaml",
                "--input", "s3://raw/videos/", "--output", "s3://shards/pretrain/", "--mode", "pretrain"], cluster)


def manifest(fs: s3fs.S3FileSystem) -> dict:
    fs.invalidate_cache()
    return json.loads(fs.cat("shards/pretrain/manifest.json"))


def shard_uris(fs: s3fs.S3FileSystem, name: str) -> set[str]:
    """Source URIs of the samples in one committed shard (from each sample's JSON record)."""
    with tarfile.open(fileobj=io.BytesIO(fs.cat(f"shards/pretrain/{name}"))) as tar:
        return {json.load(tar.extractfile(m))["uri"] for m in tar.getmembers() if m.name.endswith(".json")}


def test_scheduled_preprocessing_runs_each_slot_once_and_only_new_videos(cluster, tmp_path):
    if not (ROOT / "jobs" / "preprocess.py").exists():
        pytest.fail("jobs/preprocess.py, which the schedule runs, does not exist")
    from synthetic import generate_corpus

    corpus = generate_corpus(tmp_path / "corpus", n_pretrain=3, seed=11, size=(160, 120), fps=15,
                             duration=(2.0, 3.0), workers=1)
    videos = sorted(corpus.path(r) for r in corpus.of_kind("pretrain"))
    fs = s3(cluster)
    for video in videos[:2]:
        fs.put(str(video), f"raw/videos/{video.name}")
    first_uris = {f"s3://raw/videos/{v.name}" for v in videos[:2]}

    first = schedule_tick(cluster, "2025-01-31T12:00:00+00:00")
    assert first.returncode == 0, first.stderr[-4000:]
    m1 = manifest(fs)
    assert set(m1["sources"]) == first_uris and {s["status"] for s in m1["sources"].values()} == {"ok"}
    assert set().union(*(shard_uris(fs, s["name"]) for s in m1["shards"])) == first_uris

    # The same slot again (a retried cron run): refused by its submission id, nothing runs.
    same = schedule_tick(cluster, "2025-01-31T12:00:00+00:00")
    assert same.returncode == 0 and "already submitted" in same.stderr, same.stderr[-2000:]
    # The next slot with nothing new: the job runs and writes nothing.
    idle = schedule_tick(cluster, "2025-01-31T13:00:00+00:00")
    assert idle.returncode == 0, idle.stderr[-4000:]
    assert manifest(fs) == m1

    fs.put(str(videos[2]), f"raw/videos/{videos[2].name}")
    new_uri = f"s3://raw/videos/{videos[2].name}"
    later = schedule_tick(cluster, "2025-01-31T14:00:00+00:00")
    assert later.returncode == 0, later.stderr[-4000:]
    m3 = manifest(fs)
    assert m3["shards"][: len(m1["shards"])] == m1["shards"], "committed shards stay as they were"
    new_shards = m3["shards"][len(m1["shards"]):]
    assert new_shards and set().union(*(shard_uris(fs, s["name"]) for s in new_shards)) == {new_uri}
    assert {u: s["generation"] for u, s in m3["sources"].items()} == \
        {**{u: m1["sources"][u]["generation"] for u in first_uris}, new_uri: m3["sources"][new_uri]["generation"]}
    assert m3["sources"][new_uri]["generation"] > max(s["generation"] for s in m1["sources"].values())

    listed = run([RAY, "job", "list"], cluster, timeout=120).stdout
    for sid in ("preprocess-202501311200", "preprocess-202501311300", "preprocess-202501311400"):
        assert listed.count(f"submission_id='{sid}'") == 1, sid
