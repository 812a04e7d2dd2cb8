"""The training jobs end to end on a real local Ray, real DeepSpeed, real MLflow (sqlite, or a server on loopback)
and moto's S3 server: ZeRO-2 on uneven shards then relaunched to resume, ZeRO-3 with a worker killed mid-run on
s3:// shards and storage, TVP fine-tuning from a Hugging Face folder. Each job is bounded by a timeout.

    .venv/bin/python -m pytest tests/test_train_jobs.py -q      # a few minutes on 2 cores (-m slow: the kill test)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import mlflow
import pytest
import s3fs
import torch
from mlflow import MlflowClient

from tests.fixtures.images import image_steps
from jobs.config import ConfigError
from jobs.finetune_tvp import main as finetune_main
from jobs.pretrain import main as pretrain_main
from tests.fixtures.bounded import bounded
from tests.fixtures.ray_workers import ray_train_workers
from tvlt_core.models.tvlt import TvltForPreTraining
from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_tiny_config
from tvlt_core.text import TextTokenizer, build_vocab
from tvlt_core.tracking import ATTEMPTS_TAG, RUN_NAME_TAG, resolve_model_uri, tracking_store
from tvlt_core.train.engine import DEEPSPEED_STATE_CLASSES, SafeCheckpointEngine

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # a rank waiting forever on another (uneven shards) fails the test instead of hanging CI


def the_run(client: MlflowClient, experiment: str, run_name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    assert len(runs) == 1, f"one MLflow run per job, found {len(runs)}"
    return runs[0]


def logged_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def latest_checkpoint(fs, run_folder: str) -> str:
    """The newest Ray Train checkpoint folder of a run (names sort by time)."""
    entries = fs.ls(run_folder, detail=True, refresh=True)
    folders = sorted(e["name"] for e in entries if e["type"] == "directory" and e["name"].rsplit("/", 1)[-1].startswith("checkpoint_"))
    assert folders, f"no checkpoint under {run_folder}"
    return folders[-1]


def same_outputs(model_a, model_b, config) -> None:
    """Both models give the same pretraining outputs on one batch (eval mode, fixed masking noise)."""
    torch.manual_seed(1)
    b, t, s = 2, config.num_frames, config.image_size
    pixels = torch.rand(b, t, 3, s, s) * 2 - 1
    audio = torch.rand(b, 1, 64, 128) * 2 - 1
    inputs = dict(
        pixel_values=pixels, audio_values=audio, pixel_values_mixed=pixels.flip(0), labels=torch.tensor([[0.0], [1.0]]),
        pixel_mask_noise=torch.rand(b, t * config.patches_per_frame), audio_mask_noise=torch.rand(b, 64 // 16 * 8),
    )  # fmt: skip
    with torch.no_grad():
        a, c = model_a.eval()(**inputs), model_b.eval()(**inputs)
    for name in ("loss", "matching_logits", "pixel_logits", "audio_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(c, name), rtol=0, atol=0, msg=name)


# --- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, setting",
    [
        (["--config", "tvlt_tiny", "--data.manifest", ""], "data.manifest"),
        (["--config", "tvlt_tiny", "--data.batch_size", "1"], "data.batch_size"),
        (["--config", "tvlt_tiny", "--parallel.zero_stage", "4"], "parallel.zero_stage"),
        (["--config", "tvlt_tiny", "--parallel.offload_params", "true"], "parallel.offload_params"),
        (["--config", "tvlt_tiny", "--tracking.aliases", "[latest]"], "tracking.aliases"),
        (["--config", "tvlt_tiny", "--optim.lrr", "1"], "optim.lrr"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_setting(argv, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        pretrain_main(argv)


def test_presets_parse():
    from jobs.config import parse
    from jobs.finetune_tvp import FinetuneConfig
    from jobs.pretrain import PretrainConfig

    for cls, names in ((PretrainConfig, ["tvlt_tiny", "tvlt_base"]), (FinetuneConfig, ["tvp_tiny", "tvp_base"])):
        for name in names:
            cfg = parse(cls, ["--config", name], prog="t")
            assert cfg.model.preset == name.split("_")[1]
            assert cfg.parallel.use_gpu is (name.endswith("base"))


# --- jobs on a local Ray ---------------------------------------------------------------------------------------------
def test_zero2_on_uneven_shards_then_relaunch_resumes_the_same_run(ray_cluster, shard_writer, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = shard_writer(tmp_path / "shards", counts=[7, 1, 3, 2], frames=8, size=64, mel_lengths=(40, 100))
    argv = [
        "--config", "tvlt_tiny", "--data.manifest", shards, "--data.batch_size", "2",
        "--checkpoint.storage_path", str(tmp_path / "runs"), "--work_dir", str(tmp_path / "work"),
        "--tracking.run_name", "uneven", "--checkpoint.every_steps", "2", "--tracking.log_every_steps", "1",
        "--parallel.zero_stage", "2", "--tracking.system_metrics", "false",
    ]  # fmt: skip
    # 13 samples in shards of 7, 1, 3 and 2 over 2 ranks: 3 steps per epoch on each, so 4 steps cross an epoch
    assert bounded(lambda: pretrain_main([*argv, "--schedule.max_steps", "4"]), JOB_TIMEOUT_S)[0] == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db")
    run = the_run(client, "tvlt-pretrain", "uneven")
    assert logged_steps(client, run.info.run_id) == [1, 2, 3, 4]

    # a finished run, trained on
    assert bounded(lambda: pretrain_main([*argv, "--schedule.max_steps", "6"]), JOB_TIMEOUT_S)[0] == 0
    run = the_run(client, "tvlt-pretrain", "uneven")
    assert logged_steps(client, run.info.run_id) == [1, 2, 3, 4, 5, 6], "no step repeated, none missing"
    assert run.data.tags[ATTEMPTS_TAG] == "2" and run.data.tags["tvlt.resumed_from_step"] == "4"
    assert run.data.params["schedule.max_steps"] == "4" and run.data.tags["resumed_with.schedule.max_steps"] == "6"
    assert run.data.tags["tvlt.ray_nodes"] == "1"
    inputs = run.inputs.dataset_inputs[0]
    assert {t.key: t.value for t in inputs.tags}["samples"] == "13"
    assert len(client.search_model_versions("name='tvlt-pretrain'")) == 2
    # pictures at the end of each launch, on the UI's step slider; nothing else under samples/ for TVLT
    assert image_steps(client, run.info.run_id) == {"frames": [4, 6], "spectrogram": [4, 6]}
    assert client.list_artifacts(run.info.run_id, "samples") == []
    assert "config.yaml" in {f.path for f in client.list_artifacts(run.info.run_id)}

    # the registered model is the trained model: the final checkpoint's module weights, read independently
    fs = fsspec.filesystem("file")
    checkpoint = latest_checkpoint(fs, str(tmp_path / "runs" / "uneven"))
    state = SafeCheckpointEngine(None).load(f"{checkpoint}/deepspeed/step-00000006/mp_rank_00_model_states.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/work/mlflow.db")
    registered = TvltForPreTraining.from_pretrained("models:/tvlt-pretrain@latest")
    trained = TvltForPreTraining(registered.config)
    trained.load_state_dict(state["module"])
    same_outputs(registered, trained, registered.config)
    assert (tmp_path / "runs" / "uneven" / "config.yaml").exists()


def test_tvp_finetunes_from_a_hugging_face_folder_and_registers_with_its_tokenizer(
    ray_cluster, shard_writer, grounding_sentences, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = shard_writer(tmp_path / "shards", counts=[3, 3], frames=6, size=96, grounding=True)
    tokenizer = TextTokenizer.from_vocab(build_vocab(grounding_sentences, vocab_size=60), max_text_length=16)
    start = TvpForVideoGrounding(tvp_tiny_config(vocab_size=tokenizer.vocab_size))
    start.save_pretrained(str(tmp_path / "start"), extra_files=tokenizer.files())
    argv = [
        "--config", "tvp_tiny", "--data.manifest", shards, "--checkpoint.init_from", str(tmp_path / "start"),
        "--checkpoint.storage_path", str(tmp_path / "runs"), "--work_dir", str(tmp_path / "work"),
        "--tracking.run_name", "tvp", "--schedule.max_steps", "4", "--checkpoint.every_steps", "2",
        "--parallel.zero_stage", "0", "--tracking.system_metrics", "false", "--tracking.artifact_every_steps", "2",
    ]  # fmt: skip
    assert bounded(lambda: finetune_main(argv), JOB_TIMEOUT_S)[0] == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db")
    run = the_run(client, "tvp-grounding", "tvp")
    assert logged_steps(client, run.info.run_id) == [4]  # log_every_steps 5 in the preset: only the last step
    assert {"train/miou", "train/r1_iou0.5", "train/grad_norm", "perf/samples_per_s"} <= run.data.metrics.keys()
    assert image_steps(client, run.info.run_id) == {"segments": [2, 4]}  # artifact_every_steps 2, and the end
    samples = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/step-00000002", "samples/step-00000004"]
    assert "segments.json" in {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, samples[0])}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/work/mlflow.db")
    folder = Path(resolve_model_uri("models:/tvp-grounding@latest"))
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "README.md", "preprocessing.json"} <= names
    assert json.loads((folder / "preprocessing.json").read_text()) == {"test": True}  # the recipe of its shards
    version = client.get_model_version_by_alias("tvp-grounding", "latest")
    assert version.description == (folder / "README.md").read_text()  # the model card
    with tracking_store(f"sqlite:///{tmp_path}/work/mlflow.db"):  # an earlier in-process job pointed the fluent API
        assert mlflow.models.get_model_info(f"models:/tvp-grounding/{version.version}").signature is not None
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "no pickle in the registry"
    model = TvpForVideoGrounding.from_pretrained("models:/tvp-grounding@latest")
    assert TextTokenizer.from_folder(str(folder)).vocab_size == model.config.vocab_size == tokenizer.vocab_size
    moved = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))
    assert moved, "fine-tuning changed the weights it started from"


# --- a worker killed mid-run, shards and storage on s3://, MLflow through a server -------------------------------------
@pytest.mark.slow  # its own Ray, an MLflow server, and a whole worker group started twice
def test_a_killed_worker_restarts_the_group_from_the_checkpoint(
    s3_endpoint, mlflow_server, shard_writer, tmp_path, monkeypatch
):
    secret, password = "s3-secret-never-logged", "mlflow-password-never-logged"
    s3_env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": secret,
              "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("train-kill")
    shards = shard_writer("s3://train-kill/shards", counts=[6, 5, 5], frames=8, size=64, mel_lengths=(40, 100))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(s3_env, MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_TRACKING_USERNAME="trainer",
               MLFLOW_TRACKING_PASSWORD=password, PYTHONPATH=str(REPO))  # fmt: skip
    max_steps = 24
    argv = [
        sys.executable, "jobs/pretrain.py", "--config", "tvlt_tiny", "--data.manifest", shards,
        "--checkpoint.storage_path", "s3://train-kill/runs", "--work_dir", str(tmp_path / "work"),
        "--tracking.run_name", "killed", "--parallel.zero_stage", "3", "--schedule.max_steps", str(max_steps),
        "--checkpoint.every_steps", "4", "--tracking.log_every_steps", "1", "--data.batch_size", "2",
    ]  # fmt: skip
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:  # `python jobs/pretrain.py` alone: the job starts its own local Ray
        job = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        killed = None
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while killed is None and job.poll() is None and time.monotonic() < deadline:
            # a checkpoint counts once Ray's controller has committed it to the run's snapshot
            snapshot = "train-kill/runs/killed/checkpoint_manager_snapshot.json"
            fs.invalidate_cache()
            committed = fs.exists(snapshot) and b"checkpoint_" in fs.cat(snapshot)
            workers = ray_train_workers(job.pid)
            if committed and len(workers) == 2:
                killed = workers[-1].pid
                os.kill(killed, 9)  # SIGKILL: the worker dies mid-run, no clean-up
            time.sleep(0.2)
        assert killed is not None, f"never saw a checkpoint with two live workers:\n{log_path.read_text()[-3000:]}"
        job.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)  # the job and the Ray it started, all started by this test
    output = log_path.read_text()
    assert job.returncode == 0, output[-5000:]

    client = MlflowClient(mlflow_server)
    run = the_run(client, "tvlt-pretrain", "killed")
    assert run.data.tags[ATTEMPTS_TAG] == "2", "exactly one restart of the group"
    assert 0 < int(run.data.tags["tvlt.resumed_from_step"]) < max_steps
    assert logged_steps(client, run.info.run_id) == list(range(1, max_steps + 1)), "each step logged once"
    checkpoint = latest_checkpoint(fs, "train-kill/runs/killed")
    local = tmp_path / "final"
    fs.get(checkpoint, str(local), recursive=True)
    assert '"step": %d' % max_steps in (local / "rank-00001.json").read_text()

    # ZeRO-3 shards consolidated by DeepSpeed's own tool (its torch.load made to refuse code) = the registered model
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(DEEPSPEED_STATE_CLASSES):
            return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(local / "deepspeed"), tag=f"step-{max_steps:08d}")
    monkeypatch.setattr(torch, "load", real_load)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registered = TvltForPreTraining.from_pretrained("models:/tvlt-pretrain@latest")
    trained = TvltForPreTraining(registered.config)
    trained.load_state_dict(consolidated, strict=False)  # parameters; buffers are the model's own
    same_outputs(registered, trained, registered.config)

    # secrets from the environment reach neither logs nor MLflow
    params = " ".join(run.data.params.values())
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    for text in (output, params, config):
        assert secret not in text and password not in text


def test_a_local_ray_started_for_training_serves_the_state_api():
    """Ray Train's placement-group cleaner polls the State API every second; on a local Ray without it the
    cleaner logs a warning per poll for the rest of the session and never exits. Training and the main job start
    theirs with ``connect_ray(..., dashboard=True)``."""
    start = "from tvlt_core.ray_session import connect_ray\nassert connect_ray(need_cpus=3, dashboard=True)"
    # the address named: the session's own Ray (ray_cluster) may be running beside this one
    code = (f"{start}\nimport ray\nassert ray.cluster_resources()['CPU'] >= 3\nfrom ray.util.state import list_actors\n"
            "list_actors(address=ray.get_runtime_context().gcs_address)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_relative_manifest_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from tvlt_core.tracking import RunInfo
    from tvlt_core.train.config import TrainingConfig
    from tvlt_core.train.ray_job import TrainJob

    monkeypatch.chdir(tmp_path)
    cfg = TrainingConfig()
    cfg.data.manifest = "shards/train"
    job = TrainJob(task=None, cfg=cfg, run=RunInfo("r"))
    assert job.cfg.data.manifest == str(tmp_path / "shards" / "train")
    assert job.cfg.work_dir == str(tmp_path / "work")
    cfg.data.manifest = "s3://bucket/shards"
    assert TrainJob(task=None, cfg=cfg, run=RunInfo("r")).cfg.data.manifest == cfg.data.manifest
