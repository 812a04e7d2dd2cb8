"""Registered versions as MLflow models: predict on raw videos (the evaluation's numbers), load by alias in a fresh
process, local and s3:// videos, bad rows named, no pickle anywhere, pictures with steps, evaluation metrics linked
to the version; the slow tier serves a version with ``mlflow models serve`` and posts to it.

Real parts throughout: the preprocessing job on Ray makes the shards the evaluation reads from the same mp4 files
predict reads; a real MLflow server on loopback; moto's S3 server through s3fs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.fixtures.pickles import holds_pickle, pickled_files
from tests.fixtures.servers import free_port, start_http_service, stop_service
from jobs.evaluate import main as evaluate_main
from jobs.preprocess import main as preprocess_main
from tvlt_core import shards
from tvlt_core.hf_folder import PREPROCESSING_NAME, read_folder
from tvlt_core.data.stream import read_shard
from tvlt_core.eval.settings import eval_units
from tvlt_core.models.tvlt import TvltForPreTraining, tvlt_tiny
from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_tiny_config
from tvlt_core.serving.export import lock_requirements
from tvlt_core.serving.predict import InputError, load_predictor
from tvlt_core.text import TextTokenizer, build_vocab
from tvlt_core.tracking import RunTracker, logged_model_id, resolve_model_uri

# small recipes, so the preprocessing job and the models stay fast on a CPU
GROUNDING_RECIPE = ["--grounding.frames", "8", "--grounding.size", "64"]
PRETRAIN_RECIPE = ["--clips.frames", "4", "--clips.size", "32"]  # preprocess_tiny: 2 s clips every 2 s


# --- fixtures: shards made by the preprocessing job, and models that carry the shards' recipe ------------------------
@pytest.fixture(scope="module")
def grounding_shards(ray_cluster, synthetic_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("serving") / "grounding")
    annotations = [str(synthetic_corpus.annotation_file(s)) for s in ("train", "test")]
    assert preprocess_main(["--config", "preprocess_tiny", "--mode", "grounding", "--input",
                            str(synthetic_corpus.root / "grounding"), "--output", out, *GROUNDING_RECIPE,
                            "--grounding.annotations", json.dumps(annotations)]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pretrain_shards(ray_cluster, synthetic_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("serving") / "pretrain")
    assert preprocess_main(["--config", "preprocess_tiny", "--mode", "pretrain", "--input",
                            str(synthetic_corpus.root / "pretrain"), "--output", out, *PRETRAIN_RECIPE]) == 0  # fmt: skip
    return out


def with_recipe(folder: Path, shards_url: str) -> str:
    """What an export writes beside the weights: the recipe of the shards the model was trained on."""
    (folder / PREPROCESSING_NAME).write_text(json.dumps(shards.load_manifest(shards_url).recipe))
    return str(folder)


@pytest.fixture(scope="module")
def tvp_model(tmp_path_factory, synthetic_corpus, grounding_shards) -> str:
    sentences = [e["sentence"] for v in synthetic_corpus.of_kind("grounding") for e in v["events"]]
    tokenizer = TextTokenizer.from_vocab(build_vocab(sentences * 3, 200), 16)
    torch.manual_seed(0)
    model = TvpForVideoGrounding(tvp_tiny_config(vocab_size=tokenizer.vocab_size, max_img_size=64))
    folder = tmp_path_factory.mktemp("tvp-model")
    model.save_pretrained(str(folder), extra_files=tokenizer.files())
    return with_recipe(folder, grounding_shards)


@pytest.fixture(scope="module")
def tvlt_model(tmp_path_factory, pretrain_shards) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tvlt-model")
    TvltForPreTraining(tvlt_tiny(image_size=32, num_frames=4)).save_pretrained(str(folder))
    return with_recipe(folder, pretrain_shards)


def videos_of(corpus, kind: str) -> dict[str, str]:
    """Sample key of clip 0 -> the video's path, for the corpus's videos of ``kind``."""
    return {shards.sample_key(str(corpus.path(v)), 0): str(corpus.path(v)) for v in corpus.of_kind(kind)}


# --- predict on raw videos gives what the evaluation of their shards gives ------------------------------------------------
def test_tvp_predict_on_raw_videos_equals_the_evaluation_of_their_shards(synthetic_corpus, grounding_shards, tvp_model):
    predictor = load_predictor(tvp_model)
    evaluated = [q for u in eval_units(grounding_shards) for q in predictor.evaluator.evaluate_unit(u)["queries"]]
    video_of = videos_of(synthetic_corpus, "grounding")
    assert len({q["key"] for q in evaluated}) == len(video_of) == 2 and len(evaluated) > 2
    table = pd.DataFrame({"video": [video_of[q["key"]] for q in evaluated], "sentence": [q["sentence"] for q in evaluated]})

    got = predictor.predict(table)

    want = np.array([q["predicted"] for q in evaluated])
    np.testing.assert_allclose(got[["start_s", "end_s"]].to_numpy(), want, rtol=1e-5, atol=1e-5)
    assert got["duration_s"].tolist() == [q["duration"] for q in evaluated]
    assert len(np.unique(want.round(5), axis=0)) > 1  # the model's answer depends on its input: equality means something
    assert (got["start_s"] >= 0).all() and (got["end_s"] <= got["duration_s"]).all()


def test_tvlt_predict_on_raw_videos_equals_the_evaluation_of_their_shards(synthetic_corpus, pretrain_shards, tvlt_model):
    predictor = load_predictor(tvlt_model)
    ev = predictor.evaluator
    own_logit, pooled = {}, {}
    for unit in eval_units(pretrain_shards):
        part = ev.evaluate_unit(unit)  # the evaluation itself: a (G, G) matching matrix per gallery
        sizes = [len(scores) for scores in part["scores"]]
        assert sum(sizes) == len(part["keys"])  # every gallery of this data has clips of two or more videos
        for scores, keys in zip(part["scores"], np.split(np.array(part["keys"]), np.cumsum(sizes)[:-1])):
            own_logit.update({k: scores[i][i] for i, k in enumerate(keys)})
        items = [ev.prepare(raw, unit.url) for raw in read_shard(unit.url)]
        batch = ev.batcher.collate([it for it in items if it is not None], random.Random(0))
        embedding, _ = ev.embed(batch)
        pooled.update(zip(batch["keys"], embedding))
    videos = sorted({str(synthetic_corpus.path(v)) for v in synthetic_corpus.of_kind("pretrain")})

    got = predictor.predict(pd.DataFrame({"video": videos}))

    keys = [shards.sample_key(v, c) for v, c in zip(got["video"], got["clip"])]
    assert sorted(keys) == sorted(pooled) and set(own_logit) <= set(keys) and len(own_logit) > 2
    np.testing.assert_allclose(np.stack(got["embedding"]), torch.stack([pooled[k] for k in keys]).numpy(), rtol=1e-5, atol=1e-5)
    scores = dict(zip(keys, got["matching_score"]))
    np.testing.assert_allclose([scores[k] for k in own_logit], torch.sigmoid(torch.tensor(list(own_logit.values()))).numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    records = [r for u in eval_units(pretrain_shards) for r in (shards.decode_sample(x).record for x in read_shard(u.url))]
    by_key = {r["key"]: r for r in records}
    assert [(by_key[k]["start"], by_key[k]["end"]) for k in keys] == list(zip(got["start_s"], got["end_s"]))


def test_a_bad_row_raises_naming_the_row_and_the_reason(synthetic_corpus, tvp_model, tvlt_model, tmp_path):
    grounding = next(iter(videos_of(synthetic_corpus, "grounding").values()))
    broken = synthetic_corpus.root / "broken"
    tvp, tvlt = load_predictor(tvp_model), load_predictor(tvlt_model)
    cases = [
        (tvp, {"video": [grounding, str(tmp_path / "gone.mp4")], "sentence": ["a", "b"]}, r"row 1 \(video '.*gone\.mp4'\): object not found"),
        (tvp, {"video": [grounding, str(broken / "not_video.mp4")], "sentence": ["a", "b"]}, r"row 1 .*not_video\.mp4'\): not a video"),
        (tvp, {"video": [str(broken / "audio_only.mp4")], "sentence": ["a"]}, r"row 0 .*: the container has no video stream"),
        (tvp, {"video": [grounding, grounding], "sentence": ["a", " "]}, r"row 1: sentence must be a non-empty string"),
        (tvp, {"video": [grounding]}, r"no column \['sentence'\]"),
        (tvlt, {"video": [grounding, str(broken / "no_audio.mp4")]}, r"row 1 .*no_audio\.mp4'\): the video has no audio stream"),
        (tvlt, {"video": [None]}, r"row 0: video must be a non-empty string"),
    ]  # fmt: skip
    for predictor, rows, message in cases:
        with pytest.raises(InputError, match=message):
            predictor.predict(pd.DataFrame(rows))


# --- the registry: MLflow models by alias, in a fresh process, local and s3:// ---------------------------------------------
def register(folder: str, name: str, run_name: str) -> tuple[str, str]:
    """(version, run id): logged and registered the way training does it, with the alias ``champion``."""
    tracker = RunTracker.start(experiment="serving-test", run_name=run_name, params={"model": name}, system_metrics=False)
    version = tracker.export_model(folder, registered_model=name, aliases=["champion"], description=f"card of {name}")
    tracker.end()
    return version, tracker.run_id


@pytest.fixture(scope="module")
def registered(mlflow_server, tvp_model, tvlt_model) -> dict[str, str]:
    """Both models registered on the MLflow server, ``champion`` on each: name -> version."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        out = {"tvp-serving": register(tvp_model, "tvp-serving", "serving-tvp")[0],
               "tvlt-serving": register(tvlt_model, "tvlt-serving", "serving-tvlt")[0]}  # fmt: skip
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return out


