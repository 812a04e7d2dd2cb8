"""Typed configuration of a training run, one small dataclass per component.

Each component receives only its own section. Jobs compose these with their model section into one config
(``jobs/pretrain.py``'s ``PretrainConfig``), which ``jobs.config.parse`` fills from YAML presets and the command
line. Cross-field rules raise ``ValueError`` naming the field, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tvlt_core.data.stream import ReadPolicy
from tvlt_core.tracking import DEFAULT_WORK_DIR

Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class DataConfig:
    """Where the shards are and how they are read (per rank)."""

    manifest: str = ""  # shard folder or manifest.json URL (local path, s3://...); required
    batch_size: int = 8  # samples per micro-batch on each rank
    num_workers: int = 1  # loader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 64  # raw samples held for shuffling per loader worker
    seed: int = 0
    # The run reads the snapshot of the manifest it started on (<run folder>/data-snapshot.json); true: take a new
    # snapshot of data.manifest now and continue the run on it (the loader restarts its epoch).
    refresh: bool = False
    recipe_hash: str = ""  # "" = any recipe of the task's mode; else the shards' recipe hash must be this one
    # The loader's read policy (defaults and checks are ReadPolicy's): every shard's length and count always, sha256
    # unless "length" (ReadPolicy's "off" is for benchmarks only); a shard unlike its snapshot entry: stop naming it,
    # or skip it; the share of a reader's samples per epoch it may skip before the rank fails; a rank that prepares
    # no sample for this long fails naming its shards.
    verify: Literal["sha256", "length"] = ReadPolicy.verify
    on_damage: Literal["fail", "skip"] = ReadPolicy.on_damage
    max_skip_share: float = ReadPolicy.max_skip_share
    stall_timeout_s: float = ReadPolicy.stall_timeout_s

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.num_workers must be >= 0 and data.shuffle_buffer >= 1")
        self.read_policy()  # its checks, at load time

    def read_policy(self) -> ReadPolicy:
        return ReadPolicy(verify=self.verify, on_damage=self.on_damage, max_skip_share=self.max_skip_share,
                          stall_timeout_s=self.stall_timeout_s)  # fmt: skip


@dataclass
class OptimConfig:
    """AdamW, gradient accumulation and clipping."""

    lr: float = 1e-4  # peak learning rate, reached at the end of the warm-up
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # Optimizer steps whose loss or gradients are not finite are skipped (no update) and counted; one more than
    # this stops the run on every rank at the same step, without a Ray Train restart (it would recur).
    max_nonfinite_steps: int = 3

    def __post_init__(self):
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"optim.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.grad_accum_steps < 1:
            raise ValueError("optim.grad_clip must be >= 0 and optim.grad_accum_steps >= 1")


@dataclass
class ScheduleConfig:
    """Linear warm-up to ``optim.lr``, then cosine decay to ``min_lr_ratio * optim.lr`` at ``max_steps``."""

    max_steps: int = 1000  # optimizer steps of the whole run
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"schedule.max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"schedule.warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class CheckpointConfig:
    """Ray Train checkpoints (DeepSpeed state of every rank + loader positions) and Hugging Face exports."""

    storage_path: str = "work/runs"  # Ray Train storage: local folder or s3://bucket/prefix
    every_steps: int = 100  # save a checkpoint every N optimizer steps (and at the end)
    keep: int = 2  # checkpoints kept in storage (older ones are deleted by Ray)
    export_every_steps: int = 0  # also export + register the model every N steps (0 = only at the end)
    init_from: str = ""  # "" = from scratch; a Hugging Face folder / URL; or models:/NAME@ALIAS, models:/NAME/VERSION

    def __post_init__(self):
        if self.every_steps < 1 or self.keep < 1 or self.export_every_steps < 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep must be >= 1, export_every_steps >= 0")


@dataclass
class ParallelConfig:
    """Ray Train workers and the DeepSpeed engine each one runs."""

    num_workers: int = 2  # data-parallel ranks
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO stage >= 1: optimizer state in CPU memory
    offload_params: bool = False  # ZeRO stage 3: parameters in CPU memory
    precision: Precision = "auto"  # auto = bf16 on GPU, fp32 on CPU
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 2  # whole-group restarts from the latest checkpoint when a worker dies

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"parallel.num_workers must be >= 1, got {self.num_workers}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parallel.offload_params needs parallel.zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("parallel.precision bf16 is for GPU workers; CPU workers train in fp32 (use auto)")

    def resolved_precision(self) -> Literal["bf16", "fp32"]:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision


@dataclass
class TrackingConfig:
    """MLflow: one run per job (rank 0 writes), model export and registration."""

    experiment: str = "tvlt"
    run_name: str = ""  # also the Ray Train run name; launching again with the same name resumes the run
    registered_model: str = ""  # "" = do not register; models:/NAME@latest always points at the newest version
    aliases: list[str] = field(default_factory=list)  # extra aliases moved to each newly registered version
    log_every_steps: int = 10  # metrics and a progress line every N optimizer steps
    artifact_every_steps: int = 0  # image grids / predicted segments every N steps (0 = only at the end)
    system_metrics: bool = True

    def __post_init__(self):
        if self.log_every_steps < 1 or self.artifact_every_steps < 0:
            raise ValueError("tracking.log_every_steps must be >= 1 and artifact_every_steps >= 0")
        if any(a.lower() == "latest" for a in self.aliases):
            raise ValueError(
                "tracking.aliases: 'latest' is reserved by MLflow and always resolves to the newest version "
                "(models:/NAME@latest); list only other aliases"
            )


@dataclass
class TrainingConfig:
    """The sections every training job has. A job subclasses it, adds its ``model`` section (and any other of its
    own) and sets its ``tracking`` defaults. The whole tree travels to every worker in a ``TrainJob``
    (``tvlt_core.train.ray_job``), where each component is given the sections it reads."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    work_dir: str = DEFAULT_WORK_DIR  # local MLflow (sqlite + artifacts) when MLFLOW_TRACKING_URI is unset
