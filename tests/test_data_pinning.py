"""A run pins its data: wrong shards are refused before any worker starts, restarts and relaunches read the
snapshot (not the live manifest an incremental run changed), ``data.refresh`` moves a run on explicitly, and a
damaged shard stops the job once instead of burning Ray Train restarts.

    .venv/bin/python -m pytest tests/test_data_pinning.py -q     # the job tests run a real local Ray and MLflow
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import threading
import time

import pytest
from mlflow import MlflowClient

from jobs.config import ConfigError
from jobs.finetune_tvp import main as finetune_main
from jobs.pretrain import main as pretrain_main
from tests.fixtures.bounded import bounded
from tests.fixtures.ray_workers import ray_train_workers
from tvlt_core import shards as contract
from tvlt_core.data import StreamingLoader, TvltBatcher, snapshot
from tvlt_core.text import TextTokenizer, build_vocab
from tvlt_core.tracking import ATTEMPTS_TAG, RUN_NAME_TAG

JOB_TIMEOUT_S = 600


def incremental_run(folder, *, retire: str, add_samples: int, seed: int = 7) -> None:
    """What an incremental preprocessing run does to a folder: a new generation whose shard replaces ``retire``
    in the manifest (the old file is kept for readers on an older manifest, as pipelines/manifests.py does)."""
    from tests.conftest import write_shards

    scratch = f"{folder}-gen2"
    write_shards(scratch, [add_samples], seed=seed)
    new_name = contract.shard_name(2, 0)
    shutil.copy(f"{scratch}/shard-00000.tar", f"{folder}/{new_name}")
    manifest = contract.load_manifest(str(folder))
    entry = contract.load_manifest(scratch).shards[0]
    manifest.shards = [s for s in manifest.shards if s.name != retire]
    manifest.shards.append(contract.ShardEntry(new_name, entry.samples, entry.bytes, 2, entry.sha256))
    manifest.generations.append(contract.Generation(id=2, started="t2", finished="t3", retired=[retire]))
    (folder / contract.MANIFEST_NAME).write_text(manifest.to_json())


# --- wrong data, refused before any worker starts ----------------------------------------------------------------------
def test_tvp_on_pretraining_shards_is_refused_naming_both_modes(shard_writer, grounding_sentences, tmp_path):
    """The case that span for 300 s: TVP with its own tokenizer, pointed at pretraining shards."""
    data = shard_writer(tmp_path / "pretrain", counts=[4, 4])
    TextTokenizer.from_vocab(build_vocab(grounding_sentences, vocab_size=60), 16).save(str(tmp_path / "tok"))
    argv = ["--config", "tvp_tiny", "--data.manifest", data, "--text.tokenizer", str(tmp_path / "tok"),
            "--checkpoint.storage_path", str(tmp_path / "runs"), "--tracking.run_name", "wrong"]  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"the shards are 'pretrain' shards .*tvp-grounding trains on 'grounding'"):
        finetune_main(argv)
    assert time.monotonic() - started < 30, "refused from the manifest, before any reading or worker"
    assert not (tmp_path / "runs" / "wrong" / snapshot.SNAPSHOT_NAME).exists(), "refused data is not pinned"


def test_tvlt_on_grounding_shards_and_a_pinned_recipe_are_refused(shard_writer, tmp_path):
    grounding = shard_writer(tmp_path / "grounding", counts=[3], grounding=True)
    base = ["--config", "tvlt_tiny", "--checkpoint.storage_path", str(tmp_path / "runs"), "--tracking.run_name", "r"]
    with pytest.raises(ConfigError, match=r"'grounding' shards .*tvlt-pretrain trains on 'pretrain'"):
        pretrain_main([*base, "--data.manifest", grounding])
    pretrain = shard_writer(tmp_path / "pretrain", counts=[4])
    recipe = contract.load_manifest(pretrain).recipe_hash
    with pytest.raises(ConfigError, match=rf"data\.recipe_hash: .* made by recipe {recipe}, the run asks for 0123"):
        pretrain_main([*base, "--data.manifest", pretrain, "--data.recipe_hash", "0123"])


def test_a_relaunch_on_another_folder_needs_refresh(shard_writer, tmp_path):
    first = shard_writer(tmp_path / "a", counts=[4])
    other = shard_writer(tmp_path / "b", counts=[4], seed=3)
    run = str(tmp_path / "runs" / "r")
    snap, how = snapshot.pin(run, first)
    snapshot.save(run, snap)
    assert how == "new" and snapshot.load(run).digest == snap.digest
    with pytest.raises(ValueError, match=r"data\.manifest .*pinned to .*/a .*--data\.refresh true"):
        snapshot.pin(run, other)
    moved, how = snapshot.pin(run, other, refresh=True)
    assert how == "refreshed" and moved.digest != snap.digest


# --- the loader reads the snapshot across an incremental run --------------------------------------------------------
def test_a_resumed_loader_reads_the_snapshot_not_the_changed_manifest(shard_writer, tmp_path):
    folder = tmp_path / "shards"
    shard_writer(folder, counts=[4, 4, 4])
    run = str(tmp_path / "run")
    snap, _ = snapshot.pin(run, str(folder))
    snapshot.save(run, snap)
    batcher = TvltBatcher(image_size=32, num_frames=4, patch_size=16, max_audio_frames=64)
    make = lambda data: StreamingLoader(data, batcher, batch_size=2, shuffle_buffer=3)  # noqa: E731
    uninterrupted = [b["keys"] for b in itertools.islice(iter(make(snap)), 9)]  # across an epoch boundary

    first = make(snapshot.load(run))
    it = iter(first)
    head = [next(it)["keys"] for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as a checkpoint holds it
    incremental_run(folder, retire="shard-00001.tar", add_samples=5)
    assert snapshot.take(str(folder)).digest != snap.digest, "the live manifest did change"

    pinned, how = snapshot.pin(run, str(folder))  # what a restart or relaunch does
    assert how == "kept" and pinned.digest == snap.digest
    resumed = make(pinned)
    resumed.load_state_dict(state)
    tail = [b["keys"] for b in itertools.islice(iter(resumed), 5)]
    assert head + tail == uninterrupted, "the same samples in the same order as without the interruption"


def test_refresh_restarts_the_epoch_and_says_so(shard_writer, tmp_path, caplog):
    folder = tmp_path / "shards"
    shard_writer(folder, counts=[4, 4, 4])
    batcher = TvltBatcher(image_size=32, num_frames=4, patch_size=16, max_audio_frames=64)
    old = StreamingLoader(str(folder), batcher, batch_size=2, shuffle_buffer=1)
    it = iter(old)
    next(it), next(it)
    incremental_run(folder, retire="shard-00001.tar", add_samples=6)
    new = StreamingLoader(str(folder), batcher, batch_size=2, shuffle_buffer=1)
    with caplog.at_level("WARNING"):
        new.load_state_dict(old.state_dict())
    assert new.step_in_epoch == 0 and "data.refresh" in caplog.text and new.snapshot.digest in caplog.text


# --- jobs on a real local Ray and MLflow -----------------------------------------------------------------------------
def job_argv(data, tmp_path, run_name, max_steps, *extra):
    return [
        "--config", "tvlt_tiny", "--data.manifest", str(data), "--data.batch_size", "2",
        "--checkpoint.storage_path", str(tmp_path / "runs"), "--work_dir", str(tmp_path / "work"),
        "--tracking.run_name", run_name, "--checkpoint.every_steps", "2", "--tracking.log_every_steps", "1",
        "--parallel.zero_stage", "0", "--tracking.system_metrics", "false", "--schedule.max_steps", str(max_steps),
        "--tracking.registered_model", run_name, *extra,
    ]  # fmt: skip


def final_loader_states(base, run_name) -> list[dict]:
    """Every rank's loader state in the run's newest checkpoint (Ray Train names them in time order)."""
    folder = base / "runs" / run_name
    newest = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))[-1]
    states = [json.loads(p.read_text()) for p in sorted(newest.glob("rank-*.json"))]
    assert len(states) == 2 and {s["step"] for s in states} == {8}, states
    return [s["loader"] for s in states]


def the_run(client, run_name):
    exp = client.get_experiment_by_name("tvlt-pretrain")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert len(runs) == 1
    return runs[0]


SHARDS = dict(counts=[4, 3, 3], frames=8, size=64, mel_lengths=(40, 100))


@pytest.fixture(scope="module")
def straight_run(ray_cluster, tmp_path_factory) -> list[dict]:
    """Every rank's final loader state of an uninterrupted 8-step run on ``SHARDS`` (what the others must equal).

    Its tars hold other header mtimes than the test's own copy of the same samples, so other sha256s: the digests
    are dropped, the rest (epoch, ordinals read and buffered, shuffle state) names the samples."""
    from tests.conftest import write_shards

    base = tmp_path_factory.mktemp("straight")
    write_shards(base / "a", **SHARDS)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert bounded(lambda: pretrain_main(job_argv(base / "a", base, "straight", 8)), JOB_TIMEOUT_S)[0] == 0
    states = final_loader_states(base, "straight")
    for s in states:
        s.pop("digest")
    return states


def test_a_relaunch_after_an_incremental_run_trains_on_the_snapshot(
    ray_cluster, straight_run, shard_writer, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shard_writer(tmp_path / "b", **SHARDS)
    assert bounded(lambda: pretrain_main(job_argv(tmp_path / "b", tmp_path, "pinned", 4)), JOB_TIMEOUT_S)[0] == 0
    incremental_run(tmp_path / "b", retire="shard-00001.tar", add_samples=6)
    assert bounded(lambda: pretrain_main(job_argv(tmp_path / "b", tmp_path, "pinned", 8)), JOB_TIMEOUT_S)[0] == 0

    # the jobs seed no model initialisation, so weights differ between any two runs; what the data was is in the
    # final checkpoints: every rank's loader position (epoch, ordinals read and buffered, shuffle state) over the
    # snapshot it names. Equal positions over the same shard list are the same samples in the same order.
    pinned = final_loader_states(tmp_path, "pinned")
    snap = snapshot.load(str(tmp_path / "runs" / "pinned"))
    assert {s.pop("digest") for s in pinned} == {snap.digest}, "the resumed loader read the snapshot"
    assert pinned == straight_run, "the relaunched run read other samples than the straight one"
    assert {s["num_samples"] for s in pinned} == {10}, "not the 13 samples of the changed manifest"
    client = MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db")
    run = the_run(client, "pinned")
    digests = [d.dataset.digest for d in run.inputs.dataset_inputs]
    assert digests == [snap.digest] and snap.generation == 1, "one dataset, the snapshot's"

    # moving on is explicit: a new dataset input, the loader restarts its epoch
    refreshed = job_argv(tmp_path / "b", tmp_path, "pinned", 9, "--data.refresh", "true")
    assert bounded(lambda: pretrain_main(refreshed), JOB_TIMEOUT_S)[0] == 0
    run = the_run(client, "pinned")
    now = snapshot.load(str(tmp_path / "runs" / "pinned"))
    assert now.generation == 2 and {d.dataset.digest for d in run.inputs.dataset_inputs} == {snap.digest, now.digest}


def test_a_damaged_shard_stops_the_job_once_naming_it(ray_cluster, shard_writer, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = shard_writer(tmp_path / "shards", counts=[4, 4, 4], frames=8, size=64)
    with open(f"{data}/shard-00001.tar", "r+b") as f:  # a flipped byte: same length, other sha256
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 0xFF]))
    argv = job_argv(data, tmp_path, "damaged", 12, "--parallel.max_failures", "2")
    with caplog.at_level("ERROR", logger="training"):
        code, _ = bounded(lambda: pretrain_main(argv), JOB_TIMEOUT_S)
    assert code == 1
    assert "shard-00001.tar: sha256" in caplog.text and "data.on_damage is fail" in caplog.text, caplog.text[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db")
    run = the_run(client, "damaged")
    assert run.info.status == "FAILED"
    assert run.data.tags[ATTEMPTS_TAG] == "1", "no Ray Train restart spent on a failure that would recur"
    assert not (tmp_path / "runs" / "damaged" / "stopped.json").exists(), "read and removed by launch"


@pytest.mark.slow  # a whole worker group started twice
def test_a_worker_killed_after_an_incremental_run_resumes_on_the_snapshot(
    ray_cluster, straight_run, shard_writer, tmp_path, monkeypatch
):
    """The restart case: an incremental run changes the folder under a running job, then a worker dies. The group
    Ray Train restarts from the checkpoint reads the run's snapshot, not the changed manifest."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "b"
    shard_writer(folder, **SHARDS)
    argv = job_argv(folder, tmp_path, "killed", 8)
    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(code=pretrain_main(argv)), daemon=True)
    job.start()
    committed = tmp_path / "runs" / "killed" / "checkpoint_manager_snapshot.json"
    killed, deadline = None, time.monotonic() + JOB_TIMEOUT_S
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        workers = ray_train_workers()
        if committed.exists() and b"checkpoint_" in committed.read_bytes() and len(workers) == 2:
            incremental_run(folder, retire="shard-00001.tar", add_samples=6)
            killed = workers[-1].pid
            os.kill(killed, signal.SIGKILL)  # the worker dies mid-run, no clean-up
        time.sleep(0.05)
    assert killed is not None, f"never saw a committed checkpoint with two live workers (job ended: {outcome})"
    job.join(max(1.0, deadline - time.monotonic()))
    assert not job.is_alive(), f"the job did not finish within {JOB_TIMEOUT_S} s"
    assert outcome.get("code") == 0, outcome

    run = the_run(MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db"), "killed")
    assert run.data.tags[ATTEMPTS_TAG] == "2", "exactly one restart of the group"
    assert 0 < int(run.data.tags["tvlt.resumed_from_step"]) < 8
    assert snapshot.take(str(folder)).digest != snapshot.load(str(tmp_path / "runs" / "killed")).digest
    states = final_loader_states(tmp_path, "killed")
    snap = snapshot.load(str(tmp_path / "runs" / "killed"))
    assert {s.pop("digest") for s in states} == {snap.digest}, "the restarted workers read the snapshot"
    assert states == straight_run, "the restarted group read other samples than the uninterrupted run"
