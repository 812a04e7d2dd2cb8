"""Preprocessing parts without Ray: clip sampling, config rules, listing, crash isolation, tar writing, plans."""

import io
import json
import os
import signal
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.processes import Killer

from jobs.config import ConfigError, parse
from jobs.preprocess import main
from pipelines import manifests, writer
from tvlt_core import clips
from pipelines.config import MAX_CLIP_S, PreprocessConfig, SourceConfig, StorageConfig
from pipelines.config import AudioConfig, ClipConfig
from pipelines.recipes import PretrainRecipe
from pipelines.failures import RetryPolicy
from pipelines.sandbox import Sandbox, SandboxCrash, SandboxError
from pipelines.sources import list_sources
from pipelines.stages import DecodeStage, StageSettings, initial_row
from tvlt_core import shards


# ------------------------------------------------------------------------------------------------- clip sampling
@pytest.mark.parametrize("duration, length, stride, min_length, expected", [
    (25.0, 10.0, 10.0, 1.0, [(0, 10), (10, 20), (20, 25)]),  # trailing window kept: 5 s >= 1 s
    (20.5, 10.0, 10.0, 1.0, [(0, 10), (10, 20)]),  # trailing 0.5 s dropped
    (3.0, 10.0, 10.0, 1.0, [(0, 3)]),  # shorter than one clip: one short clip
    (0.5, 10.0, 10.0, 1.0, []),  # too short for any clip
    (12.0, 10.0, 5.0, 1.0, [(0, 10), (5, 12)]),  # overlapping windows stop once one reaches the end
])
def test_windows(duration, length, stride, min_length, expected):
    got = clips.windows(duration, length, stride, min_length)
    assert [(c.start, c.end) for c in got] == expected
    assert [c.index for c in got] == list(range(len(expected)))


def test_frame_instants_and_indices_follow_presentation_times():
    clip = clips.Clip(0, 2.0, 4.0)
    np.testing.assert_allclose(clips.frame_times(clip, 4), [2.25, 2.75, 3.25, 3.75])
    # variable frame rate: frames shown at 0, 0.1, 0.5, 0.6, 2.0 s
    starts = np.array([0.0, 0.1, 0.5, 0.6, 2.0])
    assert clips.frame_indices(np.array([0.0, 0.05, 0.1, 0.4, 0.59, 1.9, 2.0, 9.0]), starts).tolist() == [
        0, 0, 1, 1, 2, 3, 4, 4]
    assert clips.sample_range(clip, 100, offset=0.5) == (150, 350)


def test_keyframe_sampling_takes_the_nearest_keyframe_inside_the_clip():
    starts = np.arange(90) / 30.0  # 3 s at 30 fps, keyframes every 0.5 s and one late one
    keys = np.array([0, 15, 30, 45, 60, 75, 80])
    instants = clips.frame_times(clips.Clip(0, 0.0, 2.0), 8)  # 0.125, 0.375, ..., 1.875
    assert clips.keyframe_indices(instants, starts, keys, (0.0, 2.0)).tolist() == [0, 15, 15, 30, 30, 45, 45, 45]
    # only the clip's own keyframes count: 1.875 would be nearest the one at 2.0 s, outside [0, 2)
    # a tie (0.25 s from 0.0 and from 0.5) takes the earlier keyframe
    assert clips.keyframe_indices(np.array([0.25, 1.1]), starts, keys, (0.0, 2.0)).tolist() == [0, 30]
    # no keyframe inside the window: the exact frames
    window = clips.Clip(0, 2.55, 2.65)
    inside = clips.frame_times(window, 2)
    assert clips.keyframe_indices(inside, starts, keys, (2.55, 2.65)).tolist() == clips.frame_indices(inside, starts).tolist()


