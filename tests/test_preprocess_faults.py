"""Transient faults between the job and the store, injected by our own proxy (tests/fixtures/fault_proxy.py) in
front of moto's S3 server: resets, 503 SlowDown, stalls and rejected credentials, aimed at listing, source reads,
part uploads and the manifest commit; and a source rewritten between listing and reading.

After every fault schedule a rerun with no faults ends with exactly the samples of a clean run, every listed
shard's bytes and sha256 match the manifest, and no multipart upload is left open. Real parts throughout: a real
local Ray, moto's server through s3fs, real mp4 files from the synthetic generator.
"""

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import fsspec
import pytest
from fixtures.fault_proxy import Fault, FaultProxy

from jobs.preprocess import RUN_FAILED, main
from pipelines import failures
from pipelines.config import StorageConfig
from pipelines.pinned import open_source
from tvlt_core import shards

BUCKET, KEY, SECRET = "faults", "test-key", "test-secret"
# Short timeouts and few tries, so that a stall or a persistent fault costs seconds; wide enough for a busy machine.
FAST_FAILURES = ["--storage.connect_timeout_s", "5", "--storage.read_timeout_s", "8", "--storage.request_attempts",
                 "2", "--failures.attempts", "2", "--failures.backoff_s", "0.2", "--failures.max_backoff_s", "0.5"]


@pytest.fixture(scope="module")
def store(s3_endpoint):
    """The store seen directly (no proxy), for set-up and checks."""
    fs = fsspec.filesystem("s3", key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def videos(store, synthetic_corpus) -> list[str]:
    """Three short pretraining videos under s3://faults/videos/ (names, in upload order)."""
    picks = sorted(synthetic_corpus.of_kind("pretrain"), key=lambda v: v["duration"])[:3]
    names = []
    for video in picks:
        name = Path(video["path"]).name
        store.put_file(str(synthetic_corpus.path(video)), f"{BUCKET}/videos/{name}")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint, source_prefix=f"{BUCKET}/videos", seed=16).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def job(proxy: FaultProxy, output: str, *extra: str, input: str = f"s3://{BUCKET}/videos") -> int:
    return main(["--config", "preprocess_tiny", "--mode", "pretrain", "--input", input, "--output",
                 f"s3://{BUCKET}/{output}", "--storage.endpoint_url", proxy.url, "--storage.aws_access_key_id", KEY,
                 "--storage.aws_secret_access_key", SECRET, *FAST_FAILURES, *extra])


def manifest_of(store, output: str) -> shards.Manifest:
    return shards.Manifest.from_json(store.cat_file(f"{BUCKET}/{output}/{shards.MANIFEST_NAME}").decode())


def committed_samples(store, output: str) -> dict[str, str]:
    """sample key -> sha256 of its members' bytes, over every listed shard, after checking each shard's bytes and
    sha256 against the manifest and that no sample appears twice."""
    digests: dict[str, str] = {}
    for entry in manifest_of(store, output).shards:
        data = store.cat_file(f"{BUCKET}/{output}/{entry.name}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.bytes, entry.sha256), entry.name
        seen_here = set()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                assert key in seen_here or key not in digests, f"sample {key} twice"
                seen_here.add(key)
                digests[key] = hashlib.sha256(digests.get(key, "").encode() + tar.extractfile(member).read()
                                              ).hexdigest()
    return digests


def open_uploads(store) -> list[dict]:
    return store.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])


@pytest.fixture(scope="module")
def clean(ray_cluster, store, videos, proxy) -> dict[str, str]:
    """The samples of a clean run (no faults)."""
    proxy.clear()
    assert job(proxy, "clean") == 0
    samples = committed_samples(store, "clean")
    assert len(samples) >= len(videos)
    assert all(s["status"] == "ok" for s in manifest_of(store, "clean").sources.values())
    return samples


def _dangling_upload(store, output: str) -> None:
    """What a writer killed in the middle of a multipart upload leaves: an upload with a part, never completed."""
    mpu = store.call_s3("create_multipart_upload", Bucket=BUCKET, Key=f"{output}/shard-000001-00009.tar")
    store.call_s3("upload_part", Bucket=BUCKET, Key=f"{output}/shard-000001-00009.tar", PartNumber=1,
                  UploadId=mpu["UploadId"], Body=b"x" * 1024)


