"""Pretraining submitted with ``ray job submit`` to a two-node cluster (infra/local: two Ray nodes, an MLflow server,
moto's S3 server, all on this machine), the way the README runs it against ``ray start --head``.

    .venv/bin/python -m pytest tests/test_train_cluster.py -q      # 3-6 minutes on 2 busy cores
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch
from mlflow import MlflowClient

from tvlt_core.models.tvlt import TvltForPreTraining
from tvlt_core.tracking import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # infra/ is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from infra.local.cluster import LocalCluster, Ports  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("train-cluster"), ports=Ports.free(), buckets=("train",), artifacts="s3") as c:
        yield c


def test_ray_job_submit_runs_pretraining_across_two_nodes(cluster, shard_writer, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(cluster.env())
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    shards = shard_writer("s3://train/shards", counts=[5, 4, 4], frames=8, size=64)
    submit = [
        RAY, "job", "submit", "--working-dir", ".", "--",
        "python", "jobs/pretrain.py", "--config", "jobs/configs/tvlt_tiny.yaml", "--data.manifest", shards,
        "--checkpoint.storage_path", "s3://train/runs", "--tracking.run_name", "two-nodes",
        "--parallel.placement_strategy", "STRICT_SPREAD", "--schedule.max_steps", "4", "--checkpoint.every_steps", "2",
        "--data.batch_size", "2", "--tracking.system_metrics", "false",
    ]  # fmt: skip
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()

    client = MlflowClient(cluster.env()["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tvlt-pretrain")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'two-nodes'")
    assert run.data.tags["tvlt.ray_nodes"] == "2", "STRICT_SPREAD put one rank on each node"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [4]
    model = TvltForPreTraining.from_pretrained("models:/tvlt-pretrain@latest")  # artifacts in S3, via the server
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert s3fs.S3FileSystem().glob("train/runs/two-nodes/checkpoint_*/rank-00001.json")