# ------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("argv, names", [
    (["--clips.length_s", "30"], ["clips.length_s", f"{MAX_CLIP_S:.3f}"]),
    (["--mode", "grounding"], ["grounding.annotations"]),
    (["--clips.min_length_s", "0.01"], ["clips.min_length_s"]),
    (["--audio.missing", "ignore"], ["audio.missing", "quarantine", "silent"]),
    (["--shards.target_bytes", "10"], ["shards.target_bytes"]),
    (["--limits.decoder_memory_gib", "0.1"], ["limits.decoder_memory_gib"]),
    (["--limits.max_duration_s", "-1"], ["limits.max_duration_s"]),
    (["--failures.attempts", "0"], ["failures.attempts"]),
    (["--failures.backoff_s", "5", "--failures.max_backoff_s", "1"], ["failures.backoff_s", "max_backoff_s"]),
    (["--failures.max_failed_share", "1.5"], ["failures.max_failed_share"]),
    (["--storage.read_timeout_s", "0"], ["storage.read_timeout_s"]),
    (["--storage.request_attempts", "0"], ["storage.request_attempts"]),
    (["--lease.ttl_s", "1"], ["lease.ttl_s"]),
    (["--lease.ttl_s", "30", "--lease.renew_s", "20"], ["lease.renew_s", "lease.ttl_s / 3 = 10"]),
    (["--lease.renew_s", "0"], ["lease.renew_s"]),
    (["--clips.sampling", "sparse"], ["clips.sampling", "exact", "keyframe"]),
    (["--mode", "grounding", "--grounding.annotations", "[a.txt]", "--clips.sampling", "keyframe"],
     ["clips.sampling", "grounding samples exact frames"]),
])
def test_bad_settings_fail_before_any_work_naming_the_setting(argv, names, tmp_path):
    with pytest.raises(ConfigError) as err:
        parse(PreprocessConfig, ["--input", str(tmp_path), "--output", str(tmp_path / "o"), *argv], prog="p")
    for name in names:
        assert name in str(err.value)


def test_an_input_that_does_not_exist_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--dry-run"])


