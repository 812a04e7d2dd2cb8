"""Evaluation: what the evaluators measure against the model run by hand, the baselines against hand-computed values,
Ray actors against one process, and the registry side (evaluation runs, version tags, promotion only on improvement)
through ``jobs/evaluate.py`` on a real sqlite MLflow.

    .venv/bin/python -m pytest tests/test_evaluate.py -q      # about a minute on 2 cores (Ray actors start twice)
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from mlflow import MlflowClient

from jobs.config import ConfigError
from jobs.evaluate import main as evaluate_main
from tvlt_core import metrics, shards
from tvlt_core.data.batches import TvltBatcher
from tvlt_core.eval import EvalParallel, EvalSettings, eval_units, evaluate
from tvlt_core.eval.tvlt import TvltEvaluator, gallery_sizes
from tvlt_core.eval.tvp import best_constant_metrics, random_segment_metrics
from tvlt_core.models.tvlt import TvltForPreTraining, tvlt_tiny
from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_tiny_config
from tvlt_core.text import TextTokenizer, build_vocab
from tvlt_core.tracking import RunTracker, tracking_uri
from tvlt_core.video import tvp_preprocess

TVLT_FRAMES, TVLT_SIZE = 4, 32


@pytest.fixture(scope="module")
def tvlt_folder(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tvlt"))
    TvltForPreTraining(tvlt_tiny(image_size=TVLT_SIZE, num_frames=TVLT_FRAMES)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrain_shards(tmp_path_factory) -> str:
    """Two shards (7 and 5 clips, two clips a video) of the shard contract; clips 0 and 11 have no audio."""
    from conftest import write_shards

    return write_shards(tmp_path_factory.mktemp("pt"), [7, 5], frames=TVLT_FRAMES, size=TVLT_SIZE,
                        mel_lengths=(40, 64, 24), silent_every=11, clips_per_video=2)  # fmt: skip


@pytest.fixture(scope="module")
def grounding_shards(tmp_path_factory) -> str:
    """Two shards (3 and 2 videos, two queries each); video n lasts d = 10 + n s, its two events [1, d/2] and
    [d/2 + 1, d - 1] s."""
    from conftest import write_shards

    return write_shards(tmp_path_factory.mktemp("gr"), [3, 2], frames=6, size=64, grounding=True)


def tvp_folder(root, grounding_sentences: list[str], segment: tuple[float, float] | None = None, seed: int = 0) -> str:
    """A tiny TVP with its tokenizer; with ``segment`` its head predicts that constant (start, end) fraction for every
    input (the last layer's weights zeroed, its bias the logits of the segment)."""
    torch.manual_seed(seed)
    tokenizer = TextTokenizer.from_vocab(build_vocab(grounding_sentences * 3, 100), 16)
    model = TvpForVideoGrounding(tvp_tiny_config(vocab_size=tokenizer.vocab_size))
    if segment is not None:
        with torch.no_grad():
            model.video_grounding_head.layer_1.weight.zero_()
            model.video_grounding_head.layer_1.bias.copy_(torch.logit(torch.tensor(segment)))
    model.save_pretrained(str(root), extra_files=tokenizer.files())
    return str(root)


# --- what the evaluators measure ---------------------------------------------------------------------------------------
def test_gallery_sizes_split_evenly():
    assert gallery_sizes(7, 4) == [4, 3]
    assert gallery_sizes(65, 32) == [22, 22, 21]
    assert gallery_sizes(3, 32) == [3]
    assert sum(gallery_sizes(1001, 32)) == 1001


def test_tvp_scores_every_query_as_the_model_predicts_it(tmp_path, grounding_shards, grounding_sentences):
    folder = tvp_folder(tmp_path / "tvp", grounding_sentences, seed=3)
    report = evaluate(folder, grounding_shards, EvalSettings(batch_size=3))
    assert report.counts == {"videos": 5, "queries": 10, "swap_pairs": 10, "skipped": 0}

    # by hand: every query of every video, one at a time, through the processor, tokenizer and model
    model = TvpForVideoGrounding.from_pretrained(folder).eval()
    tokenizer = TextTokenizer.from_folder(folder, 16)
    predicted, true = [], []
    for url in shards.shard_urls(grounding_shards):
        from tvlt_core.data.stream import read_shard

        for raw in read_shard(url):
            sample = shards.decode_sample(raw)
            frames = sample.frames[torch.linspace(0, len(sample.frames) - 1, 4).round().long().numpy()]
            pixels = tvp_preprocess(frames, 128)[None]
            for q in sample.record["queries"]:
                text = tokenizer([q["sentence"]])
                with torch.no_grad():
                    logits = model(text["input_ids"], pixels, text["attention_mask"]).logits[0]
                predicted.append((logits * sample.record["duration"]).tolist())
                true.append([q["start"], q["end"]])
    want = metrics.grounding_metrics(torch.tensor(predicted), torch.tensor(true))
    got = report.metrics()
    for key in ("r1_iou0.3", "r1_iou0.5", "r1_iou0.7", "miou"):
        assert got[key] == pytest.approx(want[key], abs=1e-5)
    assert report.primary == "r1_iou0.5" and "predictions.json" in report.files


def test_the_query_swap_rows_show_a_model_that_ignores_the_sentence(tmp_path, grounding_shards, grounding_sentences):
    """A TVP whose head predicts the first event's place in every video, whatever the sentence: its grounding beats
    random, and the swap rows say it does not read the sentence (moved 0, lands on the other event as often with
    either sentence); a trained model would need swap_moved well above 0."""
    folder = tvp_folder(tmp_path / "constant", grounding_sentences, segment=(0.1, 0.5))
    report = evaluate(folder, grounding_shards, EvalSettings(batch_size=4))
    assert report.value("r1_iou0.5") == pytest.approx(0.5), "every first event found, no second one"
    assert report.value("r1_iou0.5") > report.row("r1_iou0.5").references["random"]
    assert report.value("swap_moved") == 0.0 and report.row("swap_moved").references["best-constant"] == 0.0
    assert report.value("swap_lands_on_other") == report.value("swap_own_on_other") == pytest.approx(0.5)
    assert not report.row("swap_own_on_other").higher_is_better
    assert "swap: moved by the sentence" in report.table() and report.metrics()["random/swap_moved"] > 0


def test_best_constant_segment_by_hand():
    # two queries, the first and the second half of their videos: [0, 1] has IoU 0.5 with both (R@1 at 0.3 and 0.5
    # is 1), nothing reaches 0.7 on both (R@1 at 0.7 is 0.5, by predicting one half exactly), and no segment does
    # better than a mean IoU of 0.5
    best, segment = best_constant_metrics(torch.tensor([[0.0, 0.5], [0.5, 1.0]], dtype=torch.float64), 50)
    assert best == pytest.approx({"r1_iou0.3": 1.0, "r1_iou0.5": 1.0, "r1_iou0.7": 0.5, "miou": 0.5})
    # one true segment on the grid: the best constant finds it exactly
    best, segment = best_constant_metrics(torch.tensor([[0.2, 0.6]] * 3, dtype=torch.float64), 50)
    assert best["miou"] == pytest.approx(1.0) and segment == pytest.approx((0.2, 0.6))


def test_random_segment_against_its_expected_values():
    # against the whole video, a random segment's IoU is its length u2 - u1 (u1 < u2 uniform): mean 1/3, and
    # P(length >= m) = (1 - m)^2; 20000 draws put each estimate within 0.01 (over 3 standard errors)
    got = random_segment_metrics(torch.tensor([[0.0, 1.0]], dtype=torch.float64), 20000, seed=0)
    assert got["miou"] == pytest.approx(1 / 3, abs=0.01)
    for m in (0.3, 0.5, 0.7):
        assert got[f"r1_iou{m:g}"] == pytest.approx((1 - m) ** 2, abs=0.01)
    assert random_segment_metrics(torch.tensor([[0.1, 0.4]] * 5, dtype=torch.float64), 7, seed=1) == \
        random_segment_metrics(torch.tensor([[0.1, 0.4]] * 5, dtype=torch.float64), 7, seed=1)  # fmt: skip


def test_tvlt_reconstruction_and_matching_are_the_models(tvlt_folder, pretrain_shards):
    settings = EvalSettings(gallery_size=16, batch_size=4, seed=5)
    evaluator = TvltEvaluator.load(tvlt_folder, settings)
    unit = eval_units(pretrain_shards)[0]  # 7 clips, one gallery; clip 0 has no audio and is skipped
    part = evaluator.evaluate_unit(unit)
    assert len(part["keys"]) == 6 and part["skipped"] == 1 and len(part["scores"]) == 1

    # by hand: the same clips in one batch through the model, with the noise the evaluator draws per clip key
    model, c = evaluator.model, evaluator.model.config
    from tvlt_core.data.stream import read_shard

    items = [TvltBatcher(TVLT_SIZE, TVLT_FRAMES, 16, c.spectrogram_length).prepare(shards.decode_sample(raw), random.Random(0))
             for raw in read_shard(unit.url)]  # fmt: skip
    items = [it for it in items if not it["silent"]]
    batch = TvltBatcher(TVLT_SIZE, TVLT_FRAMES, 16, c.spectrogram_length, matching=False).collate(items, random.Random(0))
    n_audio = batch["audio_values"].shape[2] // 16 * c.freq_patches
    pixel_noise, audio_noise = evaluator.noise(batch["keys"], TVLT_FRAMES * c.patches_per_frame, n_audio)
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["audio_values"], batch["pixel_mask"], batch["audio_mask"],
                    labels=torch.ones(6, 1), pixel_values_mixed=batch["pixel_values"],
                    pixel_mask_mixed=batch["pixel_mask"], pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)  # fmt: skip
    sums = torch.tensor(part["pixel"]).sum(0)
    assert float(sums[0] / sums[1]) == pytest.approx(float(out.pixel_loss), rel=1e-5)  # MAE loss of the same patches
    sums = torch.tensor(part["audio"]).sum(0)
    assert float(sums[0] / sums[1]) == pytest.approx(float(out.audio_loss), rel=1e-5)
    scores = torch.tensor(part["scores"][0])
    torch.testing.assert_close(scores.diagonal(), out.matching_logits.view(-1), rtol=1e-4, atol=1e-5)  # true pairs

    report = TvltEvaluator.summarize([part], settings)
    # each audio's negative: the next clip (cyclically) cut from another video
    sources = [key.rsplit("_", 1)[0] for key in batch["keys"]]
    assert len(set(sources)) > 1 and any(a == b for a, b in zip(sources, sources[1:])), "the shard should mix both"
    negative = [next((i + d) % 6 for d in range(1, 6) if sources[(i + d) % 6] != sources[i]) for i in range(6)]
    assert report.value("matching_accuracy") == metrics.matching_accuracy(
        torch.cat([scores.diagonal(), scores[torch.arange(6), negative]]), torch.tensor([1] * 6 + [0] * 6))
    assert report.row("a2v_r1").references["chance"] == pytest.approx(1 / 6)
    assert report.row("pixel_mse").references["mean-fill"] > 0 and not report.row("pixel_mse").higher_is_better


