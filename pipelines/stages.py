"""The Ray Data stages, in graph order. Each reads its input row once into its declared type (``pipelines.rows``)
and writes its output once; a row that failed carries a ``failure`` and passes through the later stages untouched,
so every planned source reaches the driver as a result, good or bad. What differs between modes is the recipe's
(``pipelines.recipes``), never a test of the mode here.

    row per source    DecodeStage (actor), first:
                        probe      sandboxed PyAV: streams, duration, clips; rejects early what cannot work
    row per segment   then per segment:
                        decode     sandboxed, clip by clip: decord frames at the sampled instants, resized there
                                   (TVLT shortest edge + centre crop 224 | TVP longest edge 448), PyAV audio
                                   decoded forward; a clip damage makes undecodable is lost alone (``lost``)
                        log_mel    log_mel_stage: the clip's audio -> normalised TVLT spectrogram, float16
                        encode     encode_stage: JPEG frames + mel.npy + JSON record -> the segment's tar bytes
                        write      write_stage: the tar to ``_work/gen-G/<sid>-<seg>.tar``; only metadata goes on

Probe, log-mel, encode and write run inside the decode actor: Ray Data fuses task stages only into a *following*
actor stage, shipping decoded frames and audio through the object store to other worker processes costs more than
the work itself, and a separate probe pool cost an actor's start-up (Ray Data's imports and a decoder child, about
3 CPU-seconds) on the way to the first result while its work is about a tenth of a decoder's. They stay separate functions with their own timings. A segment is at most
``resources.clips_per_row`` clips of one video: the unit that bounds a row's memory. The decoder child runs under
``limits.decoder_memory_gib`` and the probe checks ``limits``' caps, so no input costs more than they allow.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from pipelines import failures, writer
from pipelines.config import LimitConfig, StorageConfig
from pipelines.failures import Retries, RetryPolicy, SourceChanged, retrying, transient_reason
from pipelines.pinned import check_local, open_source
from pipelines.recipes import Recipe
from pipelines.rows import NO_AUDIO, NO_FRAMES, ResultRow, SegmentRow, SourceRow, add_time
from pipelines.sandbox import Sandbox, SandboxCrash, SandboxError, failure_reason
from tvlt_core import clips as clipping
from tvlt_core import input_spec, shards
from tvlt_core.redaction import redact_text
from tvlt_core.uris import is_remote, local_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """What the stages need, and nothing else (credentials travel inside ``storage``, never printed)."""

    recipe: Recipe  # what the mode makes of a video (``pipelines.recipes``)
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


def initial_row(plan_row: dict, order: int, read_url: str = "") -> dict:
    """A plan row (``state.plan_rows``) as the graph's input row (``SourceRow``): its position in the plan and the
    URL to read it from (``read_url``: a presigned URL from the current listing, say; the row's ``uri`` when empty).
    ``read_url`` lives only in the graph's rows: records, manifest and plan hold the credential-free ``uri``."""
    return SourceRow.from_plan(plan_row, order, read_url).to_row()


def failure(stage: str, reason: str, error: str, deferred: bool = False) -> dict:
    """Why a source gives no samples: where, the reason, the error (redacted); ``deferred``: a transient failure
    (``pipelines.failures``), retried by the next run, not quarantined."""
    return {"stage": stage, "reason": reason, "error": redact_text(error)[:2000], "deferred": deferred}


def fail(row: SourceRow, stage: str, reason: str, error: str, deferred: bool = False) -> SourceRow:
    """Mark ``row`` as a source that gives no samples (``failure``)."""
    row.failure = failure(stage, reason, error, deferred)
    return row


def sandbox_fail(row: SourceRow, stage: str, error: SandboxCrash | SandboxError, reason: str) -> SourceRow:
    """Mark a source whose sandboxed call failed: deferred when transient (a crash or hang, the store), else
    quarantined with ``reason`` (the child's, when it gave one)."""
    transient = failure_reason(error)
    if transient:
        detail = f"{error} ({error.attempts} attempts)" if isinstance(error, SandboxCrash) else error.message
        return fail(row, stage, transient, detail, deferred=True)
    return fail(row, stage, error.reason or reason, error.message)


# ---------------------------------------------------------------------------------------------------------- probe
def probe_source(row: SourceRow, settings: StageSettings, sandbox: Sandbox) -> None:
    """Open the source (headers and first frames only, through range reads on object stores) and reject early what
    cannot become samples: unreadable or empty objects, non-videos, no video stream, an undecodable first frame,
    too short for one clip, no audio where the recipe requires it. Sets the row's ``probe`` and ``clips``, or its
    ``failure``."""
    start = time.perf_counter()
    if row.failure is None:
        _probe(row, settings, sandbox)
    add_time(row.timing, "probe", time.perf_counter() - start)


def _probe(row: SourceRow, s: StageSettings, sandbox: Sandbox) -> SourceRow | None:
    """``probe_source``'s checks, in place on ``row``; each rejection returns ``fail``'s (the same) row."""
    if row.size == 0:
        return fail(row, "probe", "empty_object", "the object is 0 bytes long")
    if row.size < 0:
        return fail(row, "listing", "unreadable", "listed in the input list but not found in the store")
    if s.limits.max_bytes and row.size > s.limits.max_bytes:  # before reading a byte of it
        return fail(row, "probe", *s.limits.over(row.size, 0, 0, 0.0))
    if not is_remote(row.read_url):
        try:
            check_local(local_path(row.read_url), row.size, row.mtime)
        except SourceChanged as e:
            return fail(row, "probe", failures.SOURCE_CHANGED, str(e), deferred=True)
        except OSError:
            pass  # gone or unreadable: the probe says which, with the reason it always gave
    try:
        info = sandbox.call_with_retry("probe", uri=row.read_url, storage_options=s.storage.options(row.uri),
                                       want_audio=s.recipe.audio, etag=row.etag, version_id=row.version_id)
    except (SandboxError, SandboxCrash) as e:
        return sandbox_fail(row, "probe", e, "probe_error")
    over = s.limits.over(row.size, info["width"], info["height"], info["duration"])
    if over is not None:
        return fail(row, "probe", *over)
    if s.recipe.requires_audio and info["audio"] is None:
        return fail(row, "probe", "no_audio", f"{info['audio_problem']} (audio.missing=quarantine)")
    row.clips = s.recipe.plan_clips(info["duration"])
    if not row.clips:
        return fail(row, "probe", "too_short", s.recipe.too_short(info["duration"]))
    row.probe = info


# --------------------------------------------------------------------------------------------------------- decode
def _local_copy(row: SourceRow, settings: StageSettings) -> tuple[str, str | None]:
    """(path decord can open, temporary folder to delete or None). Remote objects are downloaded once per video,
    at the version the listing saw (``pinned``); a local file must still have its listed size and mtime."""
    uri = row.read_url
    if not is_remote(uri):
        check_local(local_path(uri), row.size, row.mtime)
        return local_path(uri), None
    folder = tempfile.mkdtemp(prefix="decode-", dir=settings.scratch_dir or None)
    path = os.path.join(folder, "source" + os.path.splitext(uri.split("?", 1)[0])[1])
    try:
        with open_source(uri, settings.storage.options(row.uri), row.etag, row.version_id) as src, \
                open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path, folder


def _download(row: SourceRow, settings: StageSettings, counter: Retries) -> tuple[str, str | None, bool]:
    """``_local_copy`` retried on transient failures: (path, scratch folder, True), or (, , False) with ``row``
    marked failed."""
    try:
        return *retrying(lambda: _local_copy(row, settings), settings.retry, f"download {row.uri}", counter), True
    except Exception as e:  # noqa: BLE001 - classified here; anything neither transient nor unreadable is raised
        reason = transient_reason(e)
        if reason:
            fail(row, "decode", reason, f"download failed: {e}", deferred=True)
        elif isinstance(e, (FileNotFoundError, PermissionError)):  # gone or locked since it was listed and probed
            fail(row, "decode", "unreadable", f"download failed: {e}")
        else:
            raise
        return "", None, False


class DecodeStage:
    """Probe each source, then decode it segment by segment in a sandboxed child (decord frames resized there, PyAV
    audio), then log-mel, encode and write each segment (see the module docstring): one ``ResultRow`` per segment.
    A decoder crash or hang is retried once in a fresh child, then the source is quarantined; ``finish=False``
    stops after decoding (``SegmentRow``s, with their arrays). A row already probed (``probe``) is not probed
    again."""

    def __init__(self, settings: StageSettings, finish: bool = True):
        self.settings = settings
        self.finish = finish
        self.sandbox = Sandbox("decode", timeout_s=settings.decode_timeout_s, retry=settings.retry,
                               memory_bytes=settings.decoder_memory_bytes)
        # Start-up work now, while the pool starts, rather than in the first input's time: the decoder child, and,
        # for a recipe with audio, torch (the log-mel module imports it) in a thread, so the actor is ready, and its
        # first source probes and decodes in the child while torch loads (the log-mel's import waits for it).
        self.sandbox.start()
        if settings.recipe.audio:
            threading.Thread(target=importlib.import_module, args=("tvlt_core.audio",), daemon=True).start()

    def probe(self, row: dict) -> dict:
        """The row probed (``probe_source``), for callers that probe ahead of decoding."""
        src, mark = SourceRow.from_row(row), self.sandbox.retries.count
        probe_source(src, self.settings, self.sandbox)
        src.retries += self.sandbox.retries.count - mark
        return src.to_row()

    def __call__(self, row: dict):
        s, mark = self.settings, self.sandbox.retries.count
        src = SourceRow.from_row(row)
        if src.probe is None:
            probe_source(src, s, self.sandbox)
        for seg in self.decode(src):
            # retries made for this segment (the probe's count goes with the first one only)
            seg.source.retries += self.sandbox.retries.count - mark
            mark = self.sandbox.retries.count
            if self.finish:
                yield write_stage(encode_stage(log_mel_stage(seg, s), s), s, self.sandbox.retries).to_row()
            else:
                yield seg.to_row()

    def decode(self, row: SourceRow):
        """The source's segments, decoded; one failed segment row when the source fails."""
        if row.failure is not None:
            yield SegmentRow.failed_source(row)
            return
        s = self.settings
        want_audio = s.recipe.audio and row.probe["audio"] is not None
        start = time.perf_counter()
        path, scratch, ok = _download(row, s, self.sandbox.retries)
        if not ok:
            yield SegmentRow.failed_source(row)
            return
        add_time(row.timing, "download", time.perf_counter() - start)
        try:
            segs = clipping.segments(row.clips, s.clips_per_row)
            for k, seg in enumerate(segs):
                # source-level times and retries count once, with the first segment
                source = replace(row, timing=dict(row.timing)) if k == 0 else replace(row, timing={}, retries=0)
                try:
                    out, timing = self._decode(path, seg, want_audio, row.probe)
                except (SandboxCrash, SandboxError) as e:
                    yield SegmentRow.failed_source(sandbox_fail(source, "decode", e, "undecodable_video"))
                    return
                for stage, seconds in timing.items():
                    add_time(source.timing, stage, seconds)
                yield self._segment(source, k, len(segs), out)
        finally:
            try:
                self.sandbox.call("release")
            except (SandboxCrash, SandboxError):
                pass  # the next call starts a fresh child anyway
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)

    def _decode(self, path: str, seg: list[clipping.Clip], want_audio: bool, info: dict) -> tuple[dict, dict]:
        mode = self.settings.recipe
        times = [clipping.frame_times(c, mode.frames_per_clip).tolist() for c in seg]
        start = time.perf_counter()
        # Resized in the child (the resize's time is inside decode_frames): full-size frames never cross the pipe.
        out = self.sandbox.call_with_retry("decode_frames", path=path, times=times, resize=mode.resize,
                                           frame_size=(info["height"], info["width"]), sampling=mode.sampling,
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
                if mode.requires_audio:
                    raise SandboxError(e.type_name, f"audio track: {e.message}", "undecodable_audio") from None
                out["audio"], out["audio_error"] = None, e.message
            timing["decode_audio"] = time.perf_counter() - start
        return out, timing

    @staticmethod
    def _segment(source: SourceRow, k: int, n_segs: int, out: dict) -> SegmentRow:
        """The segment's row: the kept clips' frames stacked (lost clips have none: ``decoded["lost"]`` lists them
        by position in the segment), every clip's audio concatenated with ``audio_bounds``."""
        kept = [f for i, f in enumerate(out["frames"]) if i not in out["lost"]]
        seg = SegmentRow(source, k, n_segs, frames=np.stack(kept) if kept else NO_FRAMES,
                         audio_bounds=np.zeros(len(out["frames"]) + 1, dtype=np.int64))
        if out.get("audio") is not None:
            seg.audio = np.concatenate(out["audio"]).astype(np.float32)
            seg.audio_bounds = np.concatenate([[0], np.cumsum([len(a) for a in out["audio"]])]).astype(np.int64)
        # JSON keys are strings: the positions of lost clips become "0", "1", ... as they will on any wire
        seg.decoded = {"frame_times": out["frame_times"], "audio_rate": out["audio_rate"],
                       "audio_error": out["audio_error"], "lost": {str(i): v for i, v in out["lost"].items()}}
        return seg


# -------------------------------------------------------------------------------------------- log-mel and encode
def log_mel_stage(seg: SegmentRow, settings: StageSettings) -> SegmentRow:
    """Per clip: the normalised TVLT log-mel (float16, concatenated over the segment's clips, ``mel_bounds`` marks
    where each clip's frames start); a clip without (enough) audio gets no spectrogram, its bound repeats."""
    start = time.perf_counter()
    _log_mel(seg, settings)
    add_time(seg.source.timing, "log_mel", time.perf_counter() - start)
    return seg


def _log_mel(seg: SegmentRow, settings: StageSettings) -> None:
    if seg.source.failure is not None or not settings.recipe.audio:
        return  # without torch: a recipe without audio never imports it
    from tvlt_core.audio import log_mel, min_samples  # torch: only in decode actors of a recipe with audio
    rate, bounds, mels = seg.decoded["audio_rate"], seg.audio_bounds, []
    for i in range(len(bounds) - 1):
        wave = np.array(seg.audio[bounds[i] : bounds[i + 1]])  # a writable copy: Ray hands out read-only views
        if rate and len(wave) >= min_samples(rate):
            mels.append(log_mel(wave, rate).numpy().astype(np.float16))
        else:
            mels.append(np.zeros((0, input_spec.NUM_MEL_BINS), np.float16))
    seg.mel_bounds = np.concatenate([[0], np.cumsum([len(m) for m in mels])]).astype(np.int64)
    seg.mel = np.concatenate(mels)


def _record(src: SourceRow, settings: StageSettings, clip: clipping.Clip, frame_times: list[float], rate: int,
            mel_frames: int) -> dict:
    info = src.probe
    rec = {"key": shards.sample_key(src.uri, clip.index), "mode": settings.recipe.mode,
           "recipe": settings.recipe_hash, "uri": src.uri, "size": src.size, "etag": src.etag, "mtime": src.mtime,
           "extra": src.extra, "clip": clip.index, "start": clip.start, "end": clip.end, "frame_times": frame_times,
           "frames": len(frame_times), "fps": info["fps"], "duration": info["duration"], "width": info["width"],
           "height": info["height"], "rotation": info["rotation"]}
    if src.version_id:
        rec["version_id"] = src.version_id  # the object version read (only on a version-aware read)
    return {**rec, **settings.recipe.record_fields(src, rate, mel_frames)}


def encode_stage(seg: SegmentRow, settings: StageSettings) -> ResultRow:
    """JPEG frames, mel.npy and the JSON record of every clip of the segment -> the segment's tar bytes.

    Clips without audio are kept (no mel.npy, ``audio_present`` false) when the recipe allows it and dropped
    otherwise; the arrays stay here, so only bytes and metadata go on."""
    start = time.perf_counter()
    result = _encode(seg, settings)
    add_time(result.timing, "encode", time.perf_counter() - start)
    return result


def _encode(seg: SegmentRow, settings: StageSettings) -> ResultRow:
    src = seg.source
    if src.failure is not None:
        return ResultRow.of(seg)
    clips = clipping.segments(src.clips, settings.clips_per_row)[seg.seg]
    samples, dropped, lost, kept = [], 0, [], 0
    for i, clip in enumerate(clips):
        if str(i) in seg.decoded["lost"]:
            reason, error = seg.decoded["lost"][str(i)]
            lost.append({"clip": clip.index, "start": clip.start, "end": clip.end, "reason": reason,
                         "error": redact_text(error)})
            continue
        frames, kept = seg.frames[kept], kept + 1
        mel = None
        if seg.mel is not None:
            mel = seg.mel[seg.mel_bounds[i] : seg.mel_bounds[i + 1]]
            if len(mel) == 0:
                mel = None
                if settings.recipe.requires_audio:
                    dropped += 1
                    continue
        record = _record(src, settings, clip, seg.decoded["frame_times"][i], seg.decoded["audio_rate"],
                         0 if mel is None else len(mel))
        samples.append(shards.encode_sample(record["key"], frames, record, mel))
    summary = {"samples": len(samples), "keys": [s["__key__"] for s in samples], "clips": len(clips),
               "dropped_no_audio": dropped, "lost": lost, "seconds": sum(c.length for c in clips),
               "duration": src.probe["duration"]}
    return ResultRow.of(seg, summary, writer.tar_bytes(samples) if samples else b"")


def write_stage(result: ResultRow, settings: StageSettings, counter: Retries | None = None) -> ResultRow:
    """Write the segment's tar to the generation's work folder under a name fixed by (source, segment), retrying
    transient failures; a part that cannot be written defers its source."""
    start = time.perf_counter()
    data, result.part, result.part_bytes = result.part, b"", len(result.part)  # the bytes leave the row here
    if data:
        url = writer.part_url(settings.work_url, result.sid, result.seg)
        try:
            retrying(lambda: writer.publish(url, data, settings.storage.options(url)), settings.retry,
                     f"write {url}", counter)
            result.part_url = url
        except Exception as e:  # noqa: BLE001 - classified here; anything not transient is raised
            reason = transient_reason(e)
            if not reason:
                raise
            result.failure, result.part_bytes = failure("write", reason, f"part upload failed: {e}", True), 0
    add_time(result.timing, "write", time.perf_counter() - start)
    return result