def test_dry_run_prints_the_plan_and_writes_nothing(synthetic_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--config", "preprocess_tiny", "--input", str(synthetic_corpus.root / "pretrain"), "--output",
                 str(out), "--mode", "pretrain", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "generation 1: 6 new, 0 changed, 0 unchanged" in printed and "nothing was written" in printed
    assert all(str(synthetic_corpus.path(v)) in printed for v in synthetic_corpus.of_kind("pretrain"))


# ------------------------------------------------------------------------------------------------------ listing
def test_listing_folders_globs_and_list_files(synthetic_corpus, tmp_path):
    root = synthetic_corpus.root
    everything = list_sources(str(root), SourceConfig(), StorageConfig())
    assert len(everything) == len(synthetic_corpus.videos)  # every .mp4 below the folder, nothing else
    assert [s.sid for s in everything] == sorted(s.sid for s in everything)
    assert all(s.size == os.path.getsize(s.uri) and s.mtime for s in everything)
    globbed = list_sources(str(root / "pretrain" / "pt_0000[01].mp4"), SourceConfig(), StorageConfig())
    assert sorted(os.path.basename(s.uri) for s in globbed) == ["pt_00000.mp4", "pt_00001.mp4"]

    rel = [f"pretrain/pt_0000{i}.mp4" for i in range(3)]
    (root_list := tmp_path / "list").mkdir()
    table = pa.table({"video": [str(root / r) for r in rel] + [str(root / "gone.mp4")],
                      "label": [1, 2, 3, 4]})
    pq.write_table(table, root_list / "videos.parquet")
    (root_list / "videos.csv").write_text("uri,label\n" + "".join(f"{root / r},{i}\n" for i, r in enumerate(rel)))
    (root_list / "pretrain").symlink_to(root / "pretrain")
    (root_list / "list.jsonl").write_text("".join(json.dumps({"uri": r, "label": i}) + "\n" for i, r in enumerate(rel)))
    from_jsonl = list_sources(str(root_list / "list.jsonl"), SourceConfig(), StorageConfig())  # relative URIs
    assert {s.uri for s in from_jsonl} == {str(root_list / r) for r in rel}
    from_csv = list_sources(str(root_list / "videos.csv"), SourceConfig(), StorageConfig())
    from_parquet = list_sources(str(root_list / "videos.parquet"), SourceConfig(uri_column="video"), StorageConfig())
    assert {s.uri for s in from_csv} == {str(root / r) for r in rel}
    assert {s.uri: s.extra for s in from_csv}[str(root / rel[2])] == {"label": 2}
    missing = [s for s in from_parquet if s.uri.endswith("gone.mp4")]
    assert len(from_parquet) == 4 and missing[0].size == -1  # listed, absent: quarantined later, with a reason
    with pytest.raises(ValueError, match="sources.uri_column"):
        list_sources(str(root_list / "videos.parquet"), SourceConfig(), StorageConfig())


# ---------------------------------------------------------------------------------------------- crash isolation
def test_a_decoder_killed_mid_call_costs_that_call_and_is_retried_once(synthetic_corpus):
    video = str(synthetic_corpus.path(synthetic_corpus.of_kind("grounding")[0]))
    times = [list(np.linspace(0, 20, 200))]  # long enough to be caught mid-decode
    sandbox = Sandbox("decode-unit-test", timeout_s=120)
    try:
        killer = Killer(video, role="decode-unit-test", times=1)
        killer.start()
        with pytest.raises(SandboxCrash, match="SIGSEGV"):
            sandbox.call("decode_frames", path=video, times=times)
        killer.stop()
        assert killer.kills == 1
        # The next call gets a fresh child; with one more crash, call_with_retry's retry succeeds.
        killer = Killer(video, role="decode-unit-test", times=1, sig=signal.SIGKILL)
        killer.start()
        out = sandbox.call_with_retry("decode_frames", path=video, times=[[1.0, 2.0]])
        killer.stop()
        assert killer.kills == 1 and sandbox.crashes == 2 and out["frames"][0].shape[0] == 2
        # Crashing every time: two attempts (the default policy), then the crash goes to the caller (who defers
        # the input: a decoder killed from outside is transient).
        killer = Killer(video, role="decode-unit-test", times=2)
        killer.start()
        with pytest.raises(SandboxCrash) as crash:
            sandbox.call_with_retry("decode_frames", path=video, times=times)
        killer.stop()
        assert crash.value.attempts == 2
        # A clean decoder error is the input's fault: reported with its reason, not retried.
        with pytest.raises(SandboxError) as err:
            sandbox.call_with_retry("probe", uri=str(synthetic_corpus.root / "broken" / "not_video.mp4"))
        assert err.value.reason == "not_a_video" and sandbox.crashes == 4
        # Anything else is a bug, not a bad input: it must fail the job, not quarantine inputs.
        with pytest.raises(RuntimeError, match="TypeError"):
            sandbox.call("decode_frames", path=video)
    finally:
        sandbox.close()


def test_a_hung_decoder_is_killed_at_the_timeout(synthetic_corpus):
    video = str(synthetic_corpus.path(synthetic_corpus.of_kind("grounding")[0]))
    sandbox = Sandbox("decode-unit-test", timeout_s=120)
    try:
        sandbox.call("release")  # child started
        pid = sandbox.pid
        stopper = threading.Timer(0.01, os.kill, (pid, signal.SIGSTOP))  # a hang: the process stops answering
        stopper.start()
        with pytest.raises(SandboxCrash, match="no answer in 1 s"):
            sandbox.call("decode_frames", timeout_s=1.0, path=video, times=[list(np.linspace(0, 20, 200))])
        assert sandbox.pid is None
    finally:
        sandbox.close()


def test_the_decode_stage_survives_decoder_crashes_retrying_then_deferring(synthetic_corpus, tmp_path):
    videos = [str(synthetic_corpus.path(v)) for v in synthetic_corpus.of_kind("pretrain")[:3]]
    crash_once, crash_always, fine = videos
    settings = StageSettings(recipe=PretrainRecipe(ClipConfig(length_s=2.0, stride_s=2.0, min_length_s=0.5),
                                                   AudioConfig()), storage=StorageConfig(),
                             recipe_hash="r", work_url=str(tmp_path), decode_timeout_s=120, clips_per_row=16,
                             retry=RetryPolicy(attempts=2, backoff_s=0.1, max_backoff_s=0.1))
    decode = DecodeStage(settings, finish=False)  # keep the decoded arrays
    listed = list_sources(str(synthetic_corpus.root / "pretrain" / "pt_0000[012].mp4"), SourceConfig(), StorageConfig())
    # probed before the decoder is attacked (a probed row is not probed again)
    rows = {row["uri"]: decode.probe(initial_row(row, i)) for i, row in enumerate(manifests.plan_rows(listed))}
    killers = [Killer(crash_once, times=1), Killer(crash_always, times=1000)]
    for killer in killers:
        killer.start()
    try:
        out = {uri: list(decode(row)) for uri, row in rows.items()}  # the stage itself never raises
    finally:
        for killer in killers:
            killer.stop()
    assert killers[0].kills == 1 and killers[1].kills >= 2
    (failure,) = out[crash_always]
    record = json.loads(failure["failure"])
    assert (record["stage"], record["reason"], record["deferred"]) == ("decode", "decoder_crash", True)
    assert "SIGSEGV" in record["error"] and "2 attempts" in record["error"] and failure["retries"] == 1
    again = list(decode(rows[crash_once]))  # nothing lost: the retried input decodes exactly as an undisturbed one
    for segments in (out[crash_once], out[fine]):
        assert segments and not any(r["failure"] for r in segments)
    assert [r["frames"].tobytes() for r in out[crash_once]] == [r["frames"].tobytes() for r in again]
    assert np.array_equal(out[crash_once][0]["audio"], again[0]["audio"])
    decode.sandbox.close()


# ----------------------------------------------------------------------------------------------- shard writing
def _samples(sid: str, n: int) -> list[dict]:
    return [{"__key__": f"{sid}_{i:04d}", "frame000.jpg": bytes([i]) * 10, "json": b"{}"} for i in range(n)]


def test_tars_are_deterministic_and_concatenate_in_order_dropping_sources(tmp_path):
    a, b = writer.tar_bytes(_samples("aaaa", 2)), writer.tar_bytes(_samples("bbbb", 3))
    assert a == writer.tar_bytes(_samples("aaaa", 2))  # same samples, same bytes
    for name, data in (("a.tar", a), ("b.tar", b)):
        writer.publish(str(tmp_path / name), data, {})
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]  # no temporaries left behind
    res = writer.concatenate([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], str(tmp_path / "s.tar"), {})
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
    assert names == [f"aaaa_{i:04d}.{e}" for i in range(2) for e in ("frame000.jpg", "json")] + [
        f"bbbb_{i:04d}.{e}" for i in range(3) for e in ("frame000.jpg", "json")]
    assert res["keys"] == ["aaaa_0000", "aaaa_0001", "bbbb_0000", "bbbb_0001", "bbbb_0002"]
    assert res["bytes"] == os.path.getsize(tmp_path / "s.tar")
    again = writer.concatenate([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], str(tmp_path / "t.tar"), {})
    assert again["sha256"] == res["sha256"]
    dropped = writer.concatenate([str(tmp_path / "s.tar")], str(tmp_path / "u.tar"), {}, ("aaaa_",))
    assert dropped["keys"] == res["keys"][2:]
    with tarfile.open(fileobj=io.BytesIO((tmp_path / "u.tar").read_bytes())) as tar:
        assert tar.extractfile("bbbb_0001.frame000.jpg").read() == bytes([1]) * 10


