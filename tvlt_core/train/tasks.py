"""What differs between pretraining TVLT and fine-tuning TVP; everything else (engine, loop, checkpoints,
tracking) is shared. A task is a small picklable object the job builds and Ray ships to every worker:

    build_model()                  -> nn.Module, from scratch or ``init_from`` (folder, URL or models:/ URI)
    batcher(model)                 -> the loader's per-task sample transform and collate
    forward(model, batch, device)  -> (loss, {metric name: scalar tensor}, model output)
    artifacts(model, batch, output)-> {name: uint8 image array (logged with log_image at the step) or file bytes}
    export_files()                 -> extra files of the exported Hugging Face folder (the model's own
                                      ``save_pretrained(path, state_dict=...)`` writes its config and weights)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tvlt_core import metrics
from tvlt_core.data.batches import TvltBatcher, TvpBatcher
from tvlt_core.data.stream import Batcher
from tvlt_core.models.tvlt import TvltConfig, TvltForPreTraining
from tvlt_core.models.tvp import TvpConfig, TvpForVideoGrounding
from tvlt_core.models.tvp_aids import TvpForGroundingWithAids
from tvlt_core.text import TextTokenizer
from tvlt_core.train import pictures
from tvlt_core.video import tvp_logits_to_seconds

log = logging.getLogger(__name__)


class Task(Protocol):
    name: str
    init_from: str
    data_mode: str  # the shards' manifest mode it trains on ("pretrain" | "grounding"); others are refused

    def build_model(self) -> nn.Module: ...

    def batcher(self, model: nn.Module) -> Batcher: ...

    def forward(self, model: nn.Module, batch: dict[str, Any], device: torch.device, dtype: torch.dtype): ...

    def artifacts(self, model: nn.Module, batch: dict[str, Any], output: Any) -> dict[str, np.ndarray | bytes]: ...

    def export_files(self) -> dict[str, bytes]: ...


def to_device(batch: dict[str, Any], names: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The model's tensor arguments on ``device``; floating point ones in the engine's ``dtype`` (bf16 or fp32)."""
    out = {}
    for name in names:
        if name in batch:
            t = batch[name].to(device, non_blocking=True)
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


# --- TVLT: masked autoencoding + video-audio matching ---------------------------------------------------------------
@dataclass
class TvltPretrainTask:
    model_config: TvltConfig = field(default_factory=TvltConfig)
    init_from: str = ""
    mismatch_prob: float = 0.5
    name: str = "tvlt-pretrain"
    data_mode: str = "pretrain"

    def build_model(self) -> TvltForPreTraining:
        if not self.init_from:
            return TvltForPreTraining(self.model_config)
        # heads missing from an encoder-only checkpoint start fresh; anything else must match by name
        return TvltForPreTraining.from_pretrained(self.init_from, strict=False)

    def batcher(self, model: TvltForPreTraining) -> TvltBatcher:
        c = model.config
        return TvltBatcher(
            image_size=c.image_size, num_frames=c.num_frames, patch_size=c.image_patch_size[0],
            max_audio_frames=c.spectrogram_length, matching=c.task_matching, mismatch_prob=self.mismatch_prob,
        )  # fmt: skip

    def forward(self, model, batch, device, dtype):
        names = ["pixel_values", "audio_values", "pixel_mask", "audio_mask", "labels", "pixel_values_mixed", "pixel_mask_mixed"]
        out = model(**to_device(batch, names, device, dtype))
        parts = {"loss": out.loss}
        for name in ("matching_loss", "pixel_loss", "audio_loss"):
            if getattr(out, name, None) is not None:
                parts[name] = getattr(out, name)
        if getattr(out, "matching_logits", None) is not None:
            predicted = (out.matching_logits.float().view(-1) > 0).float().cpu()
            parts["matching_accuracy"] = (predicted == batch["labels"].view(-1)).float().mean()
        return out.loss, parts, out

    def artifacts(self, model, batch, output) -> dict[str, np.ndarray]:
        """Pictures of the batch's first clip, its input beside what the model makes of it: ``frames`` (rows:
        original | masked | reconstructed, frames left to right) and ``spectrogram`` (the same three rows)."""
        if getattr(output, "pixel_logits", None) is None:
            return {}
        return pictures.reconstructions(model.config, batch, output)

    def export_files(self) -> dict[str, bytes]:
        return {}


