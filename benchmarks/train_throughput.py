"""Training throughput: the real job path (Ray Train workers, DeepSpeed ZeRO, the streaming loader, MLflow) on CPU,
and the loader on its own, so it is clear whether training waits for data.

    .venv/bin/python benchmarks/train_throughput.py                       # CPU: 1 and 2 workers x ZeRO 0/2/3, ~10 min
    .venv/bin/python benchmarks/train_throughput.py --workers 2 --stages 2 --steps 30
    .venv/bin/python benchmarks/train_throughput.py --gpu                 # one GPU: TVLT base, bf16 (needs CUDA)
    .venv/bin/python benchmarks/train_throughput.py --verify-only         # the shard verification table alone

CPU rows: each (workers, stage) is one training job through ``tvlt_core.train.ray_job.launch`` (the same code as
``jobs/pretrain.py``) on the tiny TVLT preset, with shards written here per the shard contract (8 JPEG frames of
224 x 224 and a log-mel of about 4.6 s per sample, the preprocessing job's output format). Each job runs
2 x ``--steps`` optimizer steps and is measured over the second half (the first holds start-up and warm-up):
    samples/s     samples of all ranks per second of wall time
    data wait     share of rank 0's training-loop time spent waiting in ``next(batches)``
    loader        the loader alone (same batcher, same shards, no model), one rank: samples/s with 0 and 1
                  loader worker processes, and CPU ms per sample in-process (what a core must spend per sample)
    verification  the loader alone, one rank in-process, with shard verification off, length (and sample count)
                  only, and sha256 (data.verify): samples/s and CPU ms per sample, and the bare read (tar
                  parsing, no decode) in MB/s, where verification's cost shows undiluted
GPU row (``--gpu``): TVLT base in bf16 on one GPU, DeepSpeed ZeRO stage 0 in this process, synthetic batches from
the loader's collate: samples/s, model FLOP utilisation (forward + backward FLOPs counted by
torch.utils.flop_counter over the device's dense bf16 peak) and peak memory (torch.cuda.max_memory_allocated).
Prints a Markdown table (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory without installing

from tvlt_core import shards  # noqa: E402
from tvlt_core.data import ReadPolicy, StreamingLoader, TvltBatcher, snapshot  # noqa: E402
from tvlt_core.data.stream import read_shard  # noqa: E402

log = logging.getLogger("train_throughput")

# Dense bf16 peaks (TFLOP/s) for MFU; other devices print n/a unless --peak-tflops is given.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


# --- shards --------------------------------------------------------------------------------------------------------
def write_bench_shards(folder: str, num_shards: int, per_shard: int, seed: int = 0) -> str:
    """Shards of the contract's pretrain format: 8 JPEG frames 224 x 224 (smooth random images, so JPEG sizes and
    decode costs are like real frames') and a float16 log-mel of 400 frames."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    manifest = shards.Manifest(mode="pretrain", recipe={"bench": 1}, recipe_hash=shards.recipe_hash({"bench": 1}))
    manifest.generations.append(shards.Generation(id=1, started="bench", finished="bench"))
    n = 0
    for s in range(num_shards):
        name = shards.shard_name(1, s)
        with wds.TarWriter(f"{folder}/{name}") as sink:
            for _ in range(per_shard):
                coarse = rng.integers(0, 256, size=(8, 14, 14, 3), dtype=np.uint8)
                frames = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)  # (8, 224, 224, 3)
                mel = rng.uniform(-1, 0.5, size=(400, 128)).astype(np.float16)
                sink.write(shards.encode_sample(shards.sample_key(f"bench://{n}", 0), frames, {"n": n}, mel=mel))
                n += 1
        size = os.path.getsize(f"{folder}/{name}")
        digest = hashlib.sha256(Path(f"{folder}/{name}").read_bytes()).hexdigest()
        manifest.shards.append(shards.ShardEntry(name=name, samples=per_shard, bytes=size, generation=1, sha256=digest))
    Path(shards.manifest_url(folder)).write_text(manifest.to_json())
    return folder


