"""Shared fixtures. Keep each one small and session-scoped when it is expensive; say what it holds."""

from __future__ import annotations

import hashlib

import fsspec
import numpy as np
import pytest
import webdataset as wds

from tvlt_core import shards

from synthetic import CorpusInfo, generate_corpus

SYNTHETIC_SEED = 1234


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> CorpusInfo:
    """A small synthetic corpus, generated once per session (a few seconds on 2 cores).

    6 pretraining clips (2-6 s, the first six profiles of the default mix: 160x120 to 480x270, portrait 360x640,
    24/25/30/60 fps, 16/44.1/48 kHz, mono and stereo), 2 grounding videos (20-35 s, one train, one test) with
    their Charades-STA annotation files, and one file of every broken kind. Read-only: tests that need to
    change files copy them first.
    """
    root = tmp_path_factory.mktemp("synthetic_corpus")
    return generate_corpus(root, n_pretrain=6, n_grounding=2, seed=SYNTHETIC_SEED, broken=True, workers=2)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray for the whole session (one ``ray.init``): 2 CPUs, no dashboard, a 512 MiB object store.

    Yields the GCS address; a subprocess joins the same cluster with ``RAY_ADDRESS=<address>``.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 at a free port, reached through s3fs like any S3-compatible store.

    Yields the endpoint URL. Any access key works; pass it explicitly (config or environment), never a real one.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# --- training: shards written straight from the contract, and a real MLflow tracking server -------------------------
SENTENCES = ["the red circle moves left", "a blue square appears", "the green triangle turns yellow"]


def write_shards(folder, counts, *, frames=4, size=32, mel_lengths=(24, 40), silent_every=0, corrupt=(), seed=0,
                 grounding=False, clips_per_video=1):
    """Write a manifest and tar shards of synthetic samples (the shard contract) to a local folder or fsspec URL.

    Pretraining: sample ``n`` (over all shards) gets mel length ``mel_lengths[n % len]`` and is clip
    ``n % clips_per_video`` of video ``n // clips_per_video``. Grounding: frames of
    ``size`` x ``size * 3 // 4`` (longest edge first, unpadded, like the preprocessor) and two queries per video.
    Returns the folder URL."""
    url = str(folder).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = shards.Manifest(mode="grounding" if grounding else "pretrain", recipe={"test": True}, recipe_hash=shards.recipe_hash({"test": True}))
    manifest.generations.append(shards.Generation(id=1, started="t0", finished="t1"))
    n = 0
    for s, count in enumerate(counts):
        name = f"shard-{s:05d}.tar"
        with fsspec.open(f"{url}/{name}", "wb") as f, wds.TarWriter(f) as sink:
            for _ in range(count):
                colour = rng.integers(0, 256, size=(frames, 1, 1, 3), dtype=np.uint8)
                height = size * 3 // 4 if grounding else size
                video = np.broadcast_to(colour, (frames, height, size, 3)).copy()
                record = {"n": n, "start": 0.0, "end": 1.0}
                if grounding:
                    duration = 10.0 + n
                    halves = [(1.0, duration / 2), (duration / 2 + 1.0, duration - 1.0)]  # two distinct events
                    record.update(duration=duration, queries=[
                        {"sentence": SENTENCES[(n + q) % 3], "start": halves[q][0], "end": halves[q][1]} for q in range(2)
                    ])
                    mel = None
                elif silent_every and n % silent_every == 0:
                    mel = None
                else:
                    mel = rng.uniform(-1, 1, (mel_lengths[n % len(mel_lengths)], 128))
                sample = shards.encode_sample(shards.sample_key(f"file:///v{n // clips_per_video}.mp4", n % clips_per_video), video, record, mel=mel)
                if n in corrupt:
                    sample[shards.frame_ext(0)] = b"not a jpeg"
                sink.write(sample)
                n += 1
        with fs.open(f"{root}/{name}", "rb") as f:  # the sha256 the preprocessing writer records
            digest = hashlib.sha256(f.read()).hexdigest()
        manifest.shards.append(shards.ShardEntry(name=name, samples=count, bytes=fs.size(f"{root}/{name}"), generation=1,
                                                 sha256=digest))  # fmt: skip
    with fsspec.open(shards.manifest_url(url), "w") as f:
        f.write(manifest.to_json())
    return url


@pytest.fixture
def grounding_sentences() -> list[str]:
    """The query sentences ``write_shards(..., grounding=True)`` uses."""
    return list(SENTENCES)


@pytest.fixture
def shard_writer():
    """``write_shards(folder, counts, ...)``: tiny shards of the shard contract, written by the test itself."""
    return write_shards


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts served by the server). Yields its URL."""
    import sys
    from pathlib import Path

    from tests.fixtures.servers import free_port, start_http_service, stop_service

    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    url = f"http://127.0.0.1:{port}"
    server = start_http_service(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        f"{url}/health", root / "server.log",
    )  # fmt: skip
    try:
        yield url
    finally:
        stop_service(server)  # the server and its uvicorn worker, started here
