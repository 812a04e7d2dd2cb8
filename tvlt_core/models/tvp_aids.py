"""From-scratch aids for TVP grounding: training help that is not in the reference recipe (issue 19).

The reference fine-tunes TVP from an ImageNet ResNet and BERT. Trained from scratch, the model collapses to one
constant segment within a few dozen steps: its visual token is the mean over frames, time reaches it only through
the per-frame prompts, and before anything is learned the optimiser removes the output's dependence on the input
(README, "What it shows today"). Two aids give the model's parts jobs they can learn before the sentence is used:

word segments: a linear head on the mean of the encoder's last-layer visual tokens predicts, for every vocabulary
    token that occurs in exactly one of the video's sentences, that sentence's (start, end) as fractions of the
    duration (sigmoid outputs, L1 on those tokens only). The targets come from the video's own annotations, which
    every grounding sample already holds; no query is needed, so the visual tokens must carry *when* each described
    thing happens, which is what the sentence later selects from.

query tokens: a linear head on each query token's hidden state halfway up the encoder predicts the query's
    (start, end), for the tokens found in no other sentence of the video (L1 on those only). The grounding output
    must pick the moment the sentence names: a product of what the words say and what the frames show, which
    from scratch the model does not start to learn before it has settled on a constant segment. This aid asks
    each naming word to find its own moment first (attention between a word and the visual tokens is such a
    product), so the pooled token above only has to gather what the query's words found.

``TvpForGroundingWithAids`` is ``TvpForVideoGrounding`` plus the heads of the aids it is given. Its grounding
parameters are created first, from the same random draws, so with the same seed they start equal to the plain
model's; ``grounding_state`` drops the heads, so an export is the reference's checkpoint layout and loads into
``TvpForVideoGrounding`` (and ``transformers``) unchanged. With both aids off (weight 0) the job builds the plain
model: the reference loss, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from tvlt_core.hf_folder import write_folder
from tvlt_core.models.tvp import NUM_TEXT_PROMPTS, TvpConfig, TvpForVideoGrounding, TvpVideoGroundingOutput, _init_weights

# where the aids' parameters sit in the aided model's state dict
AID_HEADS = ("word_segment_head.", "query_token_head.")


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


def query_token_mask(input_ids: torch.Tensor, own: list[set[int]]) -> torch.Tensor:
    """(B, L) float32: 1 where ``input_ids[i, j]`` is in ``own[i]`` (query i's tokens found in no other sentence of
    its video)."""
    return torch.tensor([[float(t in ids) for t in row] for row, ids in zip(input_ids.tolist(), own)])


def segment_l1(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 over the masked rows' (start, end), in fp32: predicted and target (B, N, 2), mask (B, N).
    0 (with a gradient path) when no row is masked in."""
    err = (predicted.float() - target.float()).abs().sum(-1) * mask.float()  # (B, N)
    return err.sum() / (2 * mask.float().sum()).clamp(min=1.0)


class TvpSegmentHead(nn.Module):
    """(..., D) -> (..., K, 2) sigmoid (start, end) fractions for each of K things (vocabulary tokens, or one)."""

    def __init__(self, hidden_size: int, count: int = 1):
        super().__init__()
        self.count = count
        self.proj = nn.Linear(hidden_size, 2 * count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(x)).view(*x.shape[:-1], self.count, 2)


@dataclass
class TvpAidedOutput(TvpVideoGroundingOutput):
    grounding_loss: torch.Tensor | None = None  # () the reference loss alone
    word_segment_loss: torch.Tensor | None = None  # () each aid's loss, before its weight
    query_token_loss: torch.Tensor | None = None


class TvpForGroundingWithAids(TvpForVideoGrounding):
    """``TvpForVideoGrounding`` trained with aids: ``loss`` = grounding + the weighted loss of each aid given."""

    def __init__(self, config: TvpConfig, word_segment_weight: float = 0.0, query_token_weight: float = 0.0):
        super().__init__(config)  # the grounding model first: the same draws as the plain model
        if min(word_segment_weight, query_token_weight) < 0 or not word_segment_weight + query_token_weight > 0:
            raise ValueError(f"aid weights {word_segment_weight}, {query_token_weight}: need >= 0, one of them > 0")
        self.word_segment_weight, self.query_token_weight = word_segment_weight, query_token_weight
        if word_segment_weight:
            self.word_segment_head = TvpSegmentHead(config.hidden_size, config.vocab_size)
            _init_weights(self.word_segment_head, config.initializer_range)
        if query_token_weight:
            self.query_token_head = TvpSegmentHead(config.hidden_size)
            _init_weights(self.query_token_head, config.initializer_range)

    def forward(
        self, input_ids: torch.Tensor, *args, word_segments: torch.Tensor | None = None,
        word_segment_mask: torch.Tensor | None = None, query_token_mask: torch.Tensor | None = None, **kwargs,
    ) -> TvpAidedOutput:
        """As ``TvpForVideoGrounding.forward``, plus the targets ``TvpBatcher(aids=True)`` makes: the video's
        ``word_segments`` (B, V, 2) and ``word_segment_mask`` (B, V), and ``query_token_mask`` (B, L)."""
        asked_hidden = kwargs.pop("output_hidden_states", False)
        out = super().forward(input_ids, *args, output_hidden_states=True, **kwargs)
        fields = {k: getattr(out, k) for k in vars(out)}
        fields["hidden_states"] = out.hidden_states if asked_hidden else None
        fields["grounding_loss"] = loss = out.loss
        length = input_ids.shape[1]
        if loss is not None and self.word_segment_weight and word_segment_mask is not None:
            visual = out.last_hidden_state[:, NUM_TEXT_PROMPTS + length:].mean(1)  # (B, D)
            aid = segment_l1(self.word_segment_head(visual), word_segments, word_segment_mask)
            fields["word_segment_loss"], loss = aid, loss + self.word_segment_weight * aid
        if loss is not None and self.query_token_weight and query_token_mask is not None:
            labels = kwargs.get("labels", args[2] if len(args) > 2 else None)
            middle = out.hidden_states[len(out.hidden_states) // 2]  # after layer ceil(n / 2): halfway up
            words = middle[:, NUM_TEXT_PROMPTS:NUM_TEXT_PROMPTS + length]  # (B, L, D)
            target = (labels[:, 1:] / labels[:, :1]).float()[:, None, :].expand(-1, length, -1)
            aid = segment_l1(self.query_token_head(words)[:, :, 0], target, query_token_mask)
            fields["query_token_loss"], loss = aid, loss + self.query_token_weight * aid
        fields["loss"] = loss
        return TvpAidedOutput(**fields)

    def save_pretrained(self, path: str, state_dict: Mapping[str, torch.Tensor] | None = None,
                        extra_files: dict[str, bytes] | None = None) -> None:
        """The reference's folder: ``TvpForVideoGrounding``'s config and weights (this model's, or ``state_dict``),
        without the aids' heads."""
        config = {**self.config.to_dict(), "architectures": [TvpForVideoGrounding.__name__]}
        state = self.state_dict() if state_dict is None else state_dict
        write_folder(path, config, self.grounding_state(state), extra_files)

    @staticmethod
    def grounding_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference model's parameters of an aided state dict (the aids' heads dropped)."""
        return {k: v for k, v in state.items() if not k.startswith(AID_HEADS)}