# --- the loader alone ---------------------------------------------------------------------------------------------
def loader_rate(manifest: str, batcher, batch_size: int, num_workers: int, batches: int,
                verify: str = "sha256") -> tuple[float, float]:  # fmt: skip
    """(samples/s, CPU ms per sample in this process) of one rank's loader, after its first batch (worker
    start-up excluded). With worker processes the decoding is theirs, so the CPU figure means something for 0 only;
    unlike wall time it hardly depends on what else the machine runs."""
    loader = StreamingLoader(manifest, batcher, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=32,
                             policy=ReadPolicy(verify=verify))  # fmt: skip
    it = iter(loader)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    samples = batches * batch_size
    return samples / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / samples


def read_rate(manifest: str, verify: str, passes: int) -> float:
    """MB/s of reading every shard ``passes`` times through the loader's read stage (verification, tar parsing),
    decoding nothing."""
    snap = snapshot.take(manifest)
    t0, size = time.perf_counter(), 0
    for _ in range(passes):
        for url, entry in zip(snap.urls(), snap.shards):
            for sample in read_shard(url, entry, verify):
                size += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return size / 2**20 / (time.perf_counter() - t0)


def verify_table(manifest: str, batcher, batch: int, repeats: int = 3) -> str:
    """Loader samples/s, CPU ms per sample and bare read MB/s with each verification level, interleaved
    ``repeats`` times (so a load change on the machine hits all three alike); medians."""
    modes = ("off", "length", "sha256")
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    torch.set_num_threads(1)
    for _ in range(repeats):
        for mode in modes:
            rate, cpu = loader_rate(manifest, batcher, batch, 0, batches=16, verify=mode)
            runs[mode].append((rate, cpu, read_rate(manifest, mode, passes=2)))
    torch.set_num_threads(os.cpu_count() or 1)
    median = {m: [float(np.median([r[i] for r in runs[m]])) for i in range(3)] for m in modes}
    lines = [
        f"Shard verification, the loader alone: one rank in-process, batch {batch}, TVLT tiny batcher (64 px), "
        f"median of {repeats} interleaved runs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}.",
        "",
        "| data.verify | samples/s | CPU ms per sample | vs off | bare read MB/s | vs off |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in modes:
        rate, cpu, read = median[m]
        lines.append(f"| {m} | {rate:.1f} | {cpu:.1f} | {rate / median['off'][0]:.2f}x | {read:.0f} | "
                     f"{read / median['off'][2]:.2f}x |")  # fmt: skip
    return "\n".join(lines)


# --- CPU training rows --------------------------------------------------------------------------------------------
def train_row(manifest: str, work: str, workers: int, stage: int, steps: int, batch: int) -> dict:
    from tvlt_core.models.tvlt import tvlt_tiny
    from tvlt_core.tracking import RunInfo
    from tvlt_core.train.config import (
        CheckpointConfig, DataConfig, OptimConfig, ParallelConfig, ScheduleConfig, TrackingConfig, TrainingConfig,
    )  # fmt: skip
    from tvlt_core.train.ray_job import TrainJob, dataset_info, launch
    from tvlt_core.train.tasks import TvltPretrainTask

    cfg = TrainingConfig(
        data=DataConfig(manifest=manifest, batch_size=batch, num_workers=0, shuffle_buffer=32),
        optim=OptimConfig(lr=3e-4),
        schedule=ScheduleConfig(max_steps=2 * steps, warmup_steps=2),
        checkpoint=CheckpointConfig(storage_path=f"{work}/runs", every_steps=10**9),  # only the final checkpoint
        parallel=ParallelConfig(num_workers=workers, zero_stage=stage, max_failures=0),
        tracking=TrackingConfig(experiment="bench", log_every_steps=steps, system_metrics=False),
        work_dir=f"{work}/mlflow",
    )  # fmt: skip
    run = RunInfo(f"bench-w{workers}-z{stage}-{int(time.time())}", dataset=dataset_info(manifest))
    job = TrainJob(TvltPretrainTask(model_config=tvlt_tiny()), cfg, run)
    t0 = time.perf_counter()
    metrics = launch(job).metrics
    return {
        "workers": workers, "stage": stage, "samples_s": metrics["perf/samples_per_s"],
        "wait": metrics["perf/data_wait_share"], "job_s": time.perf_counter() - t0,
    }  # fmt: skip


def cpu_table(args) -> str:
    import ray

    work = tempfile.mkdtemp(prefix="train-bench-")
    manifest = write_bench_shards(f"{work}/shards", num_shards=8, per_shard=24)
    batcher = TvltBatcher(image_size=64, num_frames=8, patch_size=16, max_audio_frames=512)
    torch.set_num_threads(1)  # like one training rank's share of this machine
    verification = verify_table(manifest, batcher, args.batch)
    if args.verify_only:
        return verification
    rates = {w: loader_rate(manifest, batcher, args.batch, w, batches=24) for w in (0, 1)}
    torch.set_num_threads(os.cpu_count() or 1)
    ray.init(num_cpus=max(2, max(args.workers)), include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False)  # fmt: skip
    rows = []
    for workers in args.workers:
        for stage in args.stages:
            rows.append(train_row(manifest, work, workers, stage, args.steps, args.batch))
            log.info("%s", rows[-1])
    ray.shutdown()
    load = os.getloadavg()[0]
    lines = [
        f"TVLT tiny, batch {args.batch} per worker, CPU fp32, {os.cpu_count()} cores ({platform.machine()}, load "
        f"average {load:.1f} at the end), measured over steps {args.steps + 1}-{2 * args.steps}. The loader alone, "
        f"one rank: {rates[0][0]:.1f} samples/s in-process ({rates[0][1]:.0f} CPU ms per sample, so "
        f"{1000 / rates[0][1]:.0f} samples/s per free core), {rates[1][0]:.1f} samples/s with 1 worker process.",
        "",
        "| workers | ZeRO | samples/s | samples/s per worker | data wait | job wall s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['stage']} | {r['samples_s']:.1f} | {r['samples_s'] / r['workers']:.1f} | "
            f"{100 * r['wait']:.0f}% | {r['job_s']:.0f} |"
        )
    return "\n".join(lines + ["", verification])


# --- one GPU ------------------------------------------------------------------------------------------------------
def gpu_table(args) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    from tvlt_core import distributed
    from tvlt_core.models.tvlt import TvltForPreTraining, tvlt_base
    from tvlt_core.train.config import OptimConfig, ParallelConfig
    from tvlt_core.train.engine import build_engine
    from tvlt_core.train.tasks import TvltPretrainTask

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    distributed.init_process_group("nccl")
    device = torch.device("cuda", 0)
    config = tvlt_base()
    model = TvltForPreTraining(config)
    engine = build_engine(model, OptimConfig(lr=1e-4), ParallelConfig(num_workers=1, use_gpu=True, zero_stage=0),
                          args.gpu_batch, 1)  # fmt: skip
    task = TvltPretrainTask(model_config=config)
    batcher = TvltBatcher(image_size=224, num_frames=8, patch_size=16, max_audio_frames=2048)
    rng = np.random.default_rng(0)
    import random as pyrandom

    items = [
        {"key": str(i), "pixels": torch.rand(8, 3, 224, 224) * 2 - 1,
         "mel": torch.from_numpy(rng.uniform(-1, 0.5, (1024, 128)).astype(np.float32)), "silent": False}
        for i in range(args.gpu_batch)
    ]  # fmt: skip
    batch = batcher.collate(items, pyrandom.Random(0))

    def step():
        loss, _, _ = task.forward(engine, batch, device, torch.bfloat16)
        engine.backward(loss)
        engine.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.gpu_steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.gpu_steps
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = f"{100 * flops / seconds / (peak * 1e12):.1f}%" if peak else "n/a"
    memory = torch.cuda.max_memory_allocated() / 2**30
    return "\n".join([
        f"TVLT base, bf16, DeepSpeed ZeRO 0, one {name}, batch {args.gpu_batch} (8 frames 224 px, 1024 mel frames)",
        "",
        "| samples/s | step s | TFLOP/step | MFU | peak GiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {args.gpu_batch / seconds:.1f} | {seconds:.3f} | {flops / 1e12:.2f} | {mfu} | {memory:.1f} |",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps (each job runs twice as many)")
    p.add_argument("--batch", type=int, default=8, help="samples per worker per step")
    p.add_argument("--gpu", action="store_true", help="the GPU row instead of the CPU table")
    p.add_argument("--verify-only", action="store_true", help="only the shard verification table (no training jobs)")
    p.add_argument("--gpu-batch", type=int, default=32)
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(gpu_table(args) if args.gpu else cpu_table(args), flush=True)


if __name__ == "__main__":
    main()
