"""The main job end to end, shrunk: a handful of videos and a few training steps through every stage (corpus, split,
preprocess, pretrain, vocabulary, fine-tune, evaluate from the registry), then a second run in the same folder that
redoes nothing. Real Ray, DeepSpeed, MLflow (sqlite) and videos; nothing is mocked. Whether the models learn is the
full main job's business (its table is in the README); here every stage must run and leave its traces.

    .venv/bin/python -m pytest tests/test_demo.py -q -m slow      # 4-8 minutes on 2 cores
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.fixtures.images import image_steps
from jobs import demo
from tvlt_core import shards
from tvlt_core.tracking import tracking_uri

SMALL = [
    "--corpus.pretrain_videos", "6", "--corpus.grounding_videos", "4", "--corpus.grounding_duration", "[8, 10]",
    "--pretrain.args", '["--schedule.max_steps", "3", "--schedule.warmup_steps", "1", "--data.batch_size", "2", '
                       '"--tracking.log_every_steps", "1", "--tracking.artifact_every_steps", "0"]',
    "--finetune.args", '["--schedule.max_steps", "3", "--schedule.warmup_steps", "1", "--data.batch_size", "1", '
                       '"--tracking.log_every_steps", "1", "--tracking.artifact_every_steps", "0"]',
    "--evaluate.args", '["--parallel.actors", "2", "--eval.gallery_size", "4"]',
    # 6 videos beside the 6 broken files, about 7 of 11 in the training split: more than the default share of
    # failed inputs, which would (rightly) fail the run; the full main job has 192 videos beside them
    "--preprocess_pretrain.args", '["--failures.max_failed_share", "1.0"]',
]  # fmt: skip


def sources(folder) -> set[str]:
    return {uri for uri, s in shards.load_manifest(str(folder)).sources.items() if s.get("status") == "ok"}


@pytest.mark.slow
def test_main_job_runs_every_stage_and_a_second_run_redoes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    work = tmp_path / "demo"
    assert demo.main(["--work_dir", str(work), *SMALL]) == 0
    out = capsys.readouterr().out
    for stage in ("corpus", "split", "preprocess", "pretrain", "vocab", "finetune", "evaluate tvlt", "evaluate tvp"):
        assert f"\n{stage} " in out, f"stage {stage} missing from the summary:\n{out}"
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "learning, on held-out videos" in out

    # held out by video: no source is in both the training and the test shards
    shard_root = work / "shards"
    assert sources(shard_root / "pretrain-train") and sources(shard_root / "pretrain-test")
    assert not sources(shard_root / "pretrain-train") & sources(shard_root / "pretrain-test")
    assert not sources(shard_root / "grounding-train") & sources(shard_root / "grounding-test")
    quarantined = shards.load_manifest(str(shard_root / "pretrain-train")).quarantine()
    assert quarantined, "the broken files go through preprocessing and are quarantined"

    # both models registered, evaluated from the registry, champions, with loss curves and pictures in MLflow
    client = MlflowClient(tracking_uri(str(work)))
    for name, pictures in (("tvlt-pretrain", {"frames", "spectrogram"}), ("tvp-grounding", {"segments"})):
        version = client.get_model_version_by_alias(name, "champion")
        assert "eval.run_id" in version.tags and client.get_run(version.tags["eval.run_id"]).data.metrics
        run = client.get_run(version.run_id)
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
        assert set(image_steps(client, run.info.run_id)) == pictures

    # again in the same folder: the corpus is kept, no new shards, no new training, no new model version
    generations = {name: len(shards.load_manifest(str(shard_root / name)).generations) for name in
                   ("pretrain-train", "pretrain-test", "grounding-train", "grounding-test")}  # fmt: skip
    versions_before = len(client.search_model_versions("name='tvlt-pretrain'"))
    assert demo.main(["--work_dir", str(work), *SMALL]) == 0
    assert {name: len(shards.load_manifest(str(shard_root / name)).generations) for name in generations} == generations
    assert len(client.search_model_versions("name='tvlt-pretrain'")) == versions_before
    assert "promotion: @champion: not moved" in capsys.readouterr().out


def test_a_corpus_from_an_older_generator_is_made_again(tmp_path):
    from synthetic import generate_corpus
    from synthetic.corpus import CORPUS_JSON, FORMAT_VERSION, corpus_options

    generate_corpus(tmp_path, n_pretrain=1, seed=3, workers=1)
    options = corpus_options()
    assert demo._same_corpus(tmp_path, 3, {"pretrain": 1}, options) is not None
    assert demo._same_corpus(tmp_path, 4, {"pretrain": 1}, options) is None
    made = json.loads((tmp_path / CORPUS_JSON).read_text())
    (tmp_path / CORPUS_JSON).write_text(json.dumps({**made, "format_version": FORMAT_VERSION - 1}))
    assert demo._same_corpus(tmp_path, 3, {"pretrain": 1}, options) is None  # same seed, other files: not reused


def test_job_overrides_are_taken_as_typed():
    """README's shrink example writes numbers unquoted ('[--schedule.max_steps, 50]'); YAML reads 50 as an int, and
    the main job refused it ("Expected a <class 'str'>") until the overrides accepted numbers."""
    from jobs.config import parse

    cfg = parse(demo.DemoConfig, ["--pretrain.args", "[--schedule.max_steps, 50, --optim.lr, 1e-3]"], prog="demo")
    assert cfg.pretrain.args == ["--schedule.max_steps", "50", "--optim.lr", "0.001"]
    assert parse(demo.DemoConfig, [], prog="demo").evaluate.args == ["--parallel.actors", "2"]
