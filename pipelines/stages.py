"""The Ray Data stages, in graph order. Each takes and returns rows (dicts); a row that failed carries a
``failure`` (JSON QuarantineRecord fields) and passes through the later stages untouched, so every planned source
reaches the driver as a result, good or bad.

    row per source    ProbeStage (actor, sandboxed PyAV)   streams, duration, clips; rejects early what cannot work
    row per segment   DecodeStage (actor), per segment:
                        decode     sandboxed decord frames at the sampled instants + PyAV audio per clip
                        resize     TVLT shortest edge + centre crop 224 | TVP longest edge 448
                        log_mel    log_mel_stage: the clip's audio -> normalised TVLT spectrogram, float16
                        encode     encode_stage: JPEG frames + mel.npy + JSON record -> the segment's tar bytes
                        write      write_stage: the tar to ``_work/gen-G/<sid>-<seg>.tar``; only metadata goes on

log-mel, encode and write run inside the decode actor: Ray Data fuses task stages only into a *following* actor
stage, and shipping decoded frames and audio through the object store to other worker processes costs more than
the work itself. They stay separate functions with their own timings. A segment is at most
``resources.clips_per_row`` clips of one video: the unit that bounds a row's memory.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pipelines import writer
from pipelines.config import AudioConfig, ClipConfig, GroundingConfig, StorageConfig
from pipelines.sandbox import Sandbox, SandboxCrash, SandboxError
from tvlt_core import clips as clipping
from tvlt_core import media, recipe, shards
from tvlt_core.redaction import redact_text

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
    work_url: str  # where parts go: <output>/_work/gen-G
    decode_timeout_s: float
    clips_per_row: int
    scratch_dir: str = ""


def initial_row(plan_row: dict, order: int, read_url: str = "") -> dict:
    """A plan row (``state.plan_rows``) as the graph's input: its position in the plan, the URL to read it from
    (``read_url``: a presigned URL from the current listing, say; the row's ``uri`` when empty) and empty stage
    columns. ``read_url`` lives only in the graph's rows: records, manifest and plan hold the credential-free
    ``uri``."""
    return {**plan_row, "order": order, "read_url": read_url or plan_row["uri"], "failure": "", "probe": "",
            "clips": "", "timing": "{}", "queries": plan_row.get("queries", "[]")}


def timed(row: dict, stage: str, seconds: float) -> dict:
    """Add ``seconds`` spent in ``stage`` to the row's timing (summed by the driver: where the time goes)."""
    timing = json.loads(row.get("timing") or "{}")
    timing[stage] = round(timing.get(stage, 0.0) + seconds, 6)
    return {**row, "timing": json.dumps(timing)}


def failed(row: dict, stage: str, reason: str, error: str) -> dict:
    """The row of a source that gives no samples, with where and why."""
    return {**row, "failure": json.dumps({"stage": stage, "reason": reason, "error": redact_text(error)[:2000]})}


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
        self.sandbox = Sandbox("probe", timeout_s=settings.decode_timeout_s)
        self.sandbox.start()  # while the actor pool starts, not in the first input's time

    def __call__(self, row: dict) -> dict:
        start = time.perf_counter()
        return timed(self._probe(row), "probe", time.perf_counter() - start)

    def _probe(self, row: dict) -> dict:
        s = self.settings
        if row["failure"]:
            return row
        if row["size"] == 0:
            return failed(row, "probe", "empty_object", "the object is 0 bytes long")
        if row["size"] < 0:
            return failed(row, "listing", "unreadable", "listed in the input list but not found in the store")
        try:
            info = self.sandbox.call_with_retry("probe", uri=row["read_url"],
                                                storage_options=s.storage.options(row["uri"]),
                                                want_audio=s.mode == "pretrain")
        except SandboxError as e:
            return failed(row, "probe", e.reason or "probe_error", e.message)
        except SandboxCrash as e:
            return failed(row, "probe", "decoder_crash", f"{e} ({e.attempts} attempts)")
        if s.mode == "pretrain" and info["audio"] is None and s.audio.missing == "quarantine":
            return failed(row, "probe", "no_audio", f"{info['audio_problem']} (audio.missing=quarantine)")
        clips = plan_clips(s, info["duration"])
        if not clips:
            return failed(row, "probe", "too_short", f"{info['duration']:.3f} s of video, less than "
                          f"clips.min_length_s={s.clips.min_length_s}")
        return {**row, "probe": json.dumps(info), "clips": json.dumps([[c.index, c.start, c.end] for c in clips])}


# --------------------------------------------------------------------------------------------------------- decode
def _local_copy(uri: str, storage: StorageConfig, scratch_dir: str) -> tuple[str, str | None]:
    """(path decord can open, temporary folder to delete or None). Remote objects are downloaded once per video."""
    if not media.is_remote(uri):
        return media.local_path(uri), None
    folder = tempfile.mkdtemp(prefix="decode-", dir=scratch_dir or None)
    return media.download(uri, folder, storage.options(uri)), folder


class DecodeStage:
    """Decode each probed source segment by segment in a sandboxed child (decord frames, PyAV audio), resize, then
    log-mel, encode and write each segment (see the module docstring). A decoder crash or hang is retried once in a
    fresh child, then the source is quarantined; ``finish=False`` stops after the resize (rows keep their arrays)."""

    def __init__(self, settings: StageSettings, finish: bool = True):
        self.settings = settings
        self.finish = finish
        self.sandbox = Sandbox("decode", timeout_s=settings.decode_timeout_s)
        # Start-up work now, while the pool starts, rather than in the first input's time: the decoder child, and
        # torch (the resize and log-mel modules import it; the probe actors never do).
        self.sandbox.start()
        import tvlt_core.audio  # noqa: F401
        import tvlt_core.video  # noqa: F401

    def __call__(self, row: dict):
        s = self.settings
        for seg_row in self.decode(row):
            if self.finish:
                seg_row = write_stage(encode_stage(log_mel_stage(seg_row, s), s), s)
            yield seg_row

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
        try:
            path, scratch = _local_copy(row["read_url"], s.storage, s.scratch_dir)
        except (FileNotFoundError, PermissionError) as e:  # gone or locked since it was listed and probed
            yield _segment_row(failed(row, "decode", "unreadable", f"download failed: {e}"), -1, 0)
            return
        row = timed(row, "download", time.perf_counter() - start)
        try:
            segs = clipping.segments(clips, s.clips_per_row)
            for k, seg in enumerate(segs):
                try:
                    out, timing = self._decode(path, seg, frames_per_clip, want_audio)
                except SandboxCrash as e:
                    yield _segment_row(failed(row, "decode", "decoder_crash", f"{e} ({e.attempts} attempts)"), -1, 0)
                    return
                except SandboxError as e:
                    yield _segment_row(failed(row, "decode", e.reason or "undecodable_video", e.message), -1, 0)
                    return
                seg_row = row if k == 0 else {**row, "timing": "{}"}  # source-level times count once
                for stage, seconds in timing.items():
                    seg_row = timed(seg_row, stage, seconds)
                start = time.perf_counter()
                seg_row = self._row(seg_row, k, len(segs), out)
                yield timed(seg_row, "resize", time.perf_counter() - start)
        finally:
            try:
                self.sandbox.call("release")
            except (SandboxCrash, SandboxError):
                pass  # the next call starts a fresh child anyway
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _decode(self, path: str, seg: list[clipping.Clip], frames_per_clip: int, want_audio: bool
                ) -> tuple[dict, dict]:
        times = [clipping.frame_times(c, frames_per_clip).tolist() for c in seg]
        start = time.perf_counter()
        out = self.sandbox.call_with_retry("decode_frames", path=path, times=times)
        timing = {"decode_frames": time.perf_counter() - start}
        out.update(audio=None, audio_rate=0, audio_error="")
        if want_audio:
            start = time.perf_counter()
            try:
                sound = self.sandbox.call_with_retry("decode_audio_windows", path=path,
                                                     windows=[[c.start, c.end] for c in seg])
                out["audio"], out["audio_rate"] = sound["audio"], sound["audio_rate"]
            except SandboxError as e:
                if self.settings.audio.missing == "quarantine":
                    raise SandboxError(e.type_name, f"audio track: {e.message}", "undecodable_audio") from None
                out["audio"], out["audio_error"] = None, e.message
            timing["decode_audio"] = time.perf_counter() - start
        return out, timing

    def _row(self, row: dict, k: int, n_segs: int, out: dict) -> dict:
        from tvlt_core.video import resize_center_crop, resize_longest_edge  # torch: decode actors only, not probes

        s = self.settings
        if s.mode == "grounding":
            frames = resize_longest_edge(out["frames"][0], s.grounding.size)[None]
        else:
            frames = np.stack([resize_center_crop(f, s.clips.size) for f in out["frames"]])
        audio, bounds = _NO_AUDIO, np.zeros(len(out["frames"]) + 1, dtype=np.int64)
        if out.get("audio") is not None:
            audio = np.concatenate(out["audio"]).astype(np.float32)
            bounds = np.concatenate([[0], np.cumsum([len(a) for a in out["audio"]])]).astype(np.int64)
        decoded = {"frame_times": out["frame_times"], "audio_rate": out["audio_rate"],
                   "audio_error": out["audio_error"]}
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
    base = {k: row[k] for k in ("order", "uri", "sid", "seg", "n_segs", "failure", "timing")}
    if row["failure"]:
        return {**base, "part": b"", "summary": ""}
    clips = [clipping.Clip(*c) for c in json.loads(row["clips"])]
    seg = clipping.segments(clips, settings.clips_per_row)[row["seg"]]
    info, decoded = json.loads(row["probe"]), json.loads(row["decoded"])
    samples, dropped = [], 0
    for i, clip in enumerate(seg):
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
        samples.append(shards.encode_sample(record["key"], row["frames"][i], record, mel))
    summary = {"samples": len(samples), "keys": [s["__key__"] for s in samples], "clips": len(seg),
               "dropped_no_audio": dropped, "seconds": sum(c.length for c in seg), "duration": info["duration"]}
    return {**base, "part": writer.tar_bytes(samples) if samples else b"", "summary": json.dumps(summary)}


def write_stage(row: dict, settings: StageSettings) -> dict:
    """Write the segment's tar to the generation's work folder under a name fixed by (source, segment)."""
    start = time.perf_counter()
    out = {k: row[k] for k in ("order", "uri", "sid", "seg", "n_segs", "failure", "summary", "timing")}
    out["part_url"], out["part_bytes"] = "", len(row["part"])
    if row["part"]:
        out["part_url"] = writer.part_url(settings.work_url, row["sid"], row["seg"])
        writer.publish(out["part_url"], row["part"], settings.storage.options(out["part_url"]))
    return timed(out, "write", time.perf_counter() - start)
