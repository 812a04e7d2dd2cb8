"""TVLT: Textless Vision-Language Transformer (Tang et al., 2022), encoder, MAE + matching pretraining, classifier.

Reads top-down: config, helpers (masking noise, random masking, patchify, loss), submodules, the three models,
size presets. Parameter names are Hugging Face's (``ZinengTang/tvlt-base`` loads with no missing or unexpected
keys); the numerics are the reference's, tested against ``transformers`` 4.57 in fp32.

Shapes:
    B  batch                      T  frames (<= num_frames)           C  image channels (3)
    H  image size (224)           P  image patch (16)                 Np pixel patches = T * (H / P)^2
    A  spectrogram frames         F  frequency patches (128 / 16 = 8) Na audio patches = A / 16 * F
    D  hidden size (768)          Dd decoder hidden size (512)        S  sequence = 1 + Np + Na (cls first)

    pixel_values (B, T, C, H, H) in [-1, 1]       pixel_mask (B, Np), 1 = real patch, 0 = padded frame
    audio_values (B, 1, A, 128), A % 16 == 0      audio_mask (B, Na), 1 = real patch, 0 = padding
    Sequence: [cls, pixel patches (frame, row, col), audio patches (time-major, t * F + f)]

Where we differ from the reference, on purpose:
    - attention is ``scaled_dot_product_attention``; where only the cls token is read (matching, classification)
      the last layer computes only its row;
    - the cls token is always a valid attention key (the reference takes its mask from the first *kept* pixel
      patch, so under MAE masking cls is hidden whenever that patch comes from a padded frame);
    - ``audio_mask_type="patch-level"``, ``task_matching=False`` and MAE losses with no removed patch work
      (the reference raises, crashes, or returns NaN);
    - no ``output_attentions`` / ``output_hidden_states`` / head pruning (SDPA never materialises the weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tvlt_core.hf_folder import load_matching, read_folder, write_folder

log = logging.getLogger(__name__)

AudioMaskType = Literal["frame-level", "patch-level"]


@dataclass
class TvltConfig:
    """Field names and defaults are those of Hugging Face's ``TvltConfig`` (the base model), so a downloaded
    ``config.json`` reads directly."""

    image_size: int = 224
    spectrogram_length: int = 2048
    frequency_length: int = 128
    image_patch_size: list[int] = field(default_factory=lambda: [16, 16])
    audio_patch_size: list[int] = field(default_factory=lambda: [16, 16])
    num_image_channels: int = 3
    num_audio_channels: int = 1
    num_frames: int = 8
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: Literal["gelu"] = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_mean_pooling: bool = False
    decoder_num_attention_heads: int = 16
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_intermediate_size: int = 2048
    pixel_mask_ratio: float = 0.75
    audio_mask_ratio: float = 0.15
    audio_mask_type: AudioMaskType = "frame-level"
    task_matching: bool = True
    task_mae: bool = True
    loss_type: Literal["classification", "regression"] = "classification"
    num_labels: int = 2  # Hugging Face stores this as id2label

    def __post_init__(self):
        if self.audio_mask_type == "patch_level":  # the spelling Hugging Face's config validator accepts
            self.audio_mask_type = "patch-level"
        if self.audio_mask_type not in ("frame-level", "patch-level"):
            raise ValueError(f"audio_mask_type must be 'frame-level' or 'patch-level', got {self.audio_mask_type!r}")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act: only 'gelu' (exact, as trained) is supported, got {self.hidden_act!r}")
        if self.loss_type not in ("classification", "regression"):
            raise ValueError(f"loss_type must be 'classification' or 'regression', got {self.loss_type!r}")
        self.image_patch_size, self.audio_patch_size = list(self.image_patch_size), list(self.audio_patch_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} does not divide {self.hidden_size}")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(f"decoder_num_attention_heads={self.decoder_num_attention_heads} does not divide "
                             f"{self.decoder_hidden_size}")
        if self.image_size % self.image_patch_size[0] or self.image_patch_size[0] != self.image_patch_size[1]:
            raise ValueError(f"image_patch_size {self.image_patch_size} must be square and divide {self.image_size}")
        if self.frequency_length % self.audio_patch_size[1] or self.spectrogram_length % self.audio_patch_size[0]:
            raise ValueError(f"audio_patch_size {self.audio_patch_size} must divide the spectrogram size")

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.image_patch_size[0]) ** 2

    @property
    def freq_patches(self) -> int:
        return self.frequency_length // self.audio_patch_size[1]

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> TvltConfig:
        """Build from a Hugging Face ``config.json`` dict; keys we do not use are logged at debug level."""
        values = {**values, **overrides}
        if "id2label" in values and "num_labels" not in overrides:
            values["num_labels"] = len(values["id2label"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            log.debug("TvltConfig: ignoring keys %s", unknown)
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_hf_dict(self, architecture: str) -> dict:
        """A ``config.json`` dict that ``transformers``' TvltConfig reads back to the same model."""
        values = dataclasses.asdict(self)
        num_labels = values.pop("num_labels")
        if values["audio_mask_type"] == "patch-level":
            values["audio_mask_type"] = "patch_level"
        values["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        values["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return {"model_type": "tvlt", "architectures": [architecture], **values}


# --------------------------------------------------------------------------------------------------- helpers


def make_pixel_mask_noise(batch_size: int, num_patches: int, *, generator=None, device=None) -> torch.Tensor:
    """(B, Np) uniform noise; the patches with the smallest noise are kept."""
    return torch.rand(batch_size, num_patches, generator=generator, device=device)


def make_audio_mask_noise(
    batch_size: int, num_patches: int, num_freq_patches: int, mask_type: AudioMaskType, *, generator=None, device=None
) -> torch.Tensor:
    """(B, Na) noise; "frame-level" gives all F patches of a time step the same value, so whole steps go together."""
    if mask_type == "patch-level":
        return torch.rand(batch_size, num_patches, generator=generator, device=device)
    steps = torch.rand(batch_size, num_patches // num_freq_patches, generator=generator, device=device)
    return steps.repeat_interleave(num_freq_patches, dim=1)


def random_masking(tokens: torch.Tensor, noise: torch.Tensor, len_keep: int, attention_mask: torch.Tensor | None):
    """Keep the ``len_keep`` tokens with the smallest noise (MAE's per-sample shuffle).

    Args: tokens (B, L, D), noise (B, L), attention_mask (B, L) or None.
    Returns: kept (B, len_keep, D), kept attention mask (B, len_keep) or None,
        label_mask (B, L) float (1 = removed and not padding), ids_restore (B, L) (kept-then-removed -> original).
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # the reference's (unstable) sort: ties break the same way
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    label_mask = (ids_restore >= len_keep).to(torch.float32)
    if attention_mask is not None:
        label_mask = label_mask * attention_mask
        attention_mask = torch.gather(attention_mask, 1, ids_keep)
    return kept, attention_mask, label_mask, ids_restore


def unshuffle_with_mask_tokens(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor):
    """(B, len_keep, Dd) kept tokens + mask tokens for the removed ones -> (B, L, Dd) in the original order."""
    batch, kept_len, dim = kept.shape
    filler = mask_token.to(kept.dtype).expand(batch, ids_restore.shape[1] - kept_len, dim)
    full = torch.cat([kept, filler], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))


def patchify_pixels(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T * H/P * W/P, P * P * C), each patch flattened (row, col, channel)."""
    b, t, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, t, c, h // patch, patch, w // patch, patch)
    return torch.einsum("ntchpwq->nthwpqc", x).reshape(b, t * (h // patch) * (w // patch), patch * patch * c)


def patchify_audio(audio_values: torch.Tensor, patch: list[int]) -> torch.Tensor:
    """(B, 1, A, 128) -> (B, A/p0 * 128/p1, p0 * p1), time-major, each patch flattened (time, freq)."""
    b, c, a, f = audio_values.shape
    x = audio_values.reshape(b, c, a // patch[0], patch[0], f // patch[1], patch[1])
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (a // patch[0]) * (f // patch[1]), patch[0] * patch[1] * c)


def masked_mse(predictions: torch.Tensor, targets: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over patches with label_mask 1 (removed, not padding), in fp32.
    0 when no patch qualifies (the reference divides by zero there)."""
    per_patch = (predictions.float() - targets.float()).square().mean(dim=-1)
    return (per_patch * label_mask).sum() / label_mask.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ submodules


def _named(**children: nn.Module) -> nn.Module:
    """An empty module holding ``children`` under the reference's attribute names, i.e. its parameter paths
    (``matching_head.pooler.dense``, ``attention.output.dense``, ...), without a class per level."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


def frame_position(within: torch.Tensor, across: torch.Tensor, type_embed: torch.Tensor, steps: int) -> torch.Tensor:
    """(1, steps * K, D) = within (1, K, D) tiled per step + across[:, :steps] (1, steps, D) per step + type.
    Pixels: K patches of a frame, per frame. Audio: K frequency patches, per time step."""
    k = within.shape[1]
    pos = within.unsqueeze(1) + across[:, :steps].unsqueeze(2) + type_embed.unsqueeze(1)  # (1, steps, K, D)
    return pos.reshape(1, steps * k, within.shape[-1])


class _PatchEmbeddings(nn.Module):
    """A non-overlapping patch projection (``patch_embeddings.projection``, the checkpoints' name)."""

    def __init__(self, channels: int, hidden: int, patch: int | tuple[int, int]):
        super().__init__()
        self.patch_embeddings = _named(projection=nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch))

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D, H/P, W/P), in the projection's dtype."""
        conv = self.patch_embeddings.projection
        return conv(images.to(conv.weight.dtype))


class TvltPixelEmbeddings(_PatchEmbeddings):
    """Patch embedding + spatial position (repeated per frame) + temporal (per frame) + modality type."""

    def __init__(self, config: TvltConfig):
        d = config.hidden_size
        super().__init__(config.num_image_channels, d, config.image_patch_size)
        self.type_embed_v = nn.Parameter(torch.zeros(1, 1, d))
        self.temporal_embed = nn.Parameter(torch.zeros(1, config.num_frames, d))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, config.patches_per_frame, d))
        self.image_size, self.num_frames = config.image_size, config.num_frames

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, Np, D)."""
        b, t, _, h, w = pixel_values.shape
        if t > self.num_frames or h != self.image_size or w != self.image_size:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)}: the model takes up to {self.num_frames} frames of "
                f"{self.image_size} x {self.image_size}"
            )
        x = self.project(pixel_values.flatten(0, 1))  # (B*T, D, H/P, W/P)
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])
        return x + frame_position(self.pos_embed_v, self.temporal_embed, self.type_embed_v, t)


class TvltAudioEmbeddings(_PatchEmbeddings):
    """Patch embedding + frequency (repeated per time step) + time position (per step) + modality type."""

    def __init__(self, config: TvltConfig):
        d, p = config.hidden_size, config.audio_patch_size
        super().__init__(config.num_audio_channels, d, p)
        self.type_embed_a = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, config.spectrogram_length // p[0], d))
        self.freq_embed = nn.Parameter(torch.zeros(1, config.freq_patches, d))

    def forward(self, audio_values: torch.Tensor) -> torch.Tensor:
        """(B, 1, A, 128) -> (B, Na, D), time-major."""
        x = self.project(audio_values).flatten(2).transpose(1, 2)  # (B, A/16 * F, D)
        steps = x.shape[1] // self.freq_embed.shape[1]
        if steps > self.pos_embed_a.shape[1]:
            raise ValueError(f"audio of {steps} time patches is longer than spectrogram_length allows")
        return x + frame_position(self.freq_embed, self.pos_embed_a, self.type_embed_a, steps)


class TvltSelfAttention(nn.Module):
    """q/k/v projections, then ``scaled_dot_product_attention`` (flash/memory-efficient kernels: the (S, S)
    weights are never stored). The three Linear modules are called, not fused by reading their weights: that
    would be a little faster but breaks ZeRO-3, which gathers a module's parameters only when it is called."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.key = nn.Linear(hidden, hidden, bias=qkv_bias)
        self.value = nn.Linear(hidden, hidden, bias=qkv_bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, num_queries: int | None) -> torch.Tensor:
        """x (B, S, D), key_mask (B, S) bool (True = attend) or None -> (B, S', D), S' = num_queries or S; with
        ``num_queries`` only the first tokens ask (they still attend to all S)."""
        b, s, d = x.shape
        q = self.query(x if num_queries is None else x[:, :num_queries])
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, self.key(x), self.value(x)))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(b, q.shape[2], d)


