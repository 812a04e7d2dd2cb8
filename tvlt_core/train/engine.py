"""DeepSpeed from our typed config: the engine, its checkpoints (loaded without unpickling code), plain weights.

ZeRO, offload, precision, accumulation and clipping are applied here, from outside the model (the model files
know nothing of them). The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed as a client optimizer: it runs
on CPU and GPU alike without compiling DeepSpeed's fused/CPU Adam kernels at start-up.

DeepSpeed loads its checkpoints with ``torch.load(weights_only=False)``, which would execute whatever a tampered
checkpoint contains. ``SafeCheckpointEngine`` loads them with ``weights_only=True`` instead, allowing only the
four small DeepSpeed state classes the files hold besides tensors and plain containers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_fp32_param
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from tvlt_core.train.config import OptimConfig, ParallelConfig

log = logging.getLogger(__name__)


def deepspeed_config(optim: OptimConfig, parallel: ParallelConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``micro_batch`` samples per rank and ``world_size`` data-parallel ranks."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if parallel.zero_stage >= 2:
        # overlap_comm needs CUDA streams; contiguous gradients save the fragmentation of many small buckets
        zero.update(overlap_comm=parallel.use_gpu, contiguous_gradients=True)
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": parallel.use_gpu}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": parallel.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum_steps,
        "train_batch_size": micro_batch * optim.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": parallel.resolved_precision() == "bf16"},
        "zero_allow_untested_optimizer": True,  # our client AdamW
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW instead of compiling DeepSpeedCPUAdam
        "steps_per_print": 2**31 - 1,  # progress is logged by the training loop
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms, embeddings vectors and tokens (1-D or 0-D) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class OutputDict(dict):
    """A model's dataclass output as a dict with attribute access (``out.loss``), like Hugging Face's ModelOutput."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _dataclass_to_dict(module: nn.Module, args, output):
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return OutputDict((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    return None


def make_outputs_traversable(model: nn.Module) -> None:
    """ZeRO-3 gathers a submodule's parameters for backward through hooks on the tensors it returns, and finds
    them only inside tuples, lists and dicts; our models return dataclasses. A forward hook on every submodule
    (registered before DeepSpeed's own, so it runs first) hands them over as ``OutputDict``s instead."""
    for module in model.modules():
        module.register_forward_hook(_dataclass_to_dict)


def build_engine(model: nn.Module, optim: OptimConfig, parallel: ParallelConfig, micro_batch: int, world_size: int):
    """A DeepSpeed engine around ``model`` (on the current process group), with the safe checkpoint loader."""
    if parallel.zero_stage == 3:
        make_outputs_traversable(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
    )
    config = deepspeed_config(optim, parallel, micro_batch, world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    log.info(
        "DeepSpeed engine: ZeRO stage %d, %s, micro-batch %d x %d accumulation x %d ranks",
        parallel.zero_stage, parallel.resolved_precision(), micro_batch, optim.grad_accum_steps, world_size,
    )  # fmt: skip
    return engine


# The non-tensor objects DeepSpeed puts in its checkpoint files (loss scaler, ZeRO stage, partition addresses).
DEEPSPEED_STATE_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and an explicit allow-list."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_STATE_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)


def full_state_dict(engine, *, rank: int) -> dict[str, torch.Tensor]:
    """The model's fp32 weights, whole, on CPU, on rank 0 (other ranks get ``{}``). A collective: all ranks call.

    Parameters come from the optimizer's fp32 masters (ZeRO 1-3 partitions and bf16 training are gathered by
    DeepSpeed), so an export is not rounded to bf16; buffers (BatchNorm statistics) come from the module.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # gathers across ranks for ZeRO; None when there is no partition
        if rank == 0:
            state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    if rank == 0:
        for name, buffer in engine.module.named_buffers():
            state[name] = buffer.detach().cpu().clone()
    return state


def plain_grad_norm(engine) -> float | None:
    """The global gradient norm where DeepSpeed keeps none (ZeRO stage 0 in fp32 clips without storing it); call
    after the last backward of an optimizer step, before ``engine.step()``. None where DeepSpeed has its own."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled():
        return None
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
