"""Shared fixtures. Keep each one small and session-scoped when it is expensive; say what it holds."""

from __future__ import annotations

import pytest

from pipelines.synthetic import CorpusInfo, generate_corpus

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