class TvltLayer(nn.Module):
    """Pre-LN ViT block: x + Attn(LN(x)), then h + MLP(LN(h)) with exact GELU."""

    def __init__(self, hidden: int, heads: int, intermediate: int, config: TvltConfig):
        super().__init__()
        self.attention = _named(
            attention=TvltSelfAttention(hidden, heads, config.qkv_bias, config.attention_probs_dropout_prob),
            output=_named(dense=nn.Linear(hidden, hidden)),
        )
        self.intermediate = _named(dense=nn.Linear(hidden, intermediate))
        self.output = _named(dense=nn.Linear(intermediate, hidden))
        self.layernorm_before = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, num_queries: int | None = None):
        """(B, S, D) -> (B, S, D), or only the first ``num_queries`` tokens updated: (B, num_queries, D)."""
        attended = self.attention.attention(self.layernorm_before(x), key_mask, num_queries)
        x = x if num_queries is None else x[:, :num_queries]
        x = x + F.dropout(self.attention.output.dense(attended), self.dropout, self.training)
        hidden = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + F.dropout(self.output.dense(hidden), self.dropout, self.training)


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class TvltModelOutput:
    last_hidden_state: torch.Tensor  # (B, S', D), S' = 1 + kept pixel + kept audio patches
    last_pixel_hidden_state: torch.Tensor | None  # (B, kept pixel patches, D)
    last_audio_hidden_state: torch.Tensor | None  # (B, kept audio patches, D)
    pixel_label_masks: torch.Tensor | None = None  # (B, Np) 1 = removed and real, when pixels are masked
    audio_label_masks: torch.Tensor | None = None  # (B, Na)
    pixel_ids_restore: torch.Tensor | None = None  # (B, Np)
    audio_ids_restore: torch.Tensor | None = None  # (B, Na)