def test_pickle_scan_finds_pickles():
    """The scanner used below flags what torch.save and pickle write, and nothing in our own text files."""
    import io
    import pickle

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    assert holds_pickle(pickle.dumps({"a": 1})) and holds_pickle(buffer.getvalue())
    assert holds_pickle(b"header\n" + pickle.dumps([1, 2]))
    assert not holds_pickle(Path(__file__).read_bytes()) and not holds_pickle(b'{"model_type": "tvp"}')


def test_registered_versions_are_mlflow_models_without_pickle(mlflow_server, registered, tvp_model, tmp_path):
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    for name, version in registered.items():
        mv = client.get_model_version(name, version)
        model_id = logged_model_id(mv)
        assert mv.description == f"card of {name}" and model_id
        linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
        assert {(v["name"], str(v["version"])) for v in linked} == {(name, version)}  # the model page lists the version
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        assert info.model_uuid and info.signature is not None and info.saved_input_example_info["type"] == "dataframe"
        assert info.signature.inputs.input_names() == (["video", "sentence"] if name.startswith("tvp") else ["video"])
        model_dir = Path(mlflow.artifacts.download_artifacts(client.get_logged_model(model_id).artifact_location,
                                                             dst_path=str(tmp_path / name), tracking_uri=mlflow_server))  # fmt: skip
        assert "python_model.pkl" not in {p.name for p in model_dir.rglob("*")} and (model_dir / "pyfunc_model.py").exists()
        requirements = (model_dir / "requirements.txt").read_text().split()
        assert requirements == lock_requirements()
        for line in requirements:  # the venv is the lock (tests/test_lock.py), so each pin is the installed version
            package, pinned = line.split("[")[0].split("==")[0], line.rsplit("==", 1)[1]
            assert importlib.metadata.version(package) == pinned, line
        run_dir = Path(client.download_artifacts(mv.run_id, "", str(tmp_path / f"{name}-run")))
        assert pickled_files(model_dir) == [] and pickled_files(run_dir) == []
    # the Hugging Face folder is inside, so from_pretrained by alias keeps working, weights and all
    folder = resolve_model_uri("models:/tvp-serving@champion", store=mlflow_server)
    config, state = read_folder(folder)
    _, original = read_folder(tvp_model)
    assert config["model_type"] == "tvp" and state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in state)
    assert {"tokenizer.json", PREPROCESSING_NAME} <= {p.name for p in Path(folder).iterdir()}