# ------------------------------------------------------------------------------------------------ plans, state
def _row(uri, size=10, etag="", mtime="1", annotations=""):
    row = {"uri": uri, "sid": shards.source_id(uri), "size": size, "etag": etag, "mtime": mtime, "extra": "{}"}
    return {**row, "annotations": annotations} if annotations else row


def _manifest(statuses: dict[str, str]) -> shards.Manifest:
    """A manifest whose sources (all size 10, mtime "1") have the given statuses."""
    m = shards.Manifest(mode="pretrain", recipe={}, recipe_hash="r")
    m.sources = {uri: {"size": 10, "etag": "", "mtime": "1", "status": status} for uri, status in statuses.items()}
    return m


def test_diff_finds_new_changed_unchanged_and_gone_sources():
    m = _manifest({"/a": "ok", "/b": "quarantined", "/c": "ok", "/g": "ok"})
    d = manifests.diff(m, [_row("/a"), _row("/b"), _row("/c", mtime="2"), _row("/n")])
    assert ([r["uri"] for r in d.new], [r["uri"] for r in d.changed], d.unchanged, d.gone) == (
        ["/n"], ["/c"], 2, ["/g"])
    # grounding: new queries for an unchanged file redo its sample
    m.sources["/a"]["annotations"] = "h1"
    assert [r["uri"] for r in manifests.diff(m, [_row("/a", annotations="h2")]).changed] == ["/a"]