@dataclass
class TvltForPreTrainingOutput:
    loss: torch.Tensor | None = None  # () matching BCE + pixel MSE + audio MSE, the terms that ran
    matching_logits: torch.Tensor | None = None  # (B, 1)
    pixel_logits: torch.Tensor | None = None  # (B, Np, P * P * C)
    audio_logits: torch.Tensor | None = None  # (B, Na, 16 * 16)
    matching_loss: torch.Tensor | None = None  # the terms of ``loss``, for logging
    pixel_loss: torch.Tensor | None = None
    audio_loss: torch.Tensor | None = None
    pixel_label_masks: torch.Tensor | None = None  # (B, Np) the patches the pixel loss averages over
    audio_label_masks: torch.Tensor | None = None  # (B, Na)


@dataclass
class TvltClassifierOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels)


class TvltPreTrainedModel(nn.Module):
    """Initialisation and Hugging Face checkpoint folders (local or fsspec URL) for the TVLT models."""

    base_model_prefix = "tvlt"

    def __init__(self, config: TvltConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """Linear/conv ~ N(0, initializer_range), LayerNorm (1, 0) like the reference; the free embeddings and
        tokens also ~ N(0, initializer_range), as the original TVLT code does (Hugging Face leaves them at 0)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            else:
                for param in module.parameters(recurse=False):  # position/type embeddings, cls and mask tokens
                    nn.init.normal_(param, std=std)

    @classmethod
    def from_pretrained(cls, path: str, *, strict: bool = True, **config_overrides):
        """Load a Hugging Face checkpoint folder (``config.json`` + safetensors or ``pytorch_model.bin``).

        Checkpoints of the other TVLT classes load too: the ``tvlt.`` prefix is added or stripped, and with
        ``strict=False`` heads missing from the checkpoint keep their fresh initialisation (logged).
        """
        values, state = read_folder(path)
        model = cls(TvltConfig.from_dict(values, **config_overrides))
        prefix = cls.base_model_prefix + "."
        ours_prefixed, theirs_prefixed = cls is not TvltModel, any(k.startswith(prefix) for k in state)
        if theirs_prefixed and not ours_prefixed:  # the encoder out of a pretraining/classifier checkpoint
            heads = [k for k in state if not k.startswith(prefix)]
            log.info("%s: leaving out %d head tensors of %s", cls.__name__, len(heads), path)
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        elif ours_prefixed and not theirs_prefixed:  # a bare TvltModel checkpoint under a head model
            state = {prefix + k: v for k, v in state.items()}
        load_matching(model, state, strict=strict)
        log.info("loaded %s from %s", cls.__name__, path)
        return model

    def save_pretrained(self, path: str, state_dict: Mapping[str, torch.Tensor] | None = None,
                        extra_files: dict[str, bytes] | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers``' TVLT classes load by name: this
        model's weights, or ``state_dict`` (a training run's, gathered from its ranks), + ``extra_files``."""
        state = self.state_dict() if state_dict is None else state_dict
        write_folder(path, self.config.to_hf_dict(type(self).__name__), state, extra_files)


class TvltModel(TvltPreTrainedModel):
    """The encoder: embeddings, optional MAE masking, pre-LN transformer, final LayerNorm over the sequence."""

    def __init__(self, config: TvltConfig):
        super().__init__(config)
        c = config
        self.pixel_embeddings = TvltPixelEmbeddings(c)
        self.audio_embeddings = TvltAudioEmbeddings(c)
        layers = [
            TvltLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c) for _ in range(c.num_hidden_layers)
        ]
        self.encoder = _named(layer=nn.ModuleList(layers))
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.layernorm = None if c.use_mean_pooling else nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.init_weights()

    def embed(self, pixel_values, audio_values, pixel_mask, audio_mask, pixel_mask_noise=None, audio_mask_noise=None):
        """Embed both modalities and, where noise (B, Np) / (B, Na) is given, keep only the unmasked patches.

        Returns tokens (B, S', D) = [cls, kept pixel patches, kept audio patches], key_mask (B, S') bool or None
        (only when both padding masks are given, as in the reference), and for pixels and audio each
        (label_mask (B, N), ids_restore (B, N)) or None when not masked.
        """
        c = self.config
        pixels, audio = self.pixel_embeddings(pixel_values), self.audio_embeddings(audio_values)
        pixel_masking = audio_masking = None
        if pixel_mask_noise is not None:
            keep = int(pixels.shape[1] * (1 - c.pixel_mask_ratio))  # the reference's rounding
            pixels, pixel_mask, *pixel_masking = random_masking(pixels, pixel_mask_noise, keep, pixel_mask)
        if audio_mask_noise is not None:
            keep = int(audio.shape[1] * (1 - c.audio_mask_ratio))
            audio, audio_mask, *audio_masking = random_masking(audio, audio_mask_noise, keep, audio_mask)
        b = pixels.shape[0]
        key_mask = None
        if pixel_mask is not None and audio_mask is not None:
            cls_mask = torch.ones(b, 1, dtype=torch.bool, device=pixels.device)  # cls is never padding
            key_mask = torch.cat([cls_mask, pixel_mask.bool(), audio_mask.bool()], dim=1)
        tokens = torch.cat([self.cls_embedding.to(pixels.dtype).expand(b, -1, -1), pixels, audio], dim=1)
        return tokens, key_mask, pixel_masking, audio_masking

    def forward(
        self,
        pixel_values: torch.Tensor,
        audio_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        mask_pixel: bool = False,
        mask_audio: bool = False,
        pixel_mask_noise: torch.Tensor | None = None,
        audio_mask_noise: torch.Tensor | None = None,
        cls_only: bool = False,
    ) -> TvltModelOutput:
        """Encode a batch. ``mask_pixel`` / ``mask_audio`` draw masking noise from the global RNG; passing the
        noise instead masks reproducibly.

        ``cls_only``: the last layer updates only the cls token (its keys and values still cover every token),
        which saves most of that layer; ``last_hidden_state`` is then (B, 1, D), all the matching and
        classification heads read, and the pixel/audio states are None.
        """
        c, b, device = self.config, pixel_values.shape[0], pixel_values.device
        if mask_pixel and pixel_mask_noise is None:
            pixel_mask_noise = make_pixel_mask_noise(b, pixel_values.shape[1] * c.patches_per_frame, device=device)
        if mask_audio and audio_mask_noise is None:
            n_audio = audio_values.shape[2] // c.audio_patch_size[0] * c.freq_patches
            audio_mask_noise = make_audio_mask_noise(b, n_audio, c.freq_patches, c.audio_mask_type, device=device)
        tokens, key_mask, pixel_masking, audio_masking = self.embed(
            pixel_values, audio_values, pixel_mask, audio_mask, pixel_mask_noise, audio_mask_noise
        )
        *layers, last = self.encoder.layer
        for layer in layers:
            tokens = layer(tokens, key_mask)
        tokens = last(tokens, key_mask, num_queries=1 if cls_only else None)
        hidden = tokens if self.layernorm is None else self.layernorm(tokens)
        n_pixel = pixel_values.shape[1] * c.patches_per_frame
        if pixel_masking is not None:
            n_pixel = int(n_pixel * (1 - c.pixel_mask_ratio))
        pixel_labels, pixel_restore = pixel_masking or (None, None)
        audio_labels, audio_restore = audio_masking or (None, None)
        return TvltModelOutput(
            last_hidden_state=hidden,
            last_pixel_hidden_state=None if cls_only else hidden[:, 1 : 1 + n_pixel],
            last_audio_hidden_state=None if cls_only else hidden[:, 1 + n_pixel :],
            pixel_label_masks=pixel_labels,
            audio_label_masks=audio_labels,
            pixel_ids_restore=pixel_restore,
            audio_ids_restore=audio_restore,
        )


