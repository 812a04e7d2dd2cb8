"""One writer per output folder: conditional writes, the lease and the manifest's compare-and-swap, on a local folder
and on moto's S3 server through s3fs; then two real jobs started at once on one output folder.

The SIGKILL case (a killed holder's lease refuses the next run until it expires, then that run takes over and ends
with exactly the clean run's samples) is in tests/test_preprocess.py, beside the clean run it compares with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from jobs.preprocess import EXIT_HELD
from pipelines import conditional, lease, manifests
from pipelines.config import LeaseConfig
from tvlt_core import shards

REPO = Path(__file__).resolve().parent.parent
S3_KEYS = {"key": "test-key", "secret": "test-secret"}


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> tuple[str, dict]:
    """(an empty output folder URL, its storage options): a local path, or a fresh prefix on moto's S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint = request.getfixturevalue("s3_endpoint")
    options = {**S3_KEYS, "client_kwargs": {"endpoint_url": endpoint}}
    fs = fsspec.filesystem("s3", **options)
    if not fs.exists("lease-tests"):
        fs.mkdir("lease-tests")
    return f"s3://lease-tests/{uuid.uuid4().hex[:8]}", options


def read(url: str, options: dict) -> bytes:
    with fsspec.open(url, "rb", **options) as f:
        return f.read()


# --------------------------------------------------------------------------------------------- conditional writes
def test_create_refuses_an_existing_object_and_replace_refuses_a_changed_one(folder):
    base, options = folder
    url = f"{base}/thing.json"
    first = conditional.create(url, b"one", options)
    with pytest.raises(conditional.Conflict):
        conditional.create(url, b"two", options)
    assert conditional.read(url, options) == (b"one", first)
    second = conditional.replace(url, b"two", first, options)
    assert second != first and conditional.read(url, options) == (b"two", second)
    with pytest.raises(conditional.Conflict):  # a writer still holding the first version
        conditional.replace(url, b"stale", first, options)
    assert read(url, options) == b"two"
    # A write that landed but whose reply was lost, retried: the object holds exactly that content, so it counts.
    assert conditional.replace(url, b"two", first, options) == second
    with pytest.raises(conditional.Conflict):
        conditional.replace(f"{base}/absent.json", b"x", first, options)


def test_of_writers_racing_from_one_version_exactly_one_wins(tmp_path):
    """Locally (moto's server checks and writes without a lock between them, unlike S3 itself, so a race on it would
    test moto): eight threads replace from the same version at once, then eight create one new name at once."""
    url = str(tmp_path / "thing.json")
    first = conditional.create(url, b"v0", {})
    start = threading.Barrier(8)

    def attempt(write, i: int) -> bool:
        start.wait(timeout=30)
        try:
            write(i)
            return True
        except conditional.Conflict:
            return False

    for write, name in ((lambda i: conditional.replace(url, f"v{i + 1}".encode(), first, {}), url),
                        (lambda i: conditional.create(str(tmp_path / "new.json"), f"n{i}".encode(), {}),
                         str(tmp_path / "new.json"))):
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i: attempt(write, i), range(8)))
        assert won.count(True) == 1, won
        winner = won.index(True)
        assert Path(name).read_bytes() in (f"v{winner + 1}".encode(), f"n{winner}".encode())
    assert sorted(os.listdir(tmp_path)) == ["new.json", "thing.json"]  # no temporaries, no lock files


def test_a_manifest_commit_in_between_is_detected_and_not_overwritten(folder):
    base, options = folder
    ours, theirs = manifests.Output(base, options), manifests.Output(base, options)
    manifest = shards.Manifest(mode="pretrain", recipe={"r": 1}, recipe_hash="h")
    ours.save(manifest)
    mine = ours.load()
    other = theirs.load()  # another writer reads the same version and commits first
    other.generations.append(shards.Generation(id=1, started="t0", finished="t1"))
    theirs.save(other)
    mine.generations.append(shards.Generation(id=7, started="t0"))
    with pytest.raises(manifests.ManifestConflict, match="changed by another writer"):
        ours.save(mine)
    assert [g.id for g in shards.Manifest.from_json(read(f"{base}/manifest.json", options).decode()).generations] == [1]
    # Two runs that both find no manifest: the second create is refused as well.
    fresh = f"{base}/other"
    manifests.Output(fresh, options).save(manifest)
    late = manifests.Output(fresh, options)
    with pytest.raises(manifests.ManifestConflict):
        late.save(shards.Manifest(mode="grounding", recipe={}, recipe_hash="g"))


# ------------------------------------------------------------------------------------------------------ the lease
def lease_body(base: str, options: dict) -> dict:
    return json.loads(read(f"{base}/{lease.LEASE_NAME}", options))