def test_deferred_sources_are_retried_by_the_next_run_and_quarantined_ones_on_request():
    m = _manifest({"/ok": "ok", "/q": "quarantined", "/d": "deferred", "/dc": "deferred"})
    rows = [_row("/ok"), _row("/q"), _row("/d"), _row("/dc", mtime="2")]
    d = manifests.diff(m, rows)
    assert ([r["uri"] for r in d.retry], [r["uri"] for r in d.changed], d.unchanged) == (["/d"], ["/dc"], 2)
    d = manifests.diff(m, rows, retry_quarantined=True)
    assert ([r["uri"] for r in d.retry], d.unchanged) == (["/q", "/d"], 1)
    # a deferred outcome is recorded as such, counted per run in a row, and is not in the quarantine view
    gen = shards.Generation(id=2, started="t")
    manifests.record_sources(m, gen, None, [(_row("/d"), {"stage": "decode", "reason": "throttled", "error": "503",
                                                      "deferred": True})])
    assert (m.sources["/d"]["status"], m.sources["/d"]["deferrals"], gen.deferred, gen.quarantined) == (
        "deferred", 1, 1, 0)
    assert [r.uri for r in m.quarantine()] == ["/q"] and [r.uri for r in m.quarantine("deferred")] == ["/d", "/dc"]
    # a decoder that crashed on the same file in crash_runs runs in a row: the file is the cause, quarantined
    crash = {"stage": "decode", "reason": "decoder_crash", "error": "killed by SIGSEGV", "deferred": True}
    for run in (1, 2, 3):
        manifests.record_sources(m, gen, None, [(_row("/dc", mtime="2"), crash)], crash_runs=3)
        assert (m.sources["/dc"]["status"], m.sources["/dc"].get("deferrals")) == (
            ("deferred", run) if run < 3 else ("quarantined", None))


def test_an_output_folder_refuses_a_second_recipe():
    cfg = PreprocessConfig(input="/in", output="/out")
    m = shards.Manifest(mode="pretrain", recipe=cfg.recipe(), recipe_hash=shards.recipe_hash(cfg.recipe()))
    manifests.check_recipe(m, "pretrain", cfg.recipe(), "/out")
    other = PreprocessConfig(input="/in", output="/out", clips=type(cfg.clips)(length_s=5.0, stride_s=5.0))
    with pytest.raises(manifests.RecipeMismatch, match="clips"):
        manifests.check_recipe(m, "pretrain", other.recipe(), "/out")


def test_keyframe_sampling_has_its_own_recipe_and_exact_keeps_the_old_one():
    exact = PreprocessConfig(input="/in", output="/out")
    keyframe = PreprocessConfig(input="/in", output="/out", clips=type(exact.clips)(sampling="keyframe"))
    assert exact.recipe()["frame_sampling"] == "segment-centre"  # as before the setting: old shards stay valid
    assert keyframe.recipe()["frame_sampling"] == "keyframe-nearest-segment-centre"
    assert shards.recipe_hash(keyframe.recipe()) != shards.recipe_hash(exact.recipe())
    m = shards.Manifest(mode="pretrain", recipe=exact.recipe(), recipe_hash=shards.recipe_hash(exact.recipe()))
    with pytest.raises(manifests.RecipeMismatch, match="frame_sampling"):
        manifests.check_recipe(m, "pretrain", keyframe.recipe(), "/out")