class TvltForPreTraining(TvltPreTrainedModel):
    """Audio-video matching on (pixel_values_mixed, audio_values) and MAE reconstruction of masked pixel and
    audio patches, one decoder for both. MAE runs in training mode, or in eval mode when noise is passed."""

    def __init__(self, config: TvltConfig):
        super().__init__(config)
        c = config
        if not (c.task_matching or c.task_mae):
            raise ValueError("TvltConfig: task_matching and task_mae are both False; pretraining needs one")
        self.tvlt = TvltModel(c)
        if c.task_matching:
            h = c.hidden_size
            self.matching_head = _named(pooler=_named(dense=nn.Linear(h, h)), fc=nn.Linear(h, 1))
        if c.task_mae:
            dd, patch, audio_patch = c.decoder_hidden_size, c.image_patch_size[0], c.audio_patch_size
            self.encoder_to_decoder = nn.Linear(c.hidden_size, dd)
            self.pixel_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.audio_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            layers = [
                TvltLayer(dd, c.decoder_num_attention_heads, c.decoder_intermediate_size, c)
                for _ in range(c.decoder_num_hidden_layers)
            ]
            # one decoder for both modalities, each run through it separately and without a padding mask
            self.decoder = _named(decoder_layers=nn.ModuleList(layers), layernorm=nn.LayerNorm(dd, c.layer_norm_eps))
            self.decoder_pixel_pos_embed = nn.Parameter(torch.zeros(1, c.patches_per_frame, dd))
            self.decoder_temporal_embed = nn.Parameter(torch.zeros(1, c.num_frames, dd))
            self.decoder_pixel_type_embed = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_audio_pos_embed = nn.Parameter(torch.zeros(1, c.spectrogram_length // audio_patch[0], dd))
            self.decoder_freq_embed = nn.Parameter(torch.zeros(1, c.freq_patches, dd))
            self.decoder_audio_type_embed = nn.Parameter(torch.zeros(1, 1, dd))
            self.pixel_mae_head = _named(decoder=nn.Linear(dd, patch * patch * c.num_image_channels))
            self.audio_mae_head = _named(decoder=nn.Linear(dd, audio_patch[0] * audio_patch[1] * c.num_audio_channels))
        self.init_weights()

    def forward_matching(self, pixel_values_mixed, audio_values, pixel_mask_mixed, audio_mask) -> torch.Tensor:
        """Matching logit (B, 1) = fc(tanh(pooler(cls)))."""
        cls = self.tvlt(pixel_values_mixed, audio_values, pixel_mask_mixed, audio_mask, cls_only=True)
        return self.matching_head.fc(torch.tanh(self.matching_head.pooler.dense(cls.last_hidden_state[:, 0])))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, Dd) -> (B, L, Dd) through the decoder layers and its LayerNorm."""
        for layer in self.decoder.decoder_layers:
            tokens = layer(tokens)
        return self.decoder.layernorm(tokens)

    def forward_mae(self, pixel_values, audio_values, pixel_mask, audio_mask, pixel_mask_noise, audio_mask_noise):
        """Encode the kept patches, decode each modality with mask tokens in place of the removed ones.

        Returns pixel_logits (B, Np, P*P*C), audio_logits (B, Na, 256), the encoder output (with label masks).
        """
        encoded = self.tvlt(
            pixel_values, audio_values, pixel_mask, audio_mask, mask_pixel=True, mask_audio=True,
            pixel_mask_noise=pixel_mask_noise, audio_mask_noise=audio_mask_noise,
        )  # fmt: skip
        n_pixel = encoded.last_pixel_hidden_state.shape[1]
        tokens = self.encoder_to_decoder(encoded.last_hidden_state[:, 1:])  # (B, kept pixel + kept audio, Dd)
        pixels = unshuffle_with_mask_tokens(tokens[:, :n_pixel], self.pixel_mask_token, encoded.pixel_ids_restore)
        pixels = pixels + frame_position(
            self.decoder_pixel_pos_embed, self.decoder_temporal_embed, self.decoder_pixel_type_embed,
            pixel_values.shape[1],
        )  # fmt: skip
        audio = unshuffle_with_mask_tokens(tokens[:, n_pixel:], self.audio_mask_token, encoded.audio_ids_restore)
        audio = audio + frame_position(
            self.decoder_freq_embed, self.decoder_audio_pos_embed, self.decoder_audio_type_embed,
            audio.shape[1] // self.config.freq_patches,
        )  # fmt: skip
        pixel_logits = self.pixel_mae_head.decoder(self.decode(pixels))
        audio_logits = self.audio_mae_head.decoder(self.decode(audio))
        return pixel_logits, audio_logits, encoded

    def forward(
        self,
        pixel_values: torch.Tensor,
        audio_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values_mixed: torch.Tensor | None = None,
        pixel_mask_mixed: torch.Tensor | None = None,
        pixel_mask_noise: torch.Tensor | None = None,
        audio_mask_noise: torch.Tensor | None = None,
    ) -> TvltForPreTrainingOutput:
        """labels (B,) or (B, 1): 1 when ``pixel_values_mixed`` shows the video ``audio_values`` belongs to.
        Noise (B, Np) / (B, Na) makes the MAE masking reproducible; drawn from the global RNG when omitted."""
        c, out = self.config, TvltForPreTrainingOutput()
        if c.task_matching:
            if labels is None or pixel_values_mixed is None:
                raise ValueError("task_matching needs labels and pixel_values_mixed (set task_matching=False to skip)")
            out.matching_logits = self.forward_matching(pixel_values_mixed, audio_values, pixel_mask_mixed, audio_mask)
            out.matching_loss = F.binary_cross_entropy_with_logits(
                out.matching_logits.view(-1).float(), labels.view(-1).float()
            )
        if c.task_mae and (self.training or pixel_mask_noise is not None or audio_mask_noise is not None):
            out.pixel_logits, out.audio_logits, encoded = self.forward_mae(
                pixel_values, audio_values, pixel_mask, audio_mask, pixel_mask_noise, audio_mask_noise
            )
            out.pixel_label_masks, out.audio_label_masks = encoded.pixel_label_masks, encoded.audio_label_masks
            targets = patchify_pixels(pixel_values, c.image_patch_size[0])
            out.pixel_loss = masked_mse(out.pixel_logits, targets, out.pixel_label_masks)
            targets = patchify_audio(audio_values, c.audio_patch_size)
            out.audio_loss = masked_mse(out.audio_logits, targets, out.audio_label_masks)
        terms = [t for t in (out.matching_loss, out.pixel_loss, out.audio_loss) if t is not None]
        out.loss = torch.stack(terms).sum() if terms else None
        return out


class TvltForAudioVisualClassification(TvltPreTrainedModel):
    """Encoder + MLP on the cls token: cross-entropy over ``num_labels`` classes, or MSE for regression."""

    def __init__(self, config: TvltConfig):
        super().__init__(config)
        self.tvlt = TvltModel(config)
        h, eps = config.hidden_size, config.layer_norm_eps
        self.classifier = nn.Sequential(
            nn.Linear(h, h * 2), nn.LayerNorm(h * 2, eps=eps), nn.GELU(), nn.Linear(h * 2, config.num_labels)
        )
        self.init_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        audio_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TvltClassifierOutput:
        """labels: (B,) class ids for classification, (B, num_labels) float targets for regression."""
        cls = self.tvlt(pixel_values, audio_values, pixel_mask, audio_mask, cls_only=True).last_hidden_state[:, 0]
        logits = self.classifier(cls)
        loss = None
        if labels is not None and self.config.loss_type == "regression":
            loss = F.mse_loss(logits.float(), labels.float())
        elif labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
        return TvltClassifierOutput(loss=loss, logits=logits)


# ---------------------------------------------------------------------------------------------- size presets


def tvlt_tiny(**overrides) -> TvltConfig:
    """For CPU tests and smoke runs: 2 x 128 encoder, 1 x 64 decoder, up to 8 frames of 64 px and 512
    spectrogram frames (about 6 s of audio)."""
    values = dict(
        image_size=64, spectrogram_length=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, decoder_hidden_size=64, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=256,
    )  # fmt: skip
    return TvltConfig(**{**values, **overrides})


def tvlt_base(**overrides) -> TvltConfig:
    """The published ``ZinengTang/tvlt-base`` sizes (12 x 768 encoder, 8 x 512 decoder, 224 px, 8 frames)."""
    return TvltConfig(**overrides)


TVLT_PRESETS = {"tiny": tvlt_tiny, "base": tvlt_base}
