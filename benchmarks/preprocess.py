"""Preprocessing throughput: the decode floor, a full-decode baseline and our Ray Data job, on one corpus, one run.

    .venv/bin/python benchmarks/preprocess.py --videos 24 --work /tmp/bench_preprocess [--gop 10]
    .venv/bin/python benchmarks/preprocess.py --videos 24 --rows faults     # only (f) and (g)
    .venv/bin/python benchmarks/preprocess.py --videos 24 --rows sampling   # only (h): exact vs keyframe sampling

Corpus: synthetic, 640x360, 30 fps, 10-30 s, h264 + AAC, a keyframe every 2 s like camera files, or every ``--gop``
seconds (generated once into WORK/corpus or WORK/corpus-gopN and reused): a sampled frame decodes from the keyframe
before it, so the interval could change what sampling saves (measured 0.5-10 s in RESULTS.md: it changes little).
Recipe everywhere: 10 s clips every 10 s, 8 frames per clip at the segment centres, the audio track as float mono.
    (a) decode floor     per file, nothing around it: decord opens it, get_batch decodes only the sampled frames,
                         PyAV decodes the audio track; no resize, no log-mel, no encoding, no writing.
                         Once in 1 process, once in W processes (W = the cores the job gets).
    (b) full decode      the same, but decord decodes every frame (in order) and the sampled ones are kept.
    (c) our job          ``jobs/preprocess.py --mode pretrain`` with the pretrain preset (local Ray, W CPUs): the
                         whole recipe (probe, decode, resize + crop, log-mel, JPEG, tar, manifest commits).
    (d) Ray Data alone   the job's own graph (``pipelines.preprocess.build_dataset``: the same blocks, actor pools
                         and resources) on the same running Ray, with stages that pass rows through: what Ray Data
                         itself costs, mostly starting the actor pool; (c) minus (d) is the part the recipe owns.
    (e) recipe, no pipeline  per file in W processes: the probe and decoder functions the job's sandbox runs (called
                         in-process, resizing + centre cropping to 224 as they decode), log-mel per clip, JPEG + npy encoding, nothing
                         written: the job's own work without Ray, actors, pipes or tar; (c) / (e) is what the
                         pipeline adds, (e) / (a) what the recipe adds to decoding. Also timed from its first
                         finished file to its last (its pool's spawn and imports excluded): the plain decord loop
                         the job's first-to-last result is compared with.
    (f) our job on S3    the same job reading and writing moto's S3 server on loopback through our fault proxy
                         (tests/fixtures/fault_proxy.py), no faults
                         (after a warm-up run of the same job, not reported: the first job on a fresh Ray pays
                         one-off costs that would otherwise land in this row)
    (g) ... 1% faults    the same, the proxy answering 1% of all requests with a connection reset or a 503 SlowDown
                         (half each, seeded): (g) / (f) is what surviving them costs; the table says how many faults
                         were injected and how many operations our layer retried (botocore's own retries of a
                         request are not counted there: most faults are absorbed by them)
    (h) sampling         ``clips.sampling`` exact vs keyframe, on corpora with a keyframe every 0.5, 2 and 10 s
                         (``--gops``): the recipe's work without a pipeline ((e), in W processes) and our job on a
                         running Ray (after an unreported warm-up job), the two modes interleaved per corpus; the
                         ratios keyframe / exact in videos/s, whole job and first to last result
Prints videos/s, seconds of video per second, peak memory (summed RSS of the process tree, shared pages counted
per process) and the ratios; what the job's driver process read and wrote (``/proc/self/io``: every system call,
files, pipes and sockets) per GB of shards; then where the job's time goes (seconds per stage, summed over workers).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tvlt_core import clips  # noqa: E402
from synthetic import generate_corpus, load_corpus  # noqa: E402
from synthetic.spec import GOP_SECONDS  # noqa: E402

LENGTH_S, FRAMES = 10.0, 8
FPS = 30  # the corpus's frame rate


class PeakRSS(threading.Thread):
    """Samples the summed RSS of this process and all its descendants (Ray's processes included) every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._halt = 0, threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak / 1024**3


def _sampled_indices(vr) -> list[int]:
    starts = vr.get_frame_timestamp(np.arange(len(vr)))[:, 0]
    duration = float(vr.get_frame_timestamp([len(vr) - 1])[0, 1])
    wanted = [clips.frame_indices(clips.frame_times(c, FRAMES), starts)
              for c in clips.windows(duration, LENGTH_S, LENGTH_S, 1.0)]
    return sorted(set(np.concatenate(wanted).tolist()))


def _audio(path: str) -> int:
    import av

    n = 0
    with av.open(path) as container:
        for frame in container.decode(audio=0):
            n += frame.to_ndarray().mean(axis=0).shape[0]
    return n


def floor_one(path: str) -> int:
    """(a): only the needed frames and the audio."""
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    frames = vr.get_batch(_sampled_indices(vr)).asnumpy()
    return frames.shape[0] + _audio(path)


def full_one(path: str) -> int:
    """(b): every frame decoded in order, then the sampled ones kept."""
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    keep, kept = set(_sampled_indices(vr)), []
    for start in range(0, len(vr), 64):
        batch = vr.get_batch(list(range(start, min(start + 64, len(vr))))).asnumpy()
        kept += [batch[i - start] for i in range(start, start + len(batch)) if i in keep]
    return len(kept) + _audio(path)


def recipe_one(path: str, sampling: str = "exact") -> int:
    """(e): the job's per-file work with no pipeline around it: the probe and decoder functions the sandbox runs
    (called in-process), resize + centre crop to 224, the log-mel of every clip, JPEG and npy encoding; nothing
    written. (h) passes ``sampling="keyframe"``."""
    import torch

    from pipelines import decoders
    from tvlt_core import shards
    from tvlt_core.audio import log_mel
    from tvlt_core.resize import FrameResize

    torch.set_num_threads(1)  # as in the job's actors (Ray sets OMP_NUM_THREADS to their 1 CPU)
    info = decoders.probe(path)
    windows = clips.windows(info["duration"], LENGTH_S, LENGTH_S, 1.0)  # the job plans from the probe
    out = decoders.decode_frames(path, [clips.frame_times(c, FRAMES).tolist() for c in windows],
                               FrameResize("center_crop", 224), (info["height"], info["width"]), sampling,
                               [[c.start, c.end] for c in windows])  # fmt: skip
    sound = decoders.decode_audio_windows(path, [[c.start, c.end] for c in windows])
    n = 0
    for frames, wave in zip(out["frames"], sound["audio"], strict=True):
        encoded = [shards.encode_jpeg(f) for f in frames]
        encoded.append(shards.encode_npy(log_mel(wave, sound["audio_rate"]).numpy().astype(np.float16)))
        n += len(encoded)
    decoders.release()
    return n


def timed_pool(fn, paths: list[str], workers: int) -> tuple[float, float, float]:
    """(wall s, peak RSS GiB, s to the first finished file) of ``fn`` over ``paths`` in ``workers`` processes: the
    first file's time includes the pool's start-up (spawn, imports), so wall minus it is the loop's steady part."""
    monitor = PeakRSS()
    monitor.start()
    start, first = time.perf_counter(), None
    if workers == 1:
        for p in paths:
            fn(p)
            first = first or time.perf_counter() - start
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(fn, paths, chunksize=1):
                first = first or time.perf_counter() - start
    return time.perf_counter() - start, monitor.stop(), first


def recipe_keyframe(path: str) -> int:
    return recipe_one(path, "keyframe")


def timed_sampling(work: Path, videos: int, gops: list[float], workers: int) -> list[tuple[float, str, float, float, float]]:
    """(h): per corpus, exact and keyframe: (gop, mode, recipe-only wall s, job wall s, job first-to-last s)."""
    import ray

    from jobs.preprocess import main

    corpora = {gop: corpus_at(work, gop, videos, workers) for gop in gops}
    ray.init(num_cpus=workers, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    rows = []

    def job(corpus_dir: Path, sampling: str, name: str) -> tuple[float, float]:
        target = work / f"shards-{name}"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        code = main(["--config", "preprocess_pretrain", "--input", str(corpus_dir / "pretrain"), "--output",
                     str(target), "--progress", "false", "--clips.sampling", sampling])  # fmt: skip
        wall = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"(h) {name}: the job failed with exit code {code}")
        stats = json.loads((target / "stats.json").read_text())["last_run"]
        return wall, wall - stats["first_result_s"]

    try:
        job(corpora[gops[0]][0], "exact", "warm-up")  # the first job on a fresh Ray pays one-off costs
        for gop, (corpus_dir, paths) in corpora.items():
            for sampling, fn in (("exact", recipe_one), ("keyframe", recipe_keyframe)):
                recipe_wall, _, _ = timed_pool(fn, paths, workers)
                wall, steady = job(corpus_dir, sampling, f"gop{gop:g}-{sampling}")
                rows.append((gop, sampling, recipe_wall, wall, steady))
                print(f"(h) gop {gop:g} s, {sampling}: recipe {recipe_wall:.1f} s, job {wall:.1f} s "
                      f"(first to last {steady:.1f} s)", flush=True)
    finally:
        ray.shutdown()
    return rows


def print_sampling_rows(rows: list[tuple[float, str, float, float, float]], n: int) -> None:
    print(f"| {'keyframe every':>14} | {'sampling':<8} | {'(e) recipe s':>12} | {'job s':>6} | {'first-to-last s':>15} "
          f"| {'job videos/s':>12} | {'vs exact: recipe':>16} | {'job':>5} | {'first-to-last':>13} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 14}|{'-' * 8}|{'-' * 17}|{'-' * 14}|{'-' * 18}|{'-' * 7}|{'-' * 15}|")
    exact = {gop: (r, w, st) for gop, mode, r, w, st in rows if mode == "exact"}
    for gop, mode, recipe_wall, wall, steady in rows:
        r0, w0, s0 = exact[gop]
        print(f"| {f'{gop:g} s':>14} | {mode:<8} | {recipe_wall:12.1f} | {wall:6.1f} | {steady:15.1f} | "
              f"{n / wall:12.2f} | {r0 / recipe_wall:15.2f}x | {w0 / wall:4.2f}x | {s0 / steady:12.2f}x |")


def corpus_at(work: Path, gop: float, videos: int, workers: int) -> tuple[Path, list[str]]:
    """The benchmark corpus with a keyframe every ``gop`` s (generated once into WORK, reused): its folder and
    its pretraining files."""
    corpus_dir = work / ("corpus" if gop == GOP_SECONDS else f"corpus-gop{gop:g}")
    try:
        corpus = load_corpus(corpus_dir)
        gops = {v["gop"] for v in corpus.of_kind("pretrain")}
        if len(corpus.of_kind("pretrain")) != videos or gops != {max(1, round(gop * FPS))}:
            raise FileNotFoundError
    except FileNotFoundError:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        corpus = generate_corpus(corpus_dir, videos, seed=0, size=(640, 360), fps=FPS, duration=(10.0, 30.0),
                                 gop_seconds=gop, workers=workers)
    return corpus_dir, [str(corpus.path(v)) for v in corpus.of_kind("pretrain")]


def timed_job(corpus: Path, out: Path, workers: int) -> tuple[float, float, float, dict]:
    """(Ray start-up s, job wall s on the running Ray, peak RSS GiB, the job's stats), like ``ray job submit`` to
    a cluster that is already up; the start-up of a local Ray is timed apart."""
    import ray

    from jobs.preprocess import main

    shutil.rmtree(out, ignore_errors=True)
    monitor = PeakRSS()
    monitor.start()
    start = time.perf_counter()
    ray.init(num_cpus=workers, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    ray_up = time.perf_counter() - start
    start, io_before = time.perf_counter(), driver_io()
    code = main(["--config", "preprocess_pretrain", "--input", str(corpus / "pretrain"), "--output", str(out),
                 "--progress", "false"])
    wall, io_after = time.perf_counter() - start, driver_io()
    peak = monitor.stop()
    if code != 0:
        ray.shutdown()
        raise SystemExit(f"the job failed with exit code {code}")
    stats = json.loads((out / "stats.json").read_text())["last_run"]
    stats["driver_io"] = {k: io_after[k] - io_before[k] for k in io_after}
    # The same job again into a fresh folder: the driver's modules are loaded and Ray's workers are up, so what it
    # moves now is what the job moves, not first-use imports.
    again = out.with_name(out.name + "-again")
    shutil.rmtree(again, ignore_errors=True)
    io_before = driver_io()
    main(["--config", "preprocess_pretrain", "--input", str(corpus / "pretrain"), "--output", str(again),
          "--progress", "false"])
    stats["driver_io_again"] = {k: v - io_before[k] for k, v in driver_io().items()}
    stats["ray_data_alone"] = timed_ray_data_alone(stats["inputs"])
    ray.shutdown()
    return ray_up, wall, peak, stats


def driver_io() -> dict[str, int]:
    """This process's I/O counters (Linux /proc/self/io): ``rchar``/``wchar`` count every byte read or written
    through a system call (files, pipes and sockets: what the driver moves, Ray's own traffic included)."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(counters[k]) for k in ("rchar", "wchar")}


class _PassDecode:
    """Stands in for DecodeStage in (d): no sandbox, no imports, one result per source."""

    def __init__(self, settings):
        pass

    def __call__(self, row: dict):
        yield row


def timed_ray_data_alone(n_sources: int) -> dict:
    """(d): the job's graph with pass-through stages, on the Ray the job just used, with the resources the job ran
    with (the pretrain preset sets none: the defaults). Seconds to the first row and to the last."""
    from pipelines.config import ResourceConfig
    from pipelines.preprocess import build_dataset

    start, first = time.perf_counter(), None
    rows = [{"order": i} for i in range(n_sources)]
    for _ in build_dataset(rows, None, ResourceConfig(), _PassDecode).iter_rows():
        first = first or time.perf_counter() - start
    return {"first_result_s": first, "wall_s": time.perf_counter() - start}


def timed_s3_jobs(corpus: Path, workers: int, fault_rate: float) -> list[tuple[str, float, dict, int, int]]:
    """(f) and (g): the job on moto's S3 server through the fault proxy, without and with ``fault_rate`` faults, on
    one running Ray. Returns (row name, wall s, the job's stats, requests, faults injected) per run."""
    import socket

    import fsspec
    import ray
    from fixtures.fault_proxy import Fault, FaultProxy
    from moto.server import ThreadedMotoServer

    from jobs.preprocess import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(f"http://127.0.0.1:{port}", source_prefix="bench/videos", seed=1).start()
    creds = {"key": "bench", "secret": "bench"}
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}, **creds)
    fs.mkdir("bench")
    fs.put(str(corpus / "pretrain") + "/", "bench/videos/", recursive=True)
    ray.init(num_cpus=workers, object_store_memory=2 * 1024**3, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        # The first job on a fresh Ray pays one-off costs (worker processes, Ray Data's stats actor, cold caches):
        # a warm-up run, not reported, so that neither row carries them.
        for i, (name, rate) in enumerate((("warm-up", 0.0), ("(f) our job on S3, no faults", 0.0),
                                          (f"(g) our job on S3, {fault_rate:.0%} faults", fault_rate))):
            proxy.clear()
            proxy.schedule(Fault("reset", rate=rate / 2), Fault("slowdown", rate=rate / 2))
            output = f"shards-{i}"
            start = time.perf_counter()
            code = main(["--config", "preprocess_pretrain", "--input", "s3://bench/videos", "--output",
                         f"s3://bench/{output}", "--progress", "false", "--storage.endpoint_url", proxy.url,
                         "--storage.aws_access_key_id", creds["key"], "--storage.aws_secret_access_key",
                         creds["secret"]])
            wall = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"{name}: the job failed with exit code {code}")
            stats = json.loads(fs.cat_file(f"bench/{output}/stats.json"))["last_run"]
            if name != "warm-up":
                runs.append((name, wall, stats, sum(proxy.requests.values()), sum(proxy.injected.values())))
    finally:
        ray.shutdown()
        proxy.stop()
        server.stop()
    return runs


def print_fault_rows(runs: list[tuple[str, float, dict, int, int]], n: int, seconds: float) -> None:
    print(f"| {'run':<42} | {'wall s':>7} | {'videos/s':>8} | {'video s/s':>9} | {'requests':>8} | {'faults':>6} "
          f"| {'retried':>7} | {'deferred':>8} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
    for name, wall, stats, requests, injected in runs:
        print(f"| {name:<42} | {wall:7.1f} | {n / wall:8.2f} | {seconds / wall:9.1f} | {requests:8d} | "
              f"{injected:6d} | {stats['retried']:7d} | {sum(stats['deferred'].values()):8d} |")
    (_, clean, *_), (_, faulty, *_) = runs
    print(f"\n(f) / (g) wall time, the throughput ratio: {clean / faulty:.2f} (1.00 = the faults cost nothing)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--work", default="/tmp/bench_preprocess")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--gop", type=float, default=GOP_SECONDS, help="keyframe interval of the corpus, seconds")
    p.add_argument("--rows", choices=("all", "faults", "sampling"), default="all",
                   help="faults: only (f) and (g); sampling: only (h)")
    p.add_argument("--fault-rate", type=float, default=0.01, help="(g): share of requests the proxy fails")
    p.add_argument("--gops", default="0.5,2,10", help="(h): keyframe intervals of its corpora, seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    n, w = args.videos, args.workers
    if args.rows == "sampling":
        rows = timed_sampling(work, n, [float(g) for g in args.gops.split(",")], w)
        print(f"\n{n} videos per corpus, 640x360 {FPS} fps, 10-30 s; {w} cores\n")
        print_sampling_rows(rows, n)
        return
    corpus_dir, paths = corpus_at(work, args.gop, n, w)
    corpus = load_corpus(corpus_dir)
    seconds = sum(v["duration"] for v in corpus.of_kind("pretrain"))
    if args.rows == "faults":
        print(f"\ncorpus: {n} videos, {seconds:.0f} s of video; {w} cores\n")
        print_fault_rows(timed_s3_jobs(corpus_dir, w, args.fault_rate), n, seconds)
        return

    rows = []
    for name, fn, workers in (("(a) decode floor, 1 process", floor_one, 1),
                              (f"(a) decode floor, {w} processes", floor_one, w),
                              (f"(b) full decode, {w} processes", full_one, w),
                              (f"(e) the recipe's work, no pipeline, {w} procs", recipe_one, w)):
        wall, peak, first = timed_pool(fn, paths, workers)
        rows.append((name, wall, peak))
        recipe_first = first
        print(f"{name}: {wall:.1f} s, peak {peak:.2f} GiB", flush=True)
    ray_up, job_wall, job_peak, stats = timed_job(corpus_dir, work / "shards", w)
    rows.append((f"(c) our job, {w} CPUs, + local Ray start-up", ray_up + job_wall, job_peak))
    rows.append(("(c) our job on a running Ray", job_wall, job_peak))
    steady = job_wall - stats["first_result_s"]
    rows.append(("(c) our job, first to last result", steady, job_peak))
    recipe_steady = rows[3][1] - recipe_first  # (e) from its first finished file (its pool's start-up excluded)
    rows.append(("(e) the recipe's work, first to last file", recipe_steady, rows[3][2]))
    alone = stats["ray_data_alone"]
    rows.append(("(d) Ray Data alone, pass-through stages", alone["wall_s"], float("nan")))
    rows.append(("(c) - (d): our job less Ray Data alone", job_wall - alone["wall_s"], job_peak))

    print(f"\ncorpus: {n} videos, {seconds:.0f} s of video, 640x360 {FPS} fps, a keyframe every {args.gop:g} s; "
          f"{w} cores\n")
    print(f"| {'run':<42} | {'wall s':>7} | {'videos/s':>8} | {'video s/s':>9} | {'peak RSS GiB':>12} |")
    print(f"|{'-' * 44}|{'-' * 9}|{'-' * 10}|{'-' * 11}|{'-' * 14}|")
    for name, wall, peak in rows:
        memory = "-" if peak != peak else f"{peak:.2f}"  # NaN: not measured
        print(f"| {name:<42} | {wall:7.1f} | {n / wall:8.2f} | {seconds / wall:9.1f} | {memory:>12} |")
    floor_w, full_w, recipe_w = rows[1][1], rows[2][1], rows[3][1]
    print(f"\njob / floor ({w} processes) time: {job_wall / floor_w:.2f}x on a running Ray, "
          f"{(ray_up + job_wall) / floor_w:.2f}x with a local Ray start-up (target <= 1.5x); "
          f"full decode / job: {full_w / job_wall:.2f}x (target: several times)")
    print(f"job / (e) the recipe's own work in {w} processes: {job_wall / recipe_w:.2f}x (what the pipeline adds: "
          f"Ray, actors, the sandbox's pipes, tar and manifest); (e) / floor: {recipe_w / floor_w:.2f}x (what resize, "
          "log-mel and encoding add to decoding)")
    print(f"(c) - (d) / floor: {(job_wall - alone['wall_s']) / floor_w:.2f}x: the job's time beyond what Ray Data "
          "alone takes for the same graph")
    print(f"steady state, job first-to-last / (e) first-to-last: {steady / recipe_steady:.2f}x (target <= 1.15x); "
          f"whole process, job + local Ray start-up / (e): {(ray_up + job_wall) / recipe_w:.2f}x (target <= 1.6x); "
          f"job's first result {stats['first_result_s']:.1f} s after Ray is up (target < 3 s)")
    for label, io in (("the job", stats["driver_io"]), ("the same job again, warm", stats["driver_io_again"])):
        per_gb = {k: v / 1e6 / max(stats["bytes"] / 1e9, 1e-9) for k, v in io.items()}
        print(f"driver I/O during {label}: {io['rchar'] / 1e6:.2f} MB read, {io['wchar'] / 1e6:.2f} MB written "
              f"(all system calls: files, pipes, sockets) for {stats['bytes'] / 1e6:.1f} MB of shards: "
              f"{per_gb['rchar']:.0f} MB read and {per_gb['wchar']:.0f} MB written per GB of shards")
    print(f"\nwhere the job's time goes: Ray start-up {ray_up:.1f} s; in the job, {stats['startup_s']:.1f} s listing "
          f"and plan, first result after {stats['first_result_s']:.1f} s (actor start-up; Ray Data alone takes "
          f"{alone['first_result_s']:.1f} s to its first row), then per stage (seconds summed over workers):")
    for stage, secs in sorted(stats.get("stage_seconds", {}).items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<16} {secs:8.1f}")
    print()
    print_fault_rows(timed_s3_jobs(corpus_dir, w, args.fault_rate), n, seconds)


if __name__ == "__main__":
    main()
