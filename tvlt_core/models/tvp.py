"""TVP: text-visual prompting for temporal video grounding (Zhang et al., CVPR 2023), batched, in plain PyTorch.

Given a sentence and 48 frames of a video, predict where in the video the sentence happens, as (start, end)
fractions of the video's duration. Module tree and parameter names follow ``transformers``' TVP, so
``Intel/tvp-base`` (a downloaded folder or bucket prefix) loads by name, BatchNorm buffers included.

    pixel_values (B, T, 3, S, S) --visual prompter (learned frame border)--> ResNet stage 4 (B*T, C4, S/32, S/32)
      -> 3x3 conv to D, 2x2 max-pool, ReLU -> mean over frames -> + row/col position + type -> LayerNorm  (B, V, D)
    input_ids (B, L) -> word + position + type embeddings -> LayerNorm                                    (B, L, D)
    [text_prompt (P vectors), text, visual]  (B, N, D) -> post-LN BERT encoder -> pooler(token 0) = tanh(dense)
    grounding head: Linear(D, 2D) -> ReLU -> Linear(2D, 2) -> sigmoid = (start, end) / duration

Shape legend:
    B batch            T frames (num_frames, 48)        S max_img_size (448)         C4 backbone channels (2048)
    L text tokens      P text-prompt vectors (10)       g = S/64 grid side (7)       V = g * g visual tokens (49)
    D hidden_size      N = P + L + V sequence length

Differences from the reference, all on purpose:
  * any batch size: the loss is computed per sample and averaged (the reference unpacks ``labels`` along the
    batch axis and only runs with batch 1), and nothing mixes samples, so a batch equals its samples one by one;
  * inputs are never modified in place (the reference's prompters write into ``pixel_values``);
  * the backbone's BatchNorm always uses running statistics (see ``resnet.py``).
The reference's "framepad" prompter builds its replace/remove mask as all ones, so for "framepad" the modes
"replace" and "add" are the same and "remove" leaves frames unchanged; ``Intel/tvp-base`` (framepad + replace)
was trained that way, so we keep it for numeric parity. "framedownpad" masks its bottom band as documented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tvlt_core.hf_folder import load_matching, read_folder, write_folder
from tvlt_core.models.resnet import ResNetBackbone, ResNetConfig, resnet50_config, resnet_tiny_config

log = logging.getLogger(__name__)

NUM_TEXT_PROMPTS = 10
_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}
# config.json keys of the reference that select a backbone other than the in-tree ResNet.
_FOREIGN_BACKBONE_DEFAULTS = {"backbone": None, "use_timm_backbone": False, "use_pretrained_backbone": False}


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TvpConfig:
    """Fields of the Hugging Face TVP ``config.json`` (same names, same defaults as ``Intel/tvp-base``)."""

    backbone_config: ResNetConfig = field(default_factory=resnet50_config)
    distance_loss_weight: float = 1.0
    duration_loss_weight: float = 0.1
    # Ours, not the reference's (absent from its config.json, so its defaults are the reference's loss): the floors
    # under the distance and length terms. See ``tvp_loss``.
    distance_loss_floor: float = 0.2
    duration_loss_floor: float = 0.4
    visual_prompter_type: Literal["framepad", "framedownpad"] = "framepad"
    visual_prompter_apply: Literal["add", "replace", "remove"] = "replace"
    visual_prompt_size: int = 96
    max_img_size: int = 448
    num_frames: int = 48
    vocab_size: int = 30522
    type_vocab_size: int = 2
    pad_token_id: int | None = 0
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    max_grid_col_position_embeddings: int = 100
    max_grid_row_position_embeddings: int = 100
    hidden_dropout_prob: float = 0.1
    hidden_act: Literal["gelu", "gelu_new", "relu", "silu"] = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.backbone_config, dict):
            self.backbone_config = ResNetConfig.from_dict(self.backbone_config)
        if self.visual_prompter_type not in ("framepad", "framedownpad"):
            raise ValueError(f"visual_prompter_type={self.visual_prompter_type!r}: use 'framepad' or 'framedownpad'")
        if self.visual_prompter_apply not in ("add", "replace", "remove"):
            raise ValueError(f"visual_prompter_apply={self.visual_prompter_apply!r}: use 'add', 'replace' or 'remove'")
        if not 0 < 2 * self.visual_prompt_size < self.max_img_size:
            raise ValueError(
                f"visual_prompt_size={self.visual_prompt_size}: need 0 < 2 * size < max_img_size={self.max_img_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: use one of {sorted(_ACTIVATIONS)}")

    def to_dict(self) -> dict:
        """The Hugging Face ``config.json`` layout, readable by ``transformers.TvpConfig`` as well."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["backbone_config"] = self.backbone_config.to_dict()
        out["model_type"] = "tvp"
        if self.visual_prompter_type == "framedownpad":
            out["frame_num"] = self.num_frames  # the reference's down-pad prompter reads this name
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TvpConfig:
        """Build from a ``config.json`` dict; keys we have no use for are ignored (logged at debug level)."""
        for key, default in _FOREIGN_BACKBONE_DEFAULTS.items():
            if values.get(key, default) != default:
                raise ValueError(
                    f"config {key}={values[key]!r}: only the in-tree ResNet backbone (backbone_config) is supported"
                )
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(values) - known)
        if ignored:
            log.debug("TvpConfig: ignoring keys %s", ignored)
        kwargs = {k: v for k, v in values.items() if k in known}
        if isinstance(kwargs.get("backbone_config"), dict):
            kwargs["backbone_config"] = ResNetConfig.from_dict(kwargs["backbone_config"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Helpers: the loss
# --------------------------------------------------------------------------------------------------------------------
def tvp_loss(
    logits: torch.Tensor, labels: torch.Tensor, distance_weight: float = TvpConfig.distance_loss_weight,
    duration_weight: float = TvpConfig.duration_loss_weight, distance_floor: float = TvpConfig.distance_loss_floor,
    duration_floor: float = TvpConfig.duration_loss_floor,
) -> torch.Tensor:
    """Temporal-distance IoU loss of each sample, in fp32.

    Args:
        logits: (B, 2) predicted (start, end) as fractions of the duration.
        labels: (B, 3) (duration, start, end) in seconds.
    Returns:
        (B,) ``(1 - IoU) + distance_weight * max(|mid_pred - mid_gt| / duration, distance_floor)
        + duration_weight * max(((len_pred - len_gt) / duration) ** 2, duration_floor)``; with the default floors
        (0.2, 0.4) exactly the reference's ``TvpLoss``. IoU's union is the hull ``max(ends) - min(starts)`` (the true
        union whenever the segments overlap).

    The reference's floors stop the gradient of the distance term once the midpoints are within a fifth of the
    duration, and of the length term unless the lengths differ by more than 63% of it; with no overlap the IoU term
    has none either. A model trained from scratch whose start passes its end then gets no gradient at all and stays
    there (fine-tuning a pretrained model rarely starts there). Floors of 0 keep a gradient everywhere.
    """
    if labels.dim() != 2 or labels.shape[-1] != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (B, 3) = (duration, start, end), got {tuple(labels.shape)} for B={logits.shape[0]}"
        )
    duration, start, end = labels.float().unbind(-1)
    pred_start, pred_end = (logits.float() * duration[:, None]).unbind(-1)
    inter = torch.minimum(pred_end, end) - torch.maximum(pred_start, start)
    hull = torch.maximum(pred_end, end) - torch.minimum(pred_start, start)
    iou_term = 1 - inter.clamp(min=0) / hull
    distance = ((pred_start + pred_end) / 2 - (start + end) / 2).abs().div(duration).clamp(min=distance_floor)
    length = ((pred_end - pred_start) - (end - start)).div(duration).square().clamp(min=duration_floor)
    return iou_term + distance_weight * distance + duration_weight * length


# --------------------------------------------------------------------------------------------------------------------
# Submodules: visual prompts, vision tower, embeddings
# --------------------------------------------------------------------------------------------------------------------
class TvpFramePadPrompter(nn.Module):
    """Learned border of width ``visual_prompt_size`` on every frame: (B, T, 3, S, S) -> same shape."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        t, s, p = config.num_frames, config.max_img_size, config.visual_prompt_size
        self.max_img_size, self.apply_mode = s, config.visual_prompter_apply
        self.pad_up = nn.Parameter(torch.randn(1, t, 3, p, s))
        self.pad_down = nn.Parameter(torch.randn(1, t, 3, p, s))
        self.pad_left = nn.Parameter(torch.randn(1, t, 3, s - 2 * p, p))
        self.pad_right = nn.Parameter(torch.randn(1, t, 3, s - 2 * p, p))

    def prompt(self) -> torch.Tensor:
        """(1, T, 3, S, S): the border, zeros inside."""
        inner = self.max_img_size - 2 * self.pad_left.shape[-1]
        zeros = self.pad_left.new_zeros(*self.pad_left.shape[:3], inner, inner)
        middle = torch.cat([self.pad_left, zeros, self.pad_right], dim=4)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=3)

    def forward(self, pixel_values: torch.Tensor, interpolate_pad_encoding: bool = False) -> torch.Tensor:
        if self.apply_mode == "remove":  # the reference's mask is all ones: nothing is removed
            return pixel_values
        prompt = self.prompt()
        if interpolate_pad_encoding:
            prompt = _resize_prompt(prompt, pixel_values.shape[-2:], self.max_img_size)
        return pixel_values + prompt.to(pixel_values.dtype)


class TvpFrameDownPadPrompter(nn.Module):
    """Learned band of height ``visual_prompt_size`` at the bottom of every frame: (B, T, 3, S, S) -> same shape."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        t, s, p = config.num_frames, config.max_img_size, config.visual_prompt_size
        self.max_img_size, self.visual_prompt_size, self.apply_mode = s, p, config.visual_prompter_apply
        self.pad_down = nn.Parameter(torch.randn(1, t, 3, p, s))

    def forward(self, pixel_values: torch.Tensor, interpolate_pad_encoding: bool = False) -> torch.Tensor:
        if interpolate_pad_encoding:
            raise ValueError("interpolate_pos_encoding is only supported with visual_prompter_type='framepad'")
        band = self.max_img_size - self.visual_prompt_size
        if self.apply_mode != "add":  # replace / remove: zero the band first
            keep = torch.ones(self.max_img_size, 1, dtype=pixel_values.dtype, device=pixel_values.device)
            keep[band:] = 0
            pixel_values = pixel_values * keep
        if self.apply_mode != "remove":
            pixel_values = pixel_values + F.pad(self.pad_down, (0, 0, band, 0)).to(pixel_values.dtype)
        return pixel_values


def _resize_prompt(prompt: torch.Tensor, size: torch.Size, max_img_size: int) -> torch.Tensor:
    """Bicubic resize of a (1, T, 3, S, S) prompt to frames of ``size`` (H, W), as the reference's scale factors."""
    _, t, c, s, _ = prompt.shape
    scale = (size[0] / max_img_size, size[1] / max_img_size)
    resized = F.interpolate(prompt.reshape(t, c, s, s), scale_factor=scale, mode="bicubic", align_corners=False)
    return resized.reshape(1, t, c, *resized.shape[-2:])


class TvpVisionModel(nn.Module):
    """Per-frame ResNet stage-4 features projected to D: (B, T, 3, S, S) -> (B, T, g, g, D)."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.backbone = ResNetBackbone(config.backbone_config)
        self.grid_encoder_conv = nn.Conv2d(self.backbone.out_channels, config.hidden_size, 3, padding=1, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t = pixel_values.shape[:2]
        grid = self.backbone(pixel_values.flatten(0, 1))  # (B*T, C4, S/32, S/32)
        grid = F.relu(F.max_pool2d(self.grid_encoder_conv(grid), kernel_size=2, stride=2))  # (B*T, D, g, g)
        return grid.unflatten(0, (b, t)).permute(0, 1, 3, 4, 2)


class TvpVisualInputEmbedding(nn.Module):
    """Frame-averaged grid + 2-D position + type embedding, LayerNorm: (B, T, g, g, D) -> (B, V, D)."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        d = config.hidden_size
        # In the checkpoints but never used; frozen so data-parallel wrappers do not wait for its gradient.
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d).requires_grad_(False)
        self.row_position_embeddings = nn.Embedding(config.max_grid_row_position_embeddings, d)
        self.col_position_embeddings = nn.Embedding(config.max_grid_col_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(1, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_grid(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        """(1, g_h, g_w, D) row + column embeddings; grids larger than the tables need ``interpolate``."""
        max_rows, max_cols = self.row_position_embeddings.num_embeddings, self.col_position_embeddings.num_embeddings
        if (height > max_rows or width > max_cols) and not interpolate:
            raise ValueError(
                f"visual grid {height}x{width} exceeds the position tables ({max_rows}x{max_cols}); "
                "pass interpolate_pos_encoding=True"
            )
        rows = self.row_position_embeddings.weight[: min(height, max_rows)]
        cols = self.col_position_embeddings.weight[: min(width, max_cols)]
        grid = (rows[:, None, :] + cols[None, :, :])[None]
        if height > max_rows or width > max_cols:
            scale = (max(height / max_rows, 1.0), max(width / max_cols, 1.0))
            grid = F.interpolate(grid.permute(0, 3, 1, 2), scale_factor=scale, mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1)
        return grid

    def forward(self, grid: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        b, _, h, w, d = grid.shape
        grid = grid.mean(1) + self.position_grid(h, w, interpolate_pos_encoding)
        tokens = grid.reshape(b, h * w, d) + self.token_type_embeddings.weight[0]
        return self.dropout(self.layer_norm(tokens))


class TvpTextInputEmbeddings(nn.Module):
    """BERT embeddings (word + position + type 0), LayerNorm: input_ids (B, L) -> (B, L, D)."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"{length} text tokens exceed max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:length]
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.layer_norm(x))


# --------------------------------------------------------------------------------------------------------------------
# Submodules: the post-LN BERT encoder, pooler, grounding head
# --------------------------------------------------------------------------------------------------------------------
class TvpAttention(nn.Module):
    """Self-attention with the residual and post-LayerNorm inside (the reference's layout): (B, N, D) -> (B, N, D)."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.dense = nn.Linear(d, d)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_mask`` (B, 1, 1, N) bool, True where a token may be attended to. Returns output and (B, H, N, N)
        attention probabilities. Explicit softmax rather than SDPA: N is ~100 tokens, the ResNet dominates the cost,
        and the probabilities can be returned."""
        b, n, _ = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1)
        context = (self.attn_dropout(probs) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.layer_norm(self.dropout(self.dense(context)) + x), probs


class TvpIntermediate(nn.Module):
    def __init__(self, config: TvpConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TvpOutputLayer(nn.Module):
    def __init__(self, config: TvpConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.dense(x)) + residual)


class TvpEncodeLayer(nn.Module):
    def __init__(self, config: TvpConfig):
        super().__init__()
        self.attention = TvpAttention(config)
        self.intermediate = TvpIntermediate(config)
        self.output = TvpOutputLayer(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, probs = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x), probs


class TvpEncoder(nn.Module):
    def __init__(self, config: TvpConfig):
        super().__init__()
        self.layer = nn.ModuleList(TvpEncodeLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Returns the last hidden state, the L+1 hidden states (input first), and the per-layer probabilities."""
        hidden_states, attentions = [x], []
        for layer in self.layer:
            x, probs = layer(x, key_mask)
            hidden_states.append(x)
            attentions.append(probs)
        return x, tuple(hidden_states), tuple(attentions)


class TvpPooler(nn.Module):
    """tanh(dense(token 0)); token 0 is the first text-prompt vector. (B, N, D) -> (B, D)."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class TvpVideoGroundingHead(nn.Module):
    """(B, D) -> (B, 2) sigmoid (start, end) as fractions of the duration."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.layer_0 = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.layer_1 = nn.Linear(2 * config.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layer_1(F.relu(self.layer_0(pooled))))


# --------------------------------------------------------------------------------------------------------------------
# Outputs and checkpoint I/O shared by both models
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TvpModelOutput:
    last_hidden_state: torch.Tensor  # (B, N, D)
    pooler_output: torch.Tensor  # (B, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # layers + 1 of (B, N, D), when asked for
    attentions: tuple[torch.Tensor, ...] | None = None  # layers of (B, H, N, N), when asked for


@dataclass
class TvpVideoGroundingOutput(TvpModelOutput):
    logits: torch.Tensor | None = None  # (B, 2) start, end / duration
    loss: torch.Tensor | None = None  # () mean over samples of tvp_loss, when labels are given


def _init_weights(module: nn.Module, std: float) -> None:
    """The reference's initialisation: N(0, std) linears and embeddings, zero biases, unit LayerNorms,
    Kaiming convs, N(0, 1) text and frame prompts (BatchNorm is reset by the backbone itself)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] in ("text_prompt", "pad_up", "pad_down", "pad_left", "pad_right"):
            nn.init.normal_(param)


class _TvpPretrained(nn.Module):
    """``from_pretrained`` / ``save_pretrained`` in the Hugging Face folder layout (local or fsspec URL)."""

    prefix = ""  # where the bare TvpModel's parameters sit in this module's state dict

    @classmethod
    def from_pretrained(cls, path: str, *, strict: bool = True):
        """Load a checkpoint folder written by us or by ``transformers`` (``TvpModel`` or ``TvpForVideoGrounding``).

        A grounding checkpoint loads into ``TvpModel`` without its head; a bare ``TvpModel`` checkpoint loads into
        ``TvpForVideoGrounding`` with a freshly initialised head (logged). BatchNorm ``num_batches_tracked``
        counters, which some exports drop, are taken from the new model when missing.
        """
        config_dict, state = read_folder(path)
        model = cls(TvpConfig.from_dict(config_dict))
        own = model.state_dict()
        has_prefix = any(k.startswith("model.") for k in state)
        if cls.prefix and not has_prefix:
            state = {cls.prefix + k: v for k, v in state.items()}
            head = {k: v for k, v in own.items() if not k.startswith(cls.prefix)}
            log.warning("%s: bare TvpModel checkpoint, grounding head newly initialised (%s)", path, sorted(head))
            state.update(head)
        elif not cls.prefix and has_prefix:
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        for key, value in own.items():
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, value)
        load_matching(model, state, strict=strict)
        log.info("loaded %s from %s", cls.__name__, path)
        return model

    def save_pretrained(self, path: str, state_dict: Mapping[str, torch.Tensor] | None = None,
                        extra_files: dict[str, bytes] | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors``: this model's weights, or ``state_dict`` (a training run's,
        gathered from its ranks), + ``extra_files`` (e.g. the tokenizer's vocab)."""
        config = {**self.config.to_dict(), "architectures": [type(self).__name__]}
        write_folder(path, config, self.state_dict() if state_dict is None else state_dict, extra_files)


# --------------------------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------------------------
class TvpModel(_TvpPretrained):
    """Text prompt + text + prompted video through the cross-modal encoder."""

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.config = config
        self.vision_model = TvpVisionModel(config)
        self.embeddings = TvpTextInputEmbeddings(config)
        self.visual_embeddings = TvpVisualInputEmbedding(config)
        self.encoder = TvpEncoder(config)
        self.pooler = TvpPooler(config)
        self.text_prompt = nn.Parameter(torch.randn(1, NUM_TEXT_PROMPTS, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        prompter = TvpFramePadPrompter if config.visual_prompter_type == "framepad" else TvpFrameDownPadPrompter
        self.visual_prompter = prompter(config)
        _init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> TvpModelOutput:
        """
        Args:
            input_ids: (B, L) token ids ([CLS] ... [SEP] [PAD]...).
            pixel_values: (B, T, 3, S, S) frames normalised to [-1, 1], BGR (see ``tvlt_core.video``).
            attention_mask: (B, L) 1 for real tokens, 0 for padding; prompts and visual tokens are always attended.
                Without it every token is attended, padding included (as the reference does).
            interpolate_pos_encoding: resize the frame prompt and the grid positions to frames that are not S x S.
        Returns:
            ``TvpModelOutput`` with last_hidden_state (B, P + L + V, D) and pooler_output (B, D).
        """
        self._check_pixels(pixel_values, interpolate_pos_encoding)
        prompted = self.visual_prompter(pixel_values, interpolate_pad_encoding=interpolate_pos_encoding)
        visual = self.visual_embeddings(self.vision_model(prompted), interpolate_pos_encoding)  # (B, V, D)
        text = self.embeddings(input_ids)  # (B, L, D)
        b = text.shape[0]
        x = torch.cat([self.text_prompt.expand(b, -1, -1), text, visual], dim=1)  # (B, N, D)
        key_mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones
            full = torch.cat([ones(b, NUM_TEXT_PROMPTS), attention_mask, ones(b, visual.shape[1])], dim=1)
            key_mask = full.bool()[:, None, None, :]
        last, hidden_states, attentions = self.encoder(x, key_mask)
        pooled = self.pooler(last)
        return TvpModelOutput(
            last_hidden_state=self.dropout(last),
            pooler_output=self.dropout(pooled),
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )

    def _check_pixels(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        c = self.config
        expected = (c.num_frames, 3) + (() if interpolate else (c.max_img_size, c.max_img_size))
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1 : 1 + len(expected)]) != expected:
            raise ValueError(
                f"pixel_values must be (B, {c.num_frames}, 3, {c.max_img_size}, {c.max_img_size}) "
                f"(or any H, W with interpolate_pos_encoding=True), got {tuple(pixel_values.shape)}"
            )


class TvpForVideoGrounding(_TvpPretrained):
    """``TvpModel`` + grounding head; with ``labels`` also the loss, averaged over samples."""

    prefix = "model."

    def __init__(self, config: TvpConfig):
        super().__init__()
        self.config = config
        self.model = TvpModel(config)
        self.video_grounding_head = TvpVideoGroundingHead(config)
        _init_weights(self.video_grounding_head, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> TvpVideoGroundingOutput:
        """Arguments as ``TvpModel.forward``, plus ``labels`` (B, 3) = (duration, start, end) in seconds.

        Returns ``TvpVideoGroundingOutput``: logits (B, 2) = (start, end) / duration, loss () when labels are given,
        and the encoder outputs.
        """
        out = self.model(
            input_ids, pixel_values, attention_mask, output_attentions, output_hidden_states, interpolate_pos_encoding
        )
        logits = self.video_grounding_head(out.pooler_output)
        loss = None
        if labels is not None:
            c = self.config
            loss = tvp_loss(
                logits, labels, c.distance_loss_weight, c.duration_loss_weight, c.distance_loss_floor, c.duration_loss_floor
            ).mean()
        return TvpVideoGroundingOutput(**vars(out), logits=logits, loss=loss)


# --------------------------------------------------------------------------------------------------------------------
# Size presets
# --------------------------------------------------------------------------------------------------------------------
def tvp_base_config(**overrides) -> TvpConfig:
    """``Intel/tvp-base``: ResNet-50, 12 x 768 BERT, 48 frames of 448 x 448, 96-pixel frame pad."""
    return TvpConfig(**overrides)


def tvp_tiny_config(**overrides) -> TvpConfig:
    """A tiny ResNet, 4 frames of 128 x 128 (2 x 2 visual tokens), 2 x 64 encoder: a CPU step in well under a second."""
    values = dict(
        backbone_config=resnet_tiny_config(), visual_prompt_size=16, max_img_size=128, num_frames=4, vocab_size=1000,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
        max_grid_col_position_embeddings=16, max_grid_row_position_embeddings=16,
    )
    return TvpConfig(**{**values, **overrides})


TVP_PRESETS = {"tiny": tvp_tiny_config, "base": tvp_base_config}