@pytest.mark.slow
def test_ray_actors_give_the_single_process_report(ray_cluster, tmp_path, tvlt_folder, pretrain_shards, grounding_shards,
                                                   grounding_sentences):  # fmt: skip
    """Two actors, each loading the model once, on the same shards: the same numbers as one process."""
    settings = EvalSettings(gallery_size=4, batch_size=5)
    folder = tvp_folder(tmp_path / "tvp", grounding_sentences, seed=7)
    for model, data in ((tvlt_folder, pretrain_shards), (folder, grounding_shards)):
        single = evaluate(model, data, settings)
        spread = evaluate(model, data, settings, EvalParallel(actors=2))
        assert spread.counts == single.counts
        assert spread.metrics() == pytest.approx(single.metrics(), rel=1e-6, abs=1e-9)
        assert all(math.isfinite(v) for v in single.metrics().values())


# --- the job: MLflow runs, version tags, promotion ---------------------------------------------------------------------
def register(work: str, folder: str, name: str) -> str:
    """A new version of ``name`` made the way training makes one (run artifacts + registry)."""
    run_name = f"train-{random.randrange(1 << 30)}"
    tracker = RunTracker.start(experiment="train", run_name=run_name, params={}, system_metrics=False, work_dir=work)
    version = tracker.export_model(folder, registered_model=name, aliases=[], description="test model")
    tracker.end()
    return version