# name -> (faults, the first run's exit code, what the first run's manifest says: {video index: (status, reason)})
SCHEDULES = {
    # absorbed by the retries: every fault is retried and the run is clean
    "listing_resets_and_slowdowns": ([Fault("reset", "listing", times=1), Fault("slowdown", "listing", times=2)],
                                     0, {}),
    # one object throttled for the whole run: it alone is deferred; the run succeeds (1 of 3 is not > 50%)
    "source_read_slowdown": ([Fault("slowdown", "source_read", times=10_000, key="{0}")], 0,
                             {0: ("deferred", failures.THROTTLED)}),
    # one object's reads stall past the read timeout, every time: deferred as a timeout
    "source_read_stall": ([Fault("stall", "source_read", times=10_000, key="{1}", stall_s=60)], 0,
                          {1: ("deferred", failures.TIMEOUT)}),
    # part uploads reset, before and after the store took the bytes: retried, nothing lost or doubled
    "part_upload_resets": ([Fault("reset", "part_upload", times=2), Fault("reset_after", "part_upload", times=2)],
                           0, {}),
    # the store refuses every manifest commit after the first one: the run fails (exit 3), the generation stays
    # unfinished, and the rerun resumes it
    "manifest_commit_refused": ([Fault("reset", "manifest_commit", times=10_000, after=1)], RUN_FAILED, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_after_a_fault_schedule_a_clean_rerun_gives_exactly_the_clean_samples(name, clean, store, videos, proxy):
    faults, first_code, outcome = SCHEDULES[name]
    for fault in faults:
        fault.key = fault.key.format(*videos)
    output = f"out-{name}"
    proxy.clear()
    proxy.schedule(*faults)
    assert job(proxy, output) == first_code
    assert all(f.fired for f in faults), f"a fault of the schedule never fired: {proxy.injected}"
    if outcome is not None:
        manifest = manifest_of(store, output)
        assert manifest.pending is None
        got = {Path(uri).name: (e["status"], e.get("reason", "")) for uri, e in manifest.sources.items()}
        want = {v: outcome.get(i, ("ok", "")) for i, v in enumerate(videos)}
        assert got == want
        assert manifest.generations[-1].deferred == len(outcome)
        stats = json.loads(store.cat_file(f"{BUCKET}/{output}/{shards.STATS_NAME}"))["last_run"]
        assert sum(stats["deferred"].values()) == len(outcome)
        assert [q.uri for q in manifest.quarantine()] == []  # deferred is not quarantined
    else:
        assert manifest_of(store, output).pending is not None
        _dangling_upload(store, output)
    proxy.clear()
    assert job(proxy, output) == 0
    assert committed_samples(store, output) == clean
    manifest = manifest_of(store, output)
    assert all(e["status"] == "ok" for e in manifest.sources.values()) and manifest.pending is None
    assert open_uploads(store) == []
    assert not store.exists(f"{BUCKET}/{output}/_work")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["listing", "source_read"])
def test_a_rejected_credential_fails_the_run_naming_the_reason(target, ray_cluster, store, videos, proxy, caplog):
    proxy.clear()
    proxy.schedule(Fault("denied", target, times=10_000))
    with caplog.at_level(logging.ERROR):
        code = job(proxy, f"denied-{target}")
    assert code == RUN_FAILED
    assert "preprocess failed" in caplog.text and failures.CREDENTIALS in caplog.text
    if target == "source_read":  # listed, but nothing could be read: all deferred, none quarantined
        assert f"{len(videos)} of {len(videos)} input(s) failed" in caplog.text
        manifest = manifest_of(store, f"denied-{target}")
        assert {e["status"] for e in manifest.sources.values()} == {"deferred"}
        proxy.clear()  # the credential works again: the next run takes the deferred inputs by itself
        assert job(proxy, f"denied-{target}") == 0
        assert all(e["status"] == "ok" for e in manifest_of(store, f"denied-{target}").sources.values())


@pytest.mark.slow
def test_an_object_rewritten_between_listing_and_reading_is_deferred_then_read_at_its_new_version(
        ray_cluster, store, synthetic_corpus, proxy):
    longer = max(synthetic_corpus.of_kind("pretrain"), key=lambda v: v["duration"])
    shorter = min(synthetic_corpus.of_kind("pretrain"), key=lambda v: v["duration"])
    key = f"{BUCKET}/changing/clip.mp4"
    store.put_file(str(synthetic_corpus.path(shorter)), key)
    listed_etag = store.info(key)["ETag"].strip('"')

    def rewrite(method: str, path: str) -> None:  # the first read of the object: someone uploads a new version
        store.put_file(str(synthetic_corpus.path(longer)), key)

    proxy.clear()
    proxy.schedule(Fault("hook", "any", times=1, key="/changing/clip.mp4", hook=rewrite))
    assert job(proxy, "out-changing", input=f"s3://{BUCKET}/changing") == RUN_FAILED  # 1 of 1 deferred
    entry = manifest_of(store, "out-changing").sources[f"s3://{key}"]
    assert (entry["status"], entry["reason"], entry["etag"]) == ("deferred", failures.SOURCE_CHANGED, listed_etag)
    assert manifest_of(store, "out-changing").shards == []  # nothing recorded under the stale version
    store.invalidate_cache()
    new = store.info(key)
    proxy.clear()
    assert job(proxy, "out-changing", input=f"s3://{BUCKET}/changing") == 0
    manifest = manifest_of(store, "out-changing")
    entry = manifest.sources[f"s3://{key}"]
    assert (entry["status"], entry["etag"], entry["size"]) == ("ok", new["ETag"].strip('"'), new["size"])
    records = []
    for shard in manifest.shards:
        with tarfile.open(fileobj=io.BytesIO(store.cat_file(f"{BUCKET}/out-changing/{shard.name}"))) as tar:
            records += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert records and all(r["etag"] == entry["etag"] and r["size"] == new["size"] for r in records)
    assert max(r["duration"] for r in records) == pytest.approx(longer["duration"], abs=0.1)


def test_on_a_versioned_bucket_the_listed_version_is_read_after_the_object_changed(
        ray_cluster, store, synthetic_corpus, proxy, s3_endpoint, tmp_path):
    """A list file names an object by its VersionId; the object is rewritten before the job runs. With
    ``storage.version_aware`` the job reads the listed version (and records it); without, the ETag check defers it."""
    import boto3

    longer = max(synthetic_corpus.of_kind("pretrain"), key=lambda v: v["duration"])
    shorter = min(synthetic_corpus.of_kind("pretrain"), key=lambda v: v["duration"])
    bucket, key = "versioned", "versioned/clip.mp4"
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    store.put_file(str(synthetic_corpus.path(shorter)), key)
    listed = client.head_object(Bucket=bucket, Key="clip.mp4")
    listing = tmp_path / "sources.jsonl"
    listing.write_text(json.dumps({"uri": f"s3://{key}", "size": listed["ContentLength"],
                                   "etag": listed["ETag"].strip('"'), "version_id": listed["VersionId"]}) + "\n")
    store.put_file(str(synthetic_corpus.path(longer)), key)  # a new version, after the listing
    assert client.head_object(Bucket=bucket, Key="clip.mp4")["VersionId"] != listed["VersionId"]
    proxy.clear()

    def run(output: str, *extra: str) -> int:
        return main(["--config", "preprocess_tiny", "--mode", "pretrain", "--input", str(listing), "--output",
                     f"s3://{BUCKET}/{output}", "--storage.endpoint_url", proxy.url, "--storage.aws_access_key_id",
                     KEY, "--storage.aws_secret_access_key", SECRET, *FAST_FAILURES, *extra])  # fmt: skip

    assert run("out-unversioned") == RUN_FAILED  # the ETag no longer matches: deferred, nothing recorded
    entry = manifest_of(store, "out-unversioned").sources[f"s3://{key}"]
    assert (entry["status"], entry["reason"]) == ("deferred", failures.SOURCE_CHANGED)

    assert run("out-versioned", "--storage.version_aware", "true") == 0
    manifest = manifest_of(store, "out-versioned")
    entry = manifest.sources[f"s3://{key}"]
    assert (entry["status"], entry["version_id"], entry["size"]) == ("ok", listed["VersionId"], listed["ContentLength"])
    records = []
    for shard in manifest.shards:
        with tarfile.open(fileobj=io.BytesIO(store.cat_file(f"{BUCKET}/out-versioned/{shard.name}"))) as tar:
            records += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert records and all(r["version_id"] == listed["VersionId"] for r in records)
    assert max(r["duration"] for r in records) == pytest.approx(shorter["duration"], abs=0.1)  # the listed bytes
    assert abs(longer["duration"] - shorter["duration"]) > 0.5


def test_a_pinned_read_fails_as_source_changed_when_the_object_moves_on(store, s3_endpoint):
    """Opened at the listed ETag, rewritten before the bytes are read: the GET's If-Match fails, never the new
    bytes under the old version; opened with a stale ETag: refused at open."""
    key = f"{BUCKET}/pinned/clip.mp4"
    store.pipe_file(key, b"a" * 100_000)
    listed = store.info(key)["ETag"].strip('"')
    options = StorageConfig(endpoint_url=s3_endpoint, aws_access_key_id=KEY,
                            aws_secret_access_key=SECRET).options(f"s3://{key}")
    with open_source(f"s3://{key}", options, etag=listed) as f:
        store.pipe_file(key, b"b" * 100_000)
        with pytest.raises(OSError) as err:
            f.read()
    assert failures.transient_reason(err.value) == failures.SOURCE_CHANGED
    with pytest.raises(failures.SourceChanged, match=listed):
        open_source(f"s3://{key}", options, etag=listed)
    with open_source(f"s3://{key}", options, etag=store.info(key, refresh=True)["ETag"].strip('"')) as f:
        assert f.read() == b"b" * 100_000
