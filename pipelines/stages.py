"""The Ray Data stages, in graph order. Each takes and returns rows (dicts); a row that failed carries a
``failure`` (JSON QuarantineRecord fields) and passes through the later stages untouched, so every planned source
reaches the driver as a result, good or bad.

    row per source    ProbeStage (actor, sandboxed PyAV)   streams, duration, clips; rejects early what cannot work
    row per segment   DecodeStage (actor), per segment:
                        decode     sandboxed, clip by clip: decord frames at the sampled instants, resized there
                                   (TVLT shortest edge + centre crop 224 | TVP longest edge 448), PyAV audio
                                   decoded forward; a clip damage makes undecodable is lost alone (``lost``)
                        log_mel    log_mel_stage: the clip's audio -> normalised TVLT spectrogram, float16
                        encode     encode_stage: JPEG frames + mel.npy + JSON record -> the segment's tar bytes
                        write      write_stage: the tar to ``_work/gen-G/<sid>-<seg>.tar``; only metadata goes on

log-mel, encode and write run inside the decode actor: Ray Data fuses task stages only into a *following* actor
stage, and shipping decoded frames and audio through the object store to other worker processes costs more than
the work itself. They stay separate functions with their own timings. A segment is at most
``resources.clips_per_row`` clips of one video: the unit that bounds a row's memory. The decoder child runs under
``limits.decoder_memory_gib`` and the probe checks ``limits``' caps, so no input costs more than they allow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from pipelines import failures, writer
from pipelines.config import AudioConfig, ClipConfig, GroundingConfig, LimitConfig, StorageConfig
from pipelines.failures import Retries, RetryPolicy, SourceChanged, retrying, transient_reason
from pipelines.pinned import check_local, open_source
from pipelines.sandbox import Sandbox, SandboxCrash, SandboxError, failure_reason
from tvlt_core import clips as clipping
from tvlt_core import recipe, shards
from tvlt_core.redaction import redact_text
from tvlt_core.resize import FrameResize
from tvlt_core.uris import is_remote, local_path

log = logging.getLogger(__name__)
_NO_FRAMES = np.zeros((0, 1, 1, 1, 3), dtype=np.uint8)
_NO_AUDIO = np.zeros(0, dtype=np.float32)
_NO_BOUNDS = np.zeros(1, dtype=np.int64)


@dataclass(frozen=True)
class StageSettings:
    """What the stages need, and nothing else (credentials travel inside ``storage``, never printed)."""

    mode: str
    clips: ClipConfig
    grounding: GroundingConfig
    audio: AudioConfig
    storage: StorageConfig
    recipe_hash: str
    work_url: str  # where parts go: <output>/_work/gen-G/run-<run id>
    decode_timeout_s: float
    clips_per_row: int
    limits: LimitConfig = field(default_factory=LimitConfig)
    scratch_dir: str = ""
    retry: RetryPolicy = RetryPolicy()  # transient failures: tries per probe, download, decoder call, part upload

    @property
    def decoder_memory_bytes(self) -> int:
        return int(self.limits.decoder_memory_gib * 1024**3)

    @property
    def sampling(self) -> str:
        """Which frames the decoder takes (``tvlt_core.clips.SAMPLING``): grounding is always exact."""
        return self.clips.sampling if self.mode == "pretrain" else "exact"

    @property
    def resize(self) -> FrameResize:
        """How the decoder child sizes frames: TVLT's centre crop, or TVP's longest edge (the loader pads)."""
        if self.mode == "grounding":
            return FrameResize("longest_edge", self.grounding.size)
        return FrameResize("center_crop", self.clips.size)


def initial_row(plan_row: dict, order: int, read_url: str = "") -> dict:
    """A plan row (``state.plan_rows``) as the graph's input: its position in the plan, the URL to read it from
    (``read_url``: a presigned URL from the current listing, say; the row's ``uri`` when empty) and empty stage
    columns. ``read_url`` lives only in the graph's rows: records, manifest and plan hold the credential-free
    ``uri``."""
    return {**plan_row, "order": order, "read_url": read_url or plan_row["uri"], "failure": "", "probe": "",
            "clips": "", "timing": "{}", "queries": plan_row.get("queries", "[]"),
            "version_id": plan_row.get("version_id", ""), "retries": 0}


def timed(row: dict, stage: str, seconds: float) -> dict:
    """Add ``seconds`` spent in ``stage`` to the row's timing (summed by the driver: where the time goes)."""
    timing = json.loads(row.get("timing") or "{}")
    timing[stage] = round(timing.get(stage, 0.0) + seconds, 6)
    return {**row, "timing": json.dumps(timing)}


def failed(row: dict, stage: str, reason: str, error: str, deferred: bool = False) -> dict:
    """The row of a source that gives no samples, with where and why; ``deferred``: a transient failure
    (``pipelines.failures``), retried by the next run, not quarantined."""
    return {**row, "failure": json.dumps({"stage": stage, "reason": reason, "error": redact_text(error)[:2000],
                                          "deferred": deferred})}


def sandbox_failed(row: dict, stage: str, error: SandboxCrash | SandboxError, reason: str) -> dict:
    """The row of a source whose sandboxed call failed: deferred when transient (a crash or hang, the store), else
    quarantined with ``reason`` (the child's, when it gave one)."""
    transient = failure_reason(error)
    if transient:
        detail = f"{error} ({error.attempts} attempts)" if isinstance(error, SandboxCrash) else error.message
        return failed(row, stage, transient, detail, deferred=True)
    return failed(row, stage, error.reason or reason, error.message)


def _segment_row(row: dict, seg: int, n_segs: int, frames=_NO_FRAMES, audio=_NO_AUDIO, bounds=_NO_BOUNDS,
                 decoded: str = "") -> dict:
    return {**row, "seg": seg, "n_segs": n_segs, "frames": frames, "audio": audio, "audio_bounds": bounds,
            "decoded": decoded}


# ---------------------------------------------------------------------------------------------------------- probe
def plan_clips(settings: StageSettings, duration: float) -> list[clipping.Clip]:
    if settings.mode == "grounding":
        return [clipping.whole(duration)]
    c = settings.clips
    return clipping.windows(duration, c.length_s, c.stride_s, c.min_length_s)


class ProbeStage:
    """Open each source (headers and first frames only, through range reads on object stores) and reject early
    what cannot become samples: unreadable or empty objects, non-videos, no video stream, an undecodable first
    frame, too short for one clip, no audio in pretrain mode when the config says quarantine."""

    def __init__(self, settings: StageSettings):
        self.settings = settings
        self.sandbox = Sandbox("probe", timeout_s=settings.decode_timeout_s, retry=settings.retry,
                               memory_bytes=settings.decoder_memory_bytes)
        self.sandbox.start()  # while the actor pool starts, not in the first input's time

    def __call__(self, row: dict) -> dict:
        start, mark = time.perf_counter(), self.sandbox.retries.count
        out = timed(self._probe(row), "probe", time.perf_counter() - start)
        return {**out, "retries": out["retries"] + self.sandbox.retries.count - mark}

    def _probe(self, row: dict) -> dict:
        s = self.settings
        if row["failure"]:
            return row
        if row["size"] == 0:
            return failed(row, "probe", "empty_object", "the object is 0 bytes long")
        if row["size"] < 0:
            return failed(row, "listing", "unreadable", "listed in the input list but not found in the store")
        if s.limits.max_bytes and row["size"] > s.limits.max_bytes:  # before reading a byte of it
            return failed(row, "probe", *s.limits.over(row["size"], 0, 0, 0.0))
        if not is_remote(row["read_url"]):
            try:
                check_local(local_path(row["read_url"]), row["size"], row["mtime"])
            except SourceChanged as e:
                return failed(row, "probe", failures.SOURCE_CHANGED, str(e), deferred=True)
            except OSError:
                pass  # gone or unreadable: the probe says which, with the reason it always gave
        try:
            info = self.sandbox.call_with_retry("probe", uri=row["read_url"],
                                                storage_options=s.storage.options(row["uri"]),
                                                want_audio=s.mode == "pretrain", etag=row["etag"],
                                                version_id=row["version_id"])
        except (SandboxError, SandboxCrash) as e:
            return sandbox_failed(row, "probe", e, "probe_error")
        over = s.limits.over(row["size"], info["width"], info["height"], info["duration"])
        if over is not None:
            return failed(row, "probe", *over)
        if s.mode == "pretrain" and info["audio"] is None and s.audio.missing == "quarantine":
            return failed(row, "probe", "no_audio", f"{info['audio_problem']} (audio.missing=quarantine)")
        clips = plan_clips(s, info["duration"])
        if not clips:
            return failed(row, "probe", "too_short", f"{info['duration']:.3f} s of video, less than "
                          f"clips.min_length_s={s.clips.min_length_s}")
        return {**row, "probe": json.dumps(info), "clips": json.dumps([[c.index, c.start, c.end] for c in clips])}


# --------------------------------------------------------------------------------------------------------- decode
def _local_copy(row: dict, settings: StageSettings) -> tuple[str, str | None]:
    """(path decord can open, temporary folder to delete or None). Remote objects are downloaded once per video,
    at the version the listing saw (``pinned``); a local file must still have its listed size and mtime."""
    uri = row["read_url"]
    if not is_remote(uri):
        check_local(local_path(uri), row["size"], row["mtime"])
        return local_path(uri), None
    folder = tempfile.mkdtemp(prefix="decode-", dir=settings.scratch_dir or None)
    path = os.path.join(folder, "source" + os.path.splitext(uri.split("?", 1)[0])[1])
    try:
        with open_source(uri, settings.storage.options(row["uri"]), row["etag"], row["version_id"]) as src, \
                open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path, folder


def _download(row: dict, settings: StageSettings, counter: Retries) -> tuple[str, str | None, dict | None]:
    """``_local_copy`` retried on transient failures: (path, scratch folder, None), or (, , the failed row)."""
    try:
        return *retrying(lambda: _local_copy(row, settings), settings.retry, f"download {row['uri']}", counter), None
    except Exception as e:  # noqa: BLE001 - classified here; anything neither transient nor unreadable is raised
        reason = transient_reason(e)
        if reason:
            return "", None, failed(row, "decode", reason, f"download failed: {e}", deferred=True)
        if isinstance(e, (FileNotFoundError, PermissionError)):  # gone or locked since it was listed and probed
            return "", None, failed(row, "decode", "unreadable", f"download failed: {e}")
        raise


class DecodeStage:
    """Decode each probed source segment by segment in a sandboxed child (decord frames resized there, PyAV audio),
    then log-mel, encode and write each segment (see the module docstring). A decoder crash or hang is retried once
    in a fresh child, then the source is quarantined; ``finish=False`` stops after decoding (rows keep their
    arrays)."""

    def __init__(self, settings: StageSettings, finish: bool = True):
        self.settings = settings
        self.finish = finish
        self.sandbox = Sandbox("decode", timeout_s=settings.decode_timeout_s, retry=settings.retry,
                               memory_bytes=settings.decoder_memory_bytes)
        # Start-up work now, while the pool starts, rather than in the first input's time: the decoder child, and
        # torch (the log-mel module imports it; the probe actors never do).
        self.sandbox.start()
        import tvlt_core.audio  # noqa: F401

    def __call__(self, row: dict):
        s, mark, inherited = self.settings, self.sandbox.retries.count, row.get("retries", 0)
        for seg_row in self.decode(row):
            if self.finish:
                seg_row = write_stage(encode_stage(log_mel_stage(seg_row, s), s), s, self.sandbox.retries)
            # retries made for this segment (the probe's count goes with the first one only)
            yield {**seg_row, "retries": inherited + self.sandbox.retries.count - mark}
            mark, inherited = self.sandbox.retries.count, 0

    def decode(self, row: dict):
        if row["failure"]:
            yield _segment_row(row, -1, 0)
            return
        s = self.settings
        clips = [clipping.Clip(*c) for c in json.loads(row["clips"])]
        info = json.loads(row["probe"])
        want_audio = s.mode == "pretrain" and info["audio"] is not None
        frames_per_clip = s.grounding.frames if s.mode == "grounding" else s.clips.frames
        start = time.perf_counter()
        path, scratch, failure = _download(row, s, self.sandbox.retries)
        if failure is not None:
            yield _segment_row(failure, -1, 0)
            return
        row = timed(row, "download", time.perf_counter() - start)
        try:
            segs = clipping.segments(clips, s.clips_per_row)
            for k, seg in enumerate(segs):
                try:
                    out, timing = self._decode(path, seg, frames_per_clip, want_audio, info)
                except (SandboxCrash, SandboxError) as e:
                    yield _segment_row(sandbox_failed(row, "decode", e, "undecodable_video"), -1, 0)
                    return
                seg_row = row if k == 0 else {**row, "timing": "{}"}  # source-level times count once
                for stage, seconds in timing.items():
                    seg_row = timed(seg_row, stage, seconds)
                yield self._row(seg_row, k, len(segs), out)
        finally:
            try:
                self.sandbox.call("release")
            except (SandboxCrash, SandboxError):
                pass  # the next call starts a fresh child anyway
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _decode(self, path: str, seg: list[clipping.Clip], frames_per_clip: int, want_audio: bool, info: dict
                ) -> tuple[dict, dict]:
        times = [clipping.frame_times(c, frames_per_clip).tolist() for c in seg]
        start = time.perf_counter()
        # Resized in the child (the resize's time is inside decode_frames): full-size frames never cross the pipe.
        out = self.sandbox.call_with_retry("decode_frames", path=path, times=times, resize=self.settings.resize,
                                           frame_size=(info["height"], info["width"]), sampling=self.settings.sampling,
                                           windows=[[c.start, c.end] for c in seg])  # fmt: skip
        timing = {"decode_frames": time.perf_counter() - start}
        out.update(audio=None, audio_rate=0, audio_error="")
        if want_audio:
            start = time.perf_counter()
            try:
                sound = self.sandbox.call_with_retry("decode_audio_windows", path=path,
                                                     windows=[[c.start, c.end] for c in seg])
                out["audio"], out["audio_rate"] = sound["audio"], sound["audio_rate"]
                out["lost"] = {**sound["lost"], **out["lost"]}  # a clip both damages hit: its frames' reason
            except SandboxError as e:
                if self.settings.audio.missing == "quarantine":
                    raise SandboxError(e.type_name, f"audio track: {e.message}", "undecodable_audio") from None
                out["audio"], out["audio_error"] = None, e.message
            timing["decode_audio"] = time.perf_counter() - start
        return out, timing

    def _row(self, row: dict, k: int, n_segs: int, out: dict) -> dict:
        """The segment's row: the kept clips' frames stacked (lost clips have none: ``decoded["lost"]`` lists them
        by position in the segment), every clip's audio concatenated with ``audio_bounds``."""
        kept = [f for k, f in enumerate(out["frames"]) if k not in out["lost"]]
        frames = np.stack(kept) if kept else _NO_FRAMES
        audio, bounds = _NO_AUDIO, np.zeros(len(out["frames"]) + 1, dtype=np.int64)
        if out.get("audio") is not None:
            audio = np.concatenate(out["audio"]).astype(np.float32)
            bounds = np.concatenate([[0], np.cumsum([len(a) for a in out["audio"]])]).astype(np.int64)
        decoded = {"frame_times": out["frame_times"], "audio_rate": out["audio_rate"],
                   "audio_error": out["audio_error"], "lost": out["lost"]}
        return _segment_row(row, k, n_segs, frames, audio, bounds, json.dumps(decoded))


# -------------------------------------------------------------------------------------------- log-mel and encode
def log_mel_stage(row: dict, settings: StageSettings) -> dict:
    """Per clip: the normalised TVLT log-mel (float16, concatenated over the segment's clips, ``mel_bounds`` marks
    where each clip's frames start); a clip without (enough) audio gets no spectrogram, its bound repeats."""
    start = time.perf_counter()
    return timed(_log_mel(row, settings), "log_mel", time.perf_counter() - start)


def _log_mel(row: dict, settings: StageSettings) -> dict:
    from tvlt_core.audio import log_mel, min_samples  # torch: imported by decode actors only, not by probes

    if row["failure"] or settings.mode != "pretrain":
        return {**row, "mel": np.zeros((0, recipe.NUM_MEL_BINS), np.float16), "mel_bounds": _NO_BOUNDS}
    rate = json.loads(row["decoded"])["audio_rate"]
    bounds, mels = row["audio_bounds"], []
    for i in range(len(bounds) - 1):
        wave = np.array(row["audio"][bounds[i] : bounds[i + 1]])  # a writable copy: Ray hands out read-only views
        if rate and len(wave) >= min_samples(rate):
            mels.append(log_mel(wave, rate).numpy().astype(np.float16))
        else:
            mels.append(np.zeros((0, recipe.NUM_MEL_BINS), np.float16))
    mel_bounds = np.concatenate([[0], np.cumsum([len(m) for m in mels])]).astype(np.int64)
    return {**row, "mel": np.concatenate(mels), "mel_bounds": mel_bounds}


def _record(row: dict, settings: StageSettings, clip: clipping.Clip, frame_times: list[float], info: dict, rate: int,
            mel_frames: int) -> dict:
    rec = {"key": shards.sample_key(row["uri"], clip.index), "mode": settings.mode, "recipe": settings.recipe_hash,
           "uri": row["uri"], "size": row["size"], "etag": row["etag"], "mtime": row["mtime"],
           "extra": json.loads(row["extra"]), "clip": clip.index, "start": clip.start, "end": clip.end,
           "frame_times": frame_times, "frames": len(frame_times), "fps": info["fps"], "duration": info["duration"],
           "width": info["width"], "height": info["height"], "rotation": info["rotation"]}
    if row.get("version_id"):
        rec["version_id"] = row["version_id"]  # the object version read (only on a version-aware read)
    if settings.mode == "grounding":
        rec["queries"] = json.loads(row["queries"])
        return rec
    audio = info["audio"] or {}
    rec.update(audio_present=mel_frames > 0, sample_rate=audio.get("sample_rate", rate),
               channels=audio.get("channels", 0), mel_frames=mel_frames)
    return rec


def encode_stage(row: dict, settings: StageSettings) -> dict:
    """JPEG frames, mel.npy and the JSON record of every clip of the segment -> the segment's tar bytes.

    Clips without audio are kept (no mel.npy, ``audio_present`` false) when ``audio.missing`` is "silent" and
    dropped otherwise; the array columns are dropped here, so only bytes and metadata go on."""
    start = time.perf_counter()
    return timed(_encode(row, settings), "encode", time.perf_counter() - start)


def _encode(row: dict, settings: StageSettings) -> dict:
    base = {k: row[k] for k in ("order", "uri", "sid", "seg", "n_segs", "failure", "timing", "retries")}
    if row["failure"]:
        return {**base, "part": b"", "summary": ""}
    clips = [clipping.Clip(*c) for c in json.loads(row["clips"])]
    seg = clipping.segments(clips, settings.clips_per_row)[row["seg"]]
    info, decoded = json.loads(row["probe"]), json.loads(row["decoded"])
    samples, dropped, lost, kept = [], 0, [], 0
    for i, clip in enumerate(seg):
        if str(i) in decoded["lost"]:  # JSON keys are strings
            reason, error = decoded["lost"][str(i)]
            lost.append({"clip": clip.index, "start": clip.start, "end": clip.end, "reason": reason,
                         "error": redact_text(error)})
            continue
        frames, kept = row["frames"][kept], kept + 1
        mel = None
        if settings.mode == "pretrain":
            mel = row["mel"][row["mel_bounds"][i] : row["mel_bounds"][i + 1]]
            if len(mel) == 0:
                mel = None
                if settings.audio.missing == "quarantine":
                    dropped += 1
                    continue
        record = _record(row, settings, clip, decoded["frame_times"][i], info, decoded["audio_rate"],
                         0 if mel is None else len(mel))
        samples.append(shards.encode_sample(record["key"], frames, record, mel))
    summary = {"samples": len(samples), "keys": [s["__key__"] for s in samples], "clips": len(seg),
               "dropped_no_audio": dropped, "lost": lost, "seconds": sum(c.length for c in seg),
               "duration": info["duration"]}
    return {**base, "part": writer.tar_bytes(samples) if samples else b"", "summary": json.dumps(summary)}


def write_stage(row: dict, settings: StageSettings, counter: Retries | None = None) -> dict:
    """Write the segment's tar to the generation's work folder under a name fixed by (source, segment), retrying
    transient failures; a part that cannot be written defers its source."""
    start = time.perf_counter()
    out = {k: row[k] for k in ("order", "uri", "sid", "seg", "n_segs", "failure", "summary", "timing", "retries")}
    out["part_url"], out["part_bytes"] = "", len(row["part"])
    if row["part"]:
        url = writer.part_url(settings.work_url, row["sid"], row["seg"])
        try:
            retrying(lambda: writer.publish(url, row["part"], settings.storage.options(url)), settings.retry,
                     f"write {url}", counter)
            out["part_url"] = url
        except Exception as e:  # noqa: BLE001 - classified here; anything not transient is raised
            reason = transient_reason(e)
            if not reason:
                raise
            out = {**failed(out, "write", reason, f"part upload failed: {e}", deferred=True), "part_bytes": 0}
    return timed(out, "write", time.perf_counter() - start)