def champion(client: MlflowClient, name: str) -> str | None:
    version = client.get_registered_model(name).aliases.get("champion")
    return None if version is None else str(version)


def test_promotion_only_on_improvement(tmp_path, monkeypatch, grounding_shards, grounding_sentences, shard_writer):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, name = str(tmp_path / "work"), "tvp-test"
    client = MlflowClient(tracking_uri(work))
    # constant predictors, as fractions of the duration; each video's two events are about [0.1, 0.5], [0.6, 0.9]
    bad = register(work, tvp_folder(tmp_path / "bad", grounding_sentences, (0.0, 0.05)), name)  # IoU 0
    good = register(work, tvp_folder(tmp_path / "good", grounding_sentences, (0.1, 0.5)), name)  # the first: > 0.9
    fair = register(work, tvp_folder(tmp_path / "fair", grounding_sentences, (0.3, 0.6)), name)  # IoU < 0.45
    # evaluation must not lean on MLflow's process-wide URI: in the main job other processes (the Ray Train
    # workers) registered the models, and this process's MLflow points at its default store
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", f"sqlite:///{tmp_path}/elsewhere.db")

    def evaluate_version(version: str, data: str = grounding_shards, *extra: str) -> None:
        argv = ["--model", f"models:/{name}/{version}", "--data", data, "--work_dir", work, "--promote", "champion"]
        assert evaluate_main([*argv, *extra]) == 0

    def evaluation_runs() -> int:
        return len(client.search_runs([client.get_experiment_by_name("evaluation").experiment_id]))

    evaluate_version(bad)
    assert champion(client, name) == bad  # nothing held the alias
    evaluate_version(fair)
    assert champion(client, name) == bad  # R@1 IoU=0.5 is 0 for both: a tie is not an improvement
    evaluate_version(fair, grounding_shards, "--promote_metric", "miou")
    assert champion(client, name) == fair  # mean IoU about 0.2 beats 0
    evaluate_version(good)
    assert champion(client, name) == good
    evaluate_version(bad)
    assert champion(client, name) == good  # worse than the holder: stays
    # the holders' scores came from their eval.* tags (same data, same settings): one run per evaluation above
    assert evaluation_runs() == 5

    # the evaluation run and the version tags say the same, and the run names the version and the data
    tags = client.get_model_version(name, good).tags
    run = client.get_run(tags["eval.run_id"])
    assert float(tags["eval.r1_iou0.5"]) == pytest.approx(run.data.metrics["r1_iou0.5"], rel=1e-5) == 0.5  # 1 of 2
    assert run.data.metrics["random/r1_iou0.5"] < 1 and "best-constant/miou" in run.data.metrics
    assert run.data.tags["model.version"] == good and run.data.tags["model.name"] == name
    assert {t.key: t.value for t in run.inputs.dataset_inputs[0].tags}["mlflow.data.context"] == "evaluation"
    assert "evaluation/report.txt" in {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}

    # on other data the holder has no comparable score: it is evaluated again, and still wins
    other = shard_writer(tmp_path / "other", [2], frames=6, size=64, grounding=True, seed=1)
    evaluate_version(fair, other)
    assert champion(client, name) == good and evaluation_runs() == 7


def test_config_errors_name_the_setting(tmp_path, grounding_shards):
    with pytest.raises(ConfigError, match="data"):
        evaluate_main(["--model", "models:/m@champion"])
    with pytest.raises(ConfigError, match="promote"):
        evaluate_main(["--model", str(tmp_path), "--data", grounding_shards, "--promote", "champion"])
    with pytest.raises(ConfigError, match="reserved"):
        evaluate_main(["--model", "models:/m@x", "--data", grounding_shards, "--promote", "latest"])
    with pytest.raises(ConfigError, match="manifest"):
        evaluate_main(["--model", "models:/m@x", "--data", str(tmp_path / "nothing")])
    with pytest.raises(ConfigError, match="gallery_size"):
        evaluate_main(["--model", "models:/m@x", "--data", grounding_shards, "--eval.gallery_size", "1"])