# --- TVP: temporal grounding -------------------------------------------------------------------------------------------
@dataclass
class TvpGroundingTask:
    model_config: TvpConfig = field(default_factory=TvpConfig)
    tokenizer_dir: str = ""  # folder with tokenizer.json / vocab.txt (the job fills it in)
    max_text_length: int = 32
    init_from: str = ""
    # From-scratch aids (tvlt_core.models.tvp_aids; 0 = off, the reference recipe): the weights of their losses,
    # added to the grounding loss.
    word_segment_weight: float = 0.0
    query_token_weight: float = 0.0
    name: str = "tvp-grounding"
    data_mode: str = "grounding"

    def tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_folder(self.tokenizer_dir, self.max_text_length)

    def build_model(self) -> TvpForVideoGrounding:
        aids = {"word_segment_weight": self.word_segment_weight, "query_token_weight": self.query_token_weight}
        if not any(aids.values()):
            if not self.init_from:
                return TvpForVideoGrounding(self.model_config)
            return TvpForVideoGrounding.from_pretrained(self.init_from)
        if not self.init_from:
            return TvpForGroundingWithAids(self.model_config, **aids)
        start = TvpForVideoGrounding.from_pretrained(self.init_from)
        model = TvpForGroundingWithAids(start.config, **aids)
        model.load_state_dict(start.state_dict(), strict=False)  # the aid's head starts fresh
        return model

    def batcher(self, model: TvpForVideoGrounding) -> TvpBatcher:
        tokenizer = self.tokenizer()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer in {self.tokenizer_dir} has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                f"{model.config.vocab_size}: use the tokenizer saved with the checkpoint"
            )
        return TvpBatcher(tokenizer=tokenizer, image_size=model.config.max_img_size, num_frames=model.config.num_frames,
                          aids=bool(self.word_segment_weight or self.query_token_weight))  # fmt: skip

    def forward(self, model, batch, device, dtype):
        names = ["input_ids", "pixel_values", "attention_mask", "labels", "word_segments", "word_segment_mask",
                 "query_token_mask"]  # fmt: skip
        out = model(**to_device(batch, names, device, dtype))
        labels = batch["labels"]
        predicted = tvp_logits_to_seconds(out.logits.detach().float().cpu(), labels[:, 0])
        scores = metrics.grounding_metrics(predicted, labels[:, 1:])
        parts = {"loss": out.loss, **{name: torch.tensor(value) for name, value in scores.items()}}
        for name in ("grounding_loss", "word_segment_loss", "query_token_loss"):
            if getattr(out, name, None) is not None:
                parts[name] = getattr(out, name)
        return out.loss, parts, out

    def artifacts(self, model, batch, output) -> dict[str, np.ndarray | bytes]:
        """Predicted vs true segments of the batch: ``segments`` a picture (per query: true in green above,
        predicted in blue below, over the video's duration) and ``segments.json``."""
        labels = batch["labels"]
        predicted = tvp_logits_to_seconds(output.logits.detach().float().cpu(), labels[:, 0])
        rows = [
            {"key": k, "sentence": s, "duration": round(float(d), 3), "true": [round(float(a), 3), round(float(b), 3)],
             "predicted": [round(float(p), 3), round(float(q), 3)]}
            for k, s, (d, a, b), (p, q) in zip(batch["keys"], batch["sentences"], labels.tolist(), predicted.tolist())
        ]  # fmt: skip
        return {"segments.json": json.dumps(rows, indent=1).encode(), "segments": pictures.segments(rows)}

    def export_files(self) -> dict[str, bytes]:
        return self.tokenizer().files()
