"""Training-step benchmark: our models against the reference implementation, same config, inputs and weights.

    .venv/bin/python benchmarks/model_step.py                          # every case, CPU fp32, a few minutes
    .venv/bin/python benchmarks/model_step.py --cases tvlt-tiny-b8 --dtype bf16 --threads 1
    .venv/bin/python benchmarks/model_step.py --cases tvp-tiny-b1,tvp-tiny-b4,tvp-tiny-b8 --threads 1
    .venv/bin/python benchmarks/model_step.py --device cuda --dtype bf16 --flops --peak-tflops 989   # H100

The CUDA path (synchronised timing, CUDA allocator peaks, FLOP/s and MFU) has not run yet: no GPU was available
when it was written. Add a case with a realistic GPU batch before using it there.

Per case, one fresh subprocess builds both implementations (the reference, from ``transformers``, loads our freshly
initialised weights by parameter name), runs ``warmup`` untimed steps of each, then ``steps`` timed steps
alternating ours / reference, so load from other work on the machine falls on both alike. Memory is measured in
one more fresh subprocess per implementation, over its first step. A step is forward + backward +
``zero_grad(set_to_none=True)``, no optimizer. Masking noise is fixed and shared: both do the same work.

What the columns measure:
    step s      median wall time of the timed steps (best in brackets); speed-up = reference / ours, on medians
    cpu s       median CPU time of the process per step (all threads). On a machine shared with other work the
                wall time stretches with the load while the CPU time mostly does not: with --threads 1 it is the
                steadier measure of the work a step takes (with more threads it also counts spin-waiting).
    samples/s   batch / median step
    peak MiB    what one step adds at its peak on top of the model, its inputs and the runtime: activations,
                gradients, temporaries. CPU: peak resident set size during the step (VmHWM, reset through
                /proc/self/clear_refs) minus the resident size before it, in a process where glibc returns every
                block of 64 KiB or more to the system when freed (MALLOC_MMAP_THRESHOLD_), so resident = live.
                CUDA: torch.cuda.max_memory_allocated during the step minus memory allocated before it.
    TFLOP/s     with --flops: the reference's FLOPs per step (torch.utils.flop_counter, forward + backward) over
                the median step, for both rows; MFU when --peak-tflops gives the device's dense peak.
Prints a Markdown table (for benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory without installing
from tvlt_core.input_spec import TVP_MAX_TEXT_LENGTH  # noqa: E402  (torch-free numbers, after the path)

IMPLEMENTATIONS = ("ours", "reference")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # key of BUILDERS
    preset: str
    batch: int
    steps: int  # timed steps
    warmup: int = 1
    audio_frames: int = 0  # TVLT: spectrogram frames per sample (512 frames = 5.9 s)


CASES = [
    Case("tvlt-tiny-b8", "tvlt", "tiny", batch=8, steps=10, warmup=2, audio_frames=256),
    Case("tvlt-base-b1", "tvlt", "base", batch=1, steps=2, warmup=1, audio_frames=512),
    # TVP: the reference runs batch 1 only; its rows at batch B accumulate B batch-1 passes (see build_tvp).
    Case("tvp-tiny-b1", "tvp", "tiny", batch=1, steps=10, warmup=2),
    Case("tvp-tiny-b4", "tvp", "tiny", batch=4, steps=10, warmup=2),
    Case("tvp-tiny-b8", "tvp", "tiny", batch=8, steps=10, warmup=2),
]


# ------------------------------------------------------------------------------------------------------- TVLT


def build_tvlt(case: Case, impl: str, device: torch.device, dtype: torch.dtype):
    """-> (model, step: () -> loss). TvltForPreTraining with matching and MAE, every patch real."""
    from tvlt_core.models.tvlt import TVLT_PRESETS, TvltForPreTraining, make_audio_mask_noise, make_pixel_mask_noise

    config = TVLT_PRESETS[case.preset]()
    g = torch.Generator().manual_seed(0)
    b, t, s = case.batch, config.num_frames, config.image_size
    n_pixel = t * config.patches_per_frame
    n_audio = case.audio_frames // config.audio_patch_size[0] * config.freq_patches
    inputs = dict(
        pixel_values=torch.rand(b, t, 3, s, s, generator=g) * 2 - 1,
        audio_values=torch.rand(b, 1, case.audio_frames, 128, generator=g) * 2 - 1,
        pixel_mask=torch.ones(b, n_pixel),
        audio_mask=torch.ones(b, n_audio),
        labels=torch.randint(0, 2, (b, 1), generator=g).float(),
        pixel_values_mixed=torch.rand(b, t, 3, s, s, generator=g) * 2 - 1,
        pixel_mask_mixed=torch.ones(b, n_pixel),
    )
    floats = ("pixel_values", "audio_values", "pixel_values_mixed", "labels")  # masks stay fp32, as in the reference
    inputs = {k: v.to(device, dtype if k in floats else None) for k, v in inputs.items()}
    pixel_noise = make_pixel_mask_noise(b, n_pixel, generator=g).to(device)
    audio_noise = make_audio_mask_noise(b, n_audio, config.freq_patches, config.audio_mask_type, generator=g).to(device)

    torch.manual_seed(0)
    model = TvltForPreTraining(config)
    if impl == "reference":
        import transformers
        from transformers.models.deprecated.tvlt import modeling_tvlt

        state = model.state_dict()
        model = transformers.TvltForPreTraining(transformers.TvltConfig.from_dict(config.to_hf_dict("x")))
        model.load_state_dict(state)
        del state
        # the reference draws noise inside forward; hand it ours
        modeling_tvlt.generate_pixel_mask_noise = lambda seq, pixel_mask=None, mask_ratio=0.75: (
            pixel_noise, int(seq.shape[1] * (1 - mask_ratio))
        )  # fmt: skip
        modeling_tvlt.generate_audio_mask_noise = lambda seq, audio_mask=None, mask_ratio=0.75, **_: (
            audio_noise, int(seq.shape[1] * (1 - mask_ratio))
        )  # fmt: skip
        step = lambda: model(**inputs).loss  # noqa: E731
    else:
        step = lambda: model(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise).loss  # noqa: E731
    model.to(device=device, dtype=dtype).train()
    return model, step


# -------------------------------------------------------------------------------------------------------- TVP

TVP_TEXT_TOKENS = TVP_MAX_TEXT_LENGTH  # the default tokenizer length; about half of each row is padding


def build_tvp(case: Case, impl: str, device: torch.device, dtype: torch.dtype):
    """-> (model, step: () -> loss). TvpForVideoGrounding with the grounding loss.

    The reference only runs batch 1 (it unpacks ``labels`` along the batch axis), so its step for a batch of B is
    B batch-1 forward/backward passes accumulating gradients, the way it would be trained at that batch: the same
    samples and the same gradient (ours averages the per-sample losses, so the reference's are scaled by 1 / B).
    The reference's BatchNorm uses batch statistics in train mode, ours running ones: the same arithmetic cost.
    """
    from tvlt_core.models.tvp import TVP_PRESETS, TvpForVideoGrounding

    config = TVP_PRESETS[case.preset]()
    g = torch.Generator().manual_seed(0)
    b, s, length = case.batch, config.max_img_size, TVP_TEXT_TOKENS
    lengths = torch.randint(length // 4, length + 1, (b,), generator=g)
    duration = torch.rand(b, generator=g) * 20 + 10
    start = torch.rand(b, generator=g) * duration / 2
    inputs = dict(
        input_ids=torch.randint(5, config.vocab_size, (b, length), generator=g),
        pixel_values=torch.rand(b, config.num_frames, 3, s, s, generator=g) * 2 - 1,
        attention_mask=(torch.arange(length)[None] < lengths[:, None]).long(),
        labels=torch.stack([duration, start, start + torch.rand(b, generator=g) * duration / 2], dim=1),
    )
    inputs = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in inputs.items()}

    torch.manual_seed(0)
    model = TvpForVideoGrounding(config)
    if impl == "reference":
        import transformers

        state = model.state_dict()
        model = transformers.TvpForVideoGrounding(transformers.TvpConfig.from_dict(config.to_dict()))
        model.load_state_dict(state)
        del state

        def sample_loss(i: int) -> torch.Tensor:
            one = {k: v[i : i + 1] for k, v in inputs.items()}
            one["pixel_values"] = one["pixel_values"].clone()  # its prompter writes into pixel_values in place
            one["labels"] = one["labels"].T  # (3, 1): duration, start, end unpacked along dim 0
            return model(**one).loss.sum() / b

        def step() -> torch.Tensor:
            for i in range(b - 1):
                sample_loss(i).backward()
            return sample_loss(b - 1)  # the harness calls backward on the last one

    else:
        step = lambda: model(**inputs).loss  # noqa: E731
    model.to(device=device, dtype=dtype).train()
    return model, step


BUILDERS: dict[str, Callable] = {"tvlt": build_tvlt, "tvp": build_tvp}


# ------------------------------------------------------------------------------------------------ measurement


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _stepper(model: torch.nn.Module, step: Callable, device: torch.device) -> Callable[[], None]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step():
        step().backward()
        model.zero_grad(set_to_none=True)
        sync()

    return one_step


def measure_memory(case: Case, impl: str, device: torch.device, dtype: torch.dtype) -> dict:
    """{"peak_bytes": what the first step adds at its peak} for one implementation, alone in this process."""
    one_step = _stepper(*BUILDERS[case.model](case, impl, device, dtype), device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        base = _status_kib("VmRSS") * 1024
    one_step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") * 1024
    return {"peak_bytes": peak - base}


def measure_time(case: Case, device: torch.device, dtype: torch.dtype, count_flops: bool) -> dict:
    """{impl: {"times", "cpu_times", "flops"}}: both implementations in this process, timed steps alternating
    between them, so load from other work on the machine falls on both alike."""
    steppers = {impl: _stepper(*BUILDERS[case.model](case, impl, device, dtype), device) for impl in IMPLEMENTATIONS}
    results = {impl: {"times": [], "cpu_times": [], "flops": None} for impl in IMPLEMENTATIONS}
    for impl, one_step in steppers.items():
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                one_step()
            results[impl]["flops"] = counter.get_total_flops()
        for _ in range(case.warmup):
            one_step()
    for _ in range(case.steps):
        for impl, one_step in steppers.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            one_step()
            results[impl]["times"].append(time.perf_counter() - start)
            results[impl]["cpu_times"].append(time.process_time() - cpu_start)
    return results


def run_worker(case: Case, measure: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", measure, "--cases", case.name, "--device", args.device]
    command += ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
    command += ["--flops"] if args.flops and measure == "time" else []
    # 64 KiB: tensors go to mmap and back to the system when freed, so the resident size follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if measure != "time" else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case.name}/{measure} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs (one extra step per run)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU, e.g. 989 (H100 bf16)")
    parser.add_argument("--worker", choices=("time",) + IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.cases.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {sorted(by_name)}")
    cases = [by_name[n] for n in args.cases.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    if args.worker:
        if args.worker == "time":
            print(json.dumps(measure_time(cases[0], device, dtype, args.flops)))
        else:
            print(json.dumps(measure_memory(cases[0], args.worker, device, dtype)))
        return

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"torch {torch.__version__}, {args.device} ({cpu if device.type == 'cpu' else torch.cuda.get_device_name()})"
          f", {args.dtype}, {args.threads or torch.get_num_threads()} threads, python {platform.python_version()}\n")
    header = "| case | impl | step s (best) | cpu s | samples/s | peak MiB | speed-up (wall, cpu) | memory ratio |"
    header += " TFLOP/s | MFU |" if args.flops else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for case in cases:
        results = run_worker(case, "time", args)
        for impl in IMPLEMENTATIONS:
            results[impl].update(run_worker(case, impl, args))
        median = {impl: statistics.median(r["times"]) for impl, r in results.items()}
        cpu = {impl: statistics.median(r["cpu_times"]) for impl, r in results.items()}
        for impl, r in results.items():
            row = [case.name, impl, f"{median[impl]:.3f} ({min(r['times']):.3f})", f"{cpu[impl]:.3f}",
                   f"{case.batch / median[impl]:.2f}", f"{r['peak_bytes'] / 2**20:.0f}"]
            ours = impl == "ours"
            speedup = f"{median['reference'] / median['ours']:.2f}x, {cpu['reference'] / cpu['ours']:.2f}x"
            memory = f"{results['ours']['peak_bytes'] / results['reference']['peak_bytes']:.2f}"
            row += [speedup if ours else "", memory if ours else ""]
            if args.flops:
                tflops = results["reference"]["flops"] / median[impl] / 1e12
                row += [f"{tflops:.2f}", f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else ""]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
