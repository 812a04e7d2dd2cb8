"""What a training checkpoint folder holds, and how one rank writes and reads its part.

Every rank writes its own part; Ray Train merges them into one folder in storage::

    deepspeed/<tag>/...            DeepSpeed's files: model states and each rank's ZeRO partition
    rank-00000.json ...            per rank: step, samples seen, DeepSpeed tag, loader position (``Trainer.state_dict``)
    rank-00000.rng.safetensors     per rank: torch random state (masking noise, dropout), so a resume is exact

JSON and safetensors only: no pickle of ours (DeepSpeed's own files are its format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DEEPSPEED_DIR = "deepspeed"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def rng_file(rank: int) -> str:
    return f"rank-{rank:05d}.rng.safetensors"


def save_rank(engine, folder: str, rank: int, state: dict[str, Any]) -> None:
    """Write rank ``rank``'s part into the local ``folder``: DeepSpeed's state under ``state["tag"]``, ``state``
    itself as JSON, and the random state. A collective: every rank calls (DeepSpeed gathers nothing, but waits)."""
    engine.save_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=state["tag"], client_state={"step": state["step"]})
    (Path(folder) / rank_file(rank)).write_text(json.dumps(state))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(Path(folder) / rng_file(rank)))


def load_rank(engine, folder: str, rank: int) -> dict[str, Any]:
    """Load rank ``rank``'s DeepSpeed state and random state from ``folder``; returns its JSON state (every rank
    calls). A folder written by another number of ranks fails naming what it holds."""
    path = Path(folder) / rank_file(rank)
    if not path.exists():
        written = sorted(p.name for p in Path(folder).glob("rank-*.json"))
        raise RuntimeError(
            f"checkpoint {folder} has no state for rank {rank} (it holds {written}); resume with "
            f"parallel.num_workers equal to the number of ranks that wrote it"
        )
    state = json.loads(path.read_text())
    load_path, _ = engine.load_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=state["tag"])
    if load_path is None:
        raise RuntimeError(f"checkpoint {folder}: DeepSpeed found no state under tag {state['tag']}")
    rng = load_file(str(Path(folder) / rng_file(rank)))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