def test_probe_side_of_the_pipeline_does_not_import_torch():
    # Every Ray worker that unpickles a stage imports pipelines.stages; torch costs seconds per process there, and
    # only decode actors of a recipe with audio need it (they import it as they start). A fresh interpreter, so
    # nothing is cached.
    import subprocess
    import sys

    code = "import sys, pipelines.stages, pipelines.preprocess, pipelines.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr


def test_a_recipe_without_audio_decodes_and_encodes_without_torch(synthetic_corpus, tmp_path):
    # Grounding needs no spectrogram, so its decode actors never pay torch's import (seconds per actor).
    import subprocess
    import sys

    video = synthetic_corpus.path(synthetic_corpus.of_kind("grounding")[0])
    code = f"""
import json, sys
from pipelines import manifests
from pipelines.config import GroundingConfig, SourceConfig, StorageConfig
from pipelines.recipes import GroundingRecipe
from pipelines.sources import list_sources
from pipelines.stages import DecodeStage, StageSettings, initial_row
(source,) = list_sources({str(video)!r}, SourceConfig(), StorageConfig())
(row,) = manifests.plan_rows([source], {{source.uri: [dict(sentence="a", start=0.0, end=1.0)]}})
settings = StageSettings(recipe=GroundingRecipe(GroundingConfig(frames=4, size=64)), storage=StorageConfig(),
                         recipe_hash="r", work_url={str(tmp_path)!r}, decode_timeout_s=120, clips_per_row=16)
stage = DecodeStage(settings)
(result,) = stage(initial_row(row, 0))
stage.sandbox.close()
print(json.dumps([result["failure"], result["part_bytes"] > 0, "torch" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["", True, False]


# ------------------------------------------------------------------------------------------------ failure classes
def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _as_s3fs_raises(error: Exception) -> OSError:
    """What s3fs raises for a store's error: an OSError subclass with the botocore error as its cause."""
    try:
        try:
            raise error
        except Exception as cause:  # noqa: BLE001 - re-raised translated, like s3fs.errors.translate_boto_error
            raise (PermissionError if "Access" in str(cause) else OSError)(str(cause)) from cause
    except OSError as translated:
        return translated


@pytest.mark.parametrize("make, reason", [
    (lambda: _client_error("SlowDown", 503), "throttled"),
    (lambda: _client_error("InternalError", 500), "store_error"),
    (lambda: _as_s3fs_raises(_client_error("InvalidAccessKeyId", 403)), "credentials"),
    (lambda: _as_s3fs_raises(_client_error("AccessDenied", 403)), "credentials"),
    (lambda: _client_error("PreconditionFailed", 412), "source_changed"),
    (lambda: _client_error("NoSuchKey", 404), ""),  # gone: the input's problem (unreadable), not the store's
    (lambda: ConnectionResetError(104, "reset by peer"), "connection"),
    (lambda: TimeoutError("read"), "timeout"),
    (lambda: PermissionError(13, "local file"), ""),  # a local file we may not read: permanent
    (lambda: ValueError("a bug"), ""),
])
def test_failures_are_classified_by_their_cause(make, reason):
    from pipelines.failures import transient_reason

    assert transient_reason(make()) == reason


def test_retrying_retries_transient_failures_only_and_gives_up_after_the_attempts():
    from pipelines.failures import Retries, retrying

    policy, counter, calls = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02), Retries(), []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "reset")
        return "done"

    assert retrying(flaky, policy, "flaky", counter) == "done" and counter.count == 2
    with pytest.raises(ConnectionResetError):
        retrying(lambda: (_ for _ in ()).throw(ConnectionResetError(104, "reset")), policy, "always", counter)
    assert counter.count == 4
    calls.clear()
    with pytest.raises(ValueError):  # a bug is raised at once
        retrying(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("bug")), policy, "bug", counter)
    assert len(calls) == 1 and counter.count == 4