FRESH_PROCESS = """
import json, sys
import mlflow, pandas as pd
uri, rows = sys.argv[1], json.loads(sys.argv[2])
out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(rows))
print("RESULT " + out.to_json(orient="records"))
"""


def predict_in_fresh_process(uri: str, rows: dict, env: dict) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, uri, json.dumps(rows)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


def test_load_by_alias_in_a_fresh_process_on_local_and_s3_videos(mlflow_server, registered, s3_endpoint, synthetic_corpus,
                                                                 tvp_model, tvlt_model):  # fmt: skip
    grounding = sorted(videos_of(synthetic_corpus, "grounding").values())[0]
    pretrain = sorted(str(synthetic_corpus.path(v)) for v in synthetic_corpus.of_kind("pretrain"))[0]
    s3 = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
          "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    fs = fsspec.filesystem("s3", key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("videos")
    fs.put(grounding, "videos/grounding.mp4")
    fs.put(pretrain, "videos/pretrain.mp4")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, **s3}
    sentence = "the red circle moves left"

    tvp_rows = {"video": [grounding, "s3://videos/grounding.mp4"], "sentence": [sentence, sentence]}
    got = predict_in_fresh_process("models:/tvp-serving@champion", tvp_rows, env)
    want = load_predictor(tvp_model).predict(pd.DataFrame({"video": [grounding], "sentence": [sentence]}))
    for row in got:  # the local file and its copy on S3 give the in-process numbers
        assert [row["start_s"], row["end_s"]] == pytest.approx([want.start_s[0], want.end_s[0]], rel=1e-5, abs=1e-6)

    got = predict_in_fresh_process("models:/tvlt-serving@champion", {"video": ["s3://videos/pretrain.mp4"]}, env)
    want = load_predictor(tvlt_model).predict(pd.DataFrame({"video": [pretrain]}))
    assert [r["clip"] for r in got] == want["clip"].tolist() and len(got) >= 1
    np.testing.assert_allclose([r["matching_score"] for r in got], want["matching_score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array([r["embedding"] for r in got]), np.stack(want["embedding"]), rtol=1e-5, atol=1e-6)

    # through MLflow in this process too: a missing object is a bad row with its reason
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3, "MLFLOW_TRACKING_URI": mlflow_server}.items():
            mp.setenv(k, v)
        model = mlflow.pyfunc.load_model("models:/tvp-serving@champion")
        with pytest.raises(MlflowException, match=r"row 1 \(video 's3://videos/missing\.mp4'\)"):
            model.predict(pd.DataFrame({"video": [grounding, "s3://videos/missing.mp4"], "sentence": [sentence] * 2}))


# --- the UI's view: evaluation metrics linked to the version and the data --------------------------------------------
def test_evaluation_metrics_have_real_timestamps_and_link_version_and_dataset(mlflow_server, registered, grounding_shards,
                                                                              tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert evaluate_main(["--model", "models:/tvp-serving@champion", "--data", grounding_shards,
                          "--work_dir", str(tmp_path)]) == 0  # fmt: skip
    mv = client.get_model_version("tvp-serving", registered["tvp-serving"])
    run = client.get_run(mv.tags["eval.run_id"])
    start, end = run.info.start_time, run.info.end_time
    history = client.get_metric_history(run.info.run_id, "r1_iou0.5")
    assert history and all(start <= m.timestamp <= end for m in history), (start, end, [m.timestamp for m in history])
    (evaluated,) = [d for d in run.inputs.dataset_inputs if {t.key: t.value for t in d.tags}["mlflow.data.context"] == "evaluation"]
    model_id = logged_model_id(mv)
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    linked = [m for m in client.get_logged_model(model_id).metrics if m.key == "r1_iou0.5"]
    assert linked and linked[-1].run_id == run.info.run_id
    assert (linked[-1].dataset_name, linked[-1].dataset_digest) == (evaluated.dataset.name, evaluated.dataset.digest)
    assert linked[-1].value == pytest.approx(float(mv.tags["eval.r1_iou0.5"]), rel=1e-5)


# --- serving over HTTP ------------------------------------------------------------------------------------------------------
def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_in_process_numbers(mlflow_server, registered, synthetic_corpus, tvp_model,
                                                                  tmp_path):  # fmt: skip
    grounding = sorted(videos_of(synthetic_corpus, "grounding").values())
    sentences = ["the red circle moves left", "a blue square appears"]
    rows = {"video": grounding, "sentence": sentences[: len(grounding)]}
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the server runs uvicorn from the environment, as an activated venv does
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = str(Path(bin_dir) / "mlflow")
    server = start_http_service([mlflow_cli, "models", "serve", "-m", "models:/tvp-serving@champion", "--env-manager",
                                 "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", timeout_s=240, env=env)  # fmt: skip
    try:
        status, answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_split": {"columns": list(rows),
                              "data": [list(r) for r in zip(*rows.values())]}})  # fmt: skip
        assert status == 200, answer
        want = load_predictor(tvp_model).predict(pd.DataFrame(rows))
        got = pd.DataFrame(answer["predictions"])
        np.testing.assert_allclose(got[["start_s", "end_s", "duration_s"]].to_numpy(),
                                   want[["start_s", "end_s", "duration_s"]].to_numpy(), rtol=1e-5, atol=1e-6)  # fmt: skip
        status, answer = post(f"http://127.0.0.1:{port}/invocations",
                              {"dataframe_records": [{"video": str(tmp_path / "gone.mp4"), "sentence": "x"}]})
        assert status == 400 and "row 0" in answer["message"] and "object not found" in answer["message"], answer
    finally:
        stop_service(server)  # the server and its worker, started here, by their process group