def test_a_second_writer_is_refused_naming_the_holder_and_its_expiry(folder):
    base, options = folder
    cfg = LeaseConfig(ttl_s=60, renew_s=20)
    with lease.Lease(base, options, cfg) as first:
        body = lease_body(base, options)
        assert body["holder"] == {"host": os.uname().nodename, "pid": os.getpid(), "run_id": first.run_id}
        assert body["ttl_s"] == 60 and not body["released"]
        with pytest.raises(lease.LeaseHeld) as err:
            lease.Lease(base, options, cfg).take()
        assert f"run {first.run_id} (pid {os.getpid()}" in str(err.value)
        assert f"expires {body['expires']} (in " in str(err.value)
        first.check()
    assert lease_body(base, options)["released"]
    with lease.Lease(base, options, cfg) as second:  # a released lease is taken at once
        assert lease_body(base, options)["holder"]["run_id"] == second.run_id


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(folder):
    base, options = folder
    cfg = LeaseConfig(ttl_s=4, renew_s=1)
    dead = lease.Lease(base, options, cfg)
    dead.take()  # taken, never renewed: like a holder killed right after taking it
    with pytest.raises(lease.LeaseHeld):
        lease.Lease(base, options, cfg).take()
    expires = lease.LeaseBody.from_bytes(read(f"{base}/{lease.LEASE_NAME}", options)).expires
    wait_until_past(expires, bound_s=30)
    with lease.Lease(base, options, cfg) as heir:
        assert lease_body(base, options)["holder"]["run_id"] == heir.run_id
        with pytest.raises(lease.LeaseLost, match="not renewed"):
            dead.check()  # its own clock tells the old holder to stop committing
        dead.renew()  # and its renewal, conditional on the version it wrote, finds the lease taken over
        with pytest.raises(lease.LeaseLost, match="taken over"):
            dead.check()
        heir.check()
    dead.release()  # a lost lease is not released by its old holder: the heir's release stands
    assert lease_body(base, options)["holder"]["run_id"] == heir.run_id


def test_a_renewed_lease_outlives_its_ttl(folder):
    base, options = folder
    cfg = LeaseConfig(ttl_s=8, renew_s=1)  # seven renewals may fail or be slow before it lapses
    with lease.Lease(base, options, cfg) as holder:
        taken = lease_body(base, options)["expires"]
        time.sleep(cfg.ttl_s * 1.5)
        holder.check()
        with pytest.raises(lease.LeaseHeld):
            lease.Lease(base, options, cfg).take()
        assert lease_body(base, options)["expires"] > taken


def wait_until_past(iso_time: str, bound_s: float) -> None:
    from datetime import datetime, timezone

    deadline = time.monotonic() + bound_s
    while datetime.now(timezone.utc) <= datetime.fromisoformat(iso_time):
        assert time.monotonic() < deadline, f"{iso_time} not reached within {bound_s} s"
        time.sleep(0.1)


# ------------------------------------------------------------------------------- two real jobs on one output folder
def start_job(argv: list[str], ray_address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "preprocess.py"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))


@pytest.fixture(scope="module")
def few_videos(synthetic_corpus, tmp_path_factory) -> Path:
    """Three of the synthetic pretraining clips, enough for a run that lasts while the second one starts."""
    folder = tmp_path_factory.mktemp("few")
    for video in [v for v in synthetic_corpus.videos if v["kind"] == "pretrain"][:3]:
        shutil.copy(synthetic_corpus.path(video), folder / Path(video["path"]).name)
    return folder


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_started_at_once_one_writes_and_the_other_refuses(where, few_videos, ray_cluster, tmp_path,
                                                                 request):
    argv = ["--config", "preprocess_tiny", "--mode", "pretrain", "--lease.ttl_s", "60", "--lease.renew_s", "5"]
    if where == "local":
        argv += ["--input", str(few_videos), "--output", str(tmp_path / "out")]
        base, options = str(tmp_path / "out"), {}
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        options = {**S3_KEYS, "client_kwargs": {"endpoint_url": endpoint}}
        fs = fsspec.filesystem("s3", **options)
        bucket = f"two-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        fs.put(str(few_videos), f"{bucket}/raw", recursive=True)
        argv += ["--input", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/out", "--storage.endpoint_url", endpoint,
                 "--storage.aws_access_key_id", S3_KEYS["key"], "--storage.aws_secret_access_key", S3_KEYS["secret"]]
        base = f"s3://{bucket}/out"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    jobs = [start_job(argv, ray_cluster, log) for log in logs]
    try:
        codes = [job.wait(timeout=400) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    assert sorted(codes) == [0, EXIT_HELD], f"exit codes {codes}: {[log.read_text()[-3000:] for log in logs]}"
    writer_log, refused_log = (logs[0], logs[1]) if codes[0] == 0 else (logs[1], logs[0])
    holder = lease_body(base, options)["holder"]
    assert f"run {holder['run_id']} (pid {holder['pid']} on {holder['host']})" in refused_log.read_text()
    assert "expires" in refused_log.read_text() and "this run did nothing" in refused_log.read_text()
    assert f"took the lease on {base}: run {holder['run_id']}" in writer_log.read_text()
    manifest = shards.Manifest.from_json(read(f"{base}/manifest.json", options).decode())
    assert len(manifest.generations) == 1 and manifest.generations[0].attempts == 1 and manifest.pending is None
    assert sorted(Path(u).name for u, e in manifest.sources.items() if e["status"] == "ok") == sorted(
        p.name for p in few_videos.iterdir())
    assert manifest.num_samples == sum(e["samples"] for e in manifest.sources.values()) > 0
