"""From-scratch aids for TVP grounding: training help that is not in the reference recipe (issue 19).

The reference fine-tunes TVP from an ImageNet ResNet and BERT. Trained from scratch, the model collapses to one
constant segment within a few dozen steps: its visual token is the mean over frames, time reaches it only through
the per-frame prompts, and before anything is learned the optimiser removes the output's dependence on the input
(README, "What it shows today"). The aid here gives the visual path a job it can learn without the sentence:

word segments: a linear head on the mean of the encoder's last-layer visual tokens predicts, for every vocabulary
    token that occurs in exactly one of the video's sentences, that sentence's (start, end) as fractions of the
    duration (sigmoid outputs, L1 on those tokens only). The targets come from the video's own annotations, which
    every grounding sample already holds; no query is needed, so the visual tokens must carry *when* each described
    thing happens, which is what the sentence later selects from.

``TvpForGroundingWithAids`` is ``TvpForVideoGrounding`` plus that head. Its grounding parameters are created first,
from the same random draws, so with the same seed they start equal to the plain model's; ``grounding_state`` drops
the head, so an export is the reference's checkpoint layout and loads into ``TvpForVideoGrounding`` (and
``transformers``) unchanged. With the aid off (weight 0) the job builds the plain model: the reference loss, bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tvlt_core.checkpoint import write_folder
from tvlt_core.models.tvp import NUM_TEXT_PROMPTS, TvpConfig, TvpForVideoGrounding, TvpVideoGroundingOutput, _init_weights

WORD_SEGMENT_HEAD = "word_segment_head."  # where the aid's parameters sit in the aided model's state dict


def word_segment_targets(
    token_ids: list[set[int]], segments: list[tuple[float, float]], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One video's targets: ``token_ids[i]`` are the tokens of its sentence ``i`` (special tokens excluded),
    ``segments[i]`` that sentence's (start, end) as fractions of the duration.

    Returns (vocab_size, 2) float32 segments and (vocab_size,) float32 mask, 1 on the tokens that occur in exactly one
    sentence (a token two sentences share says nothing about which moment it names).
    """
    if len(token_ids) != len(segments):
        raise ValueError(f"{len(token_ids)} sentences but {len(segments)} segments")
    counts: dict[int, int] = {}
    for ids in token_ids:
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
    target, mask = torch.zeros(vocab_size, 2), torch.zeros(vocab_size)
    for ids, (start, end) in zip(token_ids, segments):
        for t in ids:
            if counts[t] == 1 and 0 <= t < vocab_size:
                target[t] = torch.tensor([start, end])
                mask[t] = 1.0
    return target, mask


def word_segment_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 over the masked tokens' (start, end), in fp32: predicted and target (B, V, 2), mask (B, V).
    0 (with a gradient path) when no token is masked in."""
    err = (predicted.float() - target.float()).abs().sum(-1) * mask.float()  # (B, V)
    return err.sum() / (2 * mask.float().sum()).clamp(min=1.0)


class TvpWordSegmentHead(nn.Module):
    """(B, D) mean visual token -> (B, vocab_size, 2) sigmoid (start, end) per vocabulary token."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.proj = nn.Linear(config.hidden_size, 2 * config.vocab_size)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(visual)).view(visual.shape[0], self.vocab_size, 2)


@dataclass
class TvpAidedOutput(TvpVideoGroundingOutput):
    grounding_loss: torch.Tensor | None = None  # () the reference loss alone
    word_segment_loss: torch.Tensor | None = None  # () the aid's loss (before its weight)


class TvpForGroundingWithAids(TvpForVideoGrounding):
    """``TvpForVideoGrounding`` trained with the word-segment aid; ``loss`` = grounding + weight * word segments."""

    def __init__(self, config: TvpConfig, word_segment_weight: float):
        super().__init__(config)  # the grounding model first: the same draws as the plain model
        if word_segment_weight <= 0:
            raise ValueError(f"word_segment_weight={word_segment_weight}: the aided model needs a weight > 0")
        self.word_segment_weight = word_segment_weight
        self.word_segment_head = TvpWordSegmentHead(config)
        _init_weights(self.word_segment_head, config.initializer_range)

    def forward(
        self, input_ids: torch.Tensor, *args, word_segments: torch.Tensor | None = None,
        word_segment_mask: torch.Tensor | None = None, **kwargs,
    ) -> TvpAidedOutput:
        """As ``TvpForVideoGrounding.forward``, plus the video's ``word_segments`` (B, V, 2) and
        ``word_segment_mask`` (B, V) from ``word_segment_targets``; with labels and both, the aided loss."""
        out = super().forward(input_ids, *args, **kwargs)
        visual = out.last_hidden_state[:, NUM_TEXT_PROMPTS + input_ids.shape[1]:].mean(1)  # (B, D)
        predicted = self.word_segment_head(visual)
        fields = {k: getattr(out, k) for k in vars(out)}
        fields["grounding_loss"] = out.loss
        if out.loss is not None and word_segments is not None and word_segment_mask is not None:
            aid = word_segment_loss(predicted, word_segments, word_segment_mask)
            fields["word_segment_loss"] = aid
            fields["loss"] = out.loss + self.word_segment_weight * aid
        return TvpAidedOutput(**fields)

    def save_pretrained(self, path: str, extra_files: dict[str, bytes] | None = None) -> None:
        """The reference's folder: ``TvpForVideoGrounding``'s config and weights, without the aid's head."""
        config = {**self.config.to_dict(), "architectures": [TvpForVideoGrounding.__name__]}
        write_folder(path, config, self.grounding_state(self.state_dict()), extra_files)

    @staticmethod
    def grounding_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference model's parameters of an aided state dict (the aid's head dropped)."""
        return {k: v for k, v in state.items() if not k.startswith(WORD_SEGMENT_HEAD)}
