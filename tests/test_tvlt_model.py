"""TVLT models against the reference implementation (transformers 4.57, test-only), weights in both directions.

Each case builds our model, copies its weights into the reference by parameter name, feeds both the same inputs
and the same masking noise (the reference's noise functions are swapped for ones returning ours), and compares
outputs, losses and gradients in fp32. Weights are drawn with a larger initializer_range than the default so that
activations and logits are O(1) and a relative error means something (with std 0.02 the logits are ~1e-3).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tvlt_core.models import TVLT_PRESETS, TvltConfig, TvltForAudioVisualClassification, TvltForPreTraining, TvltModel
from tvlt_core.models.tvlt import make_audio_mask_noise, make_pixel_mask_noise

transformers = pytest.importorskip("transformers")
ref_tvlt = pytest.importorskip("transformers.models.deprecated.tvlt.modeling_tvlt")

REL_TOL = 1e-5  # fp32, observed about 1e-6

CONFIGS = {
    "small": dict(
        image_size=32, spectrogram_length=64, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, initializer_range=0.15,
    ),
    # 9 patches per frame, 4 frequency patches of 8 x 32, no q/k/v bias, patch-level audio masking, other ratios
    "wide": dict(
        image_size=48, spectrogram_length=96, num_frames=3, audio_patch_size=[8, 32], hidden_size=96,
        num_hidden_layers=3, num_attention_heads=3, intermediate_size=192, qkv_bias=False, decoder_hidden_size=48,
        decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=96,
        pixel_mask_ratio=0.5, audio_mask_ratio=0.3, audio_mask_type="patch-level", initializer_range=0.15,
    ),
    # no final LayerNorm, two frames
    "pooling": dict(
        image_size=32, spectrogram_length=48, num_frames=2, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=96, use_mean_pooling=True, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, initializer_range=0.15,
    ),
}  # fmt: skip


def rel_err(ours: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """max |ours - ref| / max(max |ref|, floor)."""
    return ((ours.detach().float() - ref.detach().float()).abs().max() / max(ref.abs().max().item(), floor)).item()


def make_inputs(config: TvltConfig, batch: int, padded: bool, seed: int) -> dict:
    """Random inputs; with ``padded``, sample 1 has fewer frames and the last sample shorter audio."""
    g = torch.Generator().manual_seed(seed)
    t, s = config.num_frames, config.image_size
    time_patch, fp = config.audio_patch_size[0], config.freq_patches
    steps = config.spectrogram_length // time_patch - 1
    inputs = dict(
        pixel_values=torch.rand(batch, t, 3, s, s, generator=g) * 2 - 1,
        audio_values=torch.rand(batch, 1, steps * time_patch, config.frequency_length, generator=g) * 2 - 1,
        pixel_mask=torch.ones(batch, t * config.patches_per_frame),
        audio_mask=torch.ones(batch, steps * fp),
        labels=torch.randint(0, 2, (batch, 1), generator=g).float(),
        pixel_values_mixed=torch.rand(batch, t, 3, s, s, generator=g) * 2 - 1,
    )
    if padded and batch > 1:
        real_frames = t // 2
        for key in ("pixel_values", "pixel_values_mixed"):
            inputs[key][1, real_frames:] = 0.0
        inputs["pixel_mask"][1, real_frames * config.patches_per_frame :] = 0.0
        inputs["audio_values"][-1, :, (steps // 2) * time_patch :] = 0.0
        inputs["audio_mask"][-1, (steps // 2) * fp :] = 0.0
    inputs["pixel_mask_mixed"] = inputs["pixel_mask"].clone()
    return inputs


def make_noise(config: TvltConfig, inputs: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n_pixel, n_audio = inputs["pixel_mask"].shape[0], inputs["pixel_mask"].shape[1], inputs["audio_mask"].shape[1]
    pixel = make_pixel_mask_noise(b, n_pixel, generator=g)
    # Patch 0 (frame 0, always real) is kept first: the reference takes the cls token's attention mask from the
    # first kept patch, which our model does not (see test_cls_token_stays_visible_under_masking).
    pixel[:, 0] = -1.0
    audio = make_audio_mask_noise(b, n_audio, config.freq_patches, config.audio_mask_type, generator=g)
    return pixel, audio


def use_noise(monkeypatch, pixel_noise: torch.Tensor, audio_noise: torch.Tensor) -> None:
    """Make the reference draw our noise (its generators take no seed or noise argument)."""
    monkeypatch.setattr(
        ref_tvlt, "generate_pixel_mask_noise",
        lambda seq, pixel_mask=None, mask_ratio=0.75: (pixel_noise, int(seq.shape[1] * (1 - mask_ratio))),
    )  # fmt: skip
    monkeypatch.setattr(
        ref_tvlt, "generate_audio_mask_noise",
        lambda seq, audio_mask=None, mask_ratio=0.75, mask_type=None, freq_len=8: (
            audio_noise, int(seq.shape[1] * (1 - mask_ratio))
        ),
    )  # fmt: skip


def reference_of(model: torch.nn.Module, reference_class):
    ref = reference_class(transformers.TvltConfig.from_dict(model.config.to_hf_dict(reference_class.__name__)))
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.train(model.training)


def assert_grads_match(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    ref_params = dict(ref.named_parameters())
    largest = max(p.grad.abs().max().item() for p in ref_params.values() if p.grad is not None)
    for name, param in ours.named_parameters():
        expected = ref_params[name].grad
        if name.endswith("key.bias"):
            # 0 analytically (softmax ignores a constant added to every key of a query): rounding noise in both
            assert param.grad.abs().max() < 1e-6 * largest and expected.abs().max() < 1e-6 * largest, name
        else:
            assert rel_err(param.grad, expected) < REL_TOL * 10, name


# -------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
def test_encoder_matches_reference(name, batch, padded):
    torch.manual_seed(0)
    ours = TvltModel(TvltConfig(**CONFIGS[name])).eval()
    ref = reference_of(ours, transformers.TvltModel)
    inputs = make_inputs(ours.config, batch, padded, seed=1)
    args = {k: inputs[k] for k in ("pixel_values", "audio_values", "pixel_mask", "audio_mask")}
    with torch.no_grad():
        out, expected = ours(**args), ref(**args)
        assert rel_err(out.last_hidden_state, expected.last_hidden_state) < REL_TOL
        assert rel_err(out.last_audio_hidden_state, expected.last_audio_hidden_state) < REL_TOL
        cls = ours(**args, cls_only=True).last_hidden_state  # only the cls row of the last layer
        assert cls.shape == (batch, 1, ours.config.hidden_size)
        assert rel_err(cls[:, 0], expected.last_hidden_state[:, 0]) < REL_TOL
        # one mask alone is ignored, as in the reference
        only_pixel = {**args, "audio_mask": None}
        assert rel_err(ours(**only_pixel).last_hidden_state, ref(**only_pixel).last_hidden_state) < REL_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True)])
def test_pretraining_matches_reference(monkeypatch, name, batch, padded):
    torch.manual_seed(0)
    ours = TvltForPreTraining(TvltConfig(**CONFIGS[name])).train()
    ref = reference_of(ours, transformers.TvltForPreTraining)
    inputs = make_inputs(ours.config, batch, padded, seed=2)
    pixel_noise, audio_noise = make_noise(ours.config, inputs, seed=3)
    use_noise(monkeypatch, pixel_noise, audio_noise)

    out = ours(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
    expected = ref(**inputs)
    for key in ("loss", "matching_logits", "pixel_logits", "audio_logits"):
        assert rel_err(getattr(out, key), getattr(expected, key)) < REL_TOL, key
    assert torch.isclose(out.loss, out.matching_loss + out.pixel_loss + out.audio_loss)
    if padded:  # padded patches never count as removed
        assert out.pixel_label_masks[inputs["pixel_mask"] == 0].sum() == 0
        assert out.audio_label_masks[inputs["audio_mask"] == 0].sum() == 0
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(ours, ref)


def test_mae_only_matches_reference_without_its_matching_term(monkeypatch):
    # The reference crashes with task_matching=False; compare with its full loss minus the matching BCE.
    torch.manual_seed(0)
    full = TvltForPreTraining(TvltConfig(**CONFIGS["small"])).train()
    ref = reference_of(full, transformers.TvltForPreTraining)
    mae_only = TvltForPreTraining(TvltConfig(**{**CONFIGS["small"], "task_matching": False})).train()
    mae_only.load_state_dict(full.state_dict(), strict=False)
    assert not hasattr(mae_only, "matching_head")
    inputs = make_inputs(full.config, 3, True, seed=4)
    pixel_noise, audio_noise = make_noise(full.config, inputs, seed=5)
    use_noise(monkeypatch, pixel_noise, audio_noise)

    out = mae_only(
        inputs["pixel_values"], inputs["audio_values"], inputs["pixel_mask"], inputs["audio_mask"],
        pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise,
    )  # fmt: skip
    expected = ref(**inputs)
    bce = F.binary_cross_entropy_with_logits(expected.matching_logits.view(-1), inputs["labels"].view(-1))
    assert out.matching_logits is None
    assert rel_err(out.loss, expected.loss - bce) < REL_TOL
    assert rel_err(out.pixel_logits, expected.pixel_logits) < REL_TOL


def test_matching_only_matches_reference():
    torch.manual_seed(0)
    ours = TvltForPreTraining(TvltConfig(**{**CONFIGS["small"], "task_mae": False})).train()
    ref = reference_of(ours, transformers.TvltForPreTraining)
    inputs = make_inputs(ours.config, 3, True, seed=6)
    out, expected = ours(**inputs), ref(**inputs)
    assert out.pixel_logits is None and out.audio_logits is None
    assert rel_err(out.loss, expected.loss) < REL_TOL
    assert rel_err(out.matching_logits, expected.matching_logits) < REL_TOL


def test_eval_mode_runs_mae_only_with_given_noise():
    torch.manual_seed(0)
    model = TvltForPreTraining(TvltConfig(**CONFIGS["small"])).eval()
    inputs = make_inputs(model.config, 2, True, seed=7)
    with torch.no_grad():
        plain = model(**inputs)  # like the reference: MAE is a training-mode objective
        assert plain.pixel_logits is None and plain.loss == plain.matching_loss
        pixel_noise, audio_noise = make_noise(model.config, inputs, seed=8)
        first = model(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
        again = model(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
    assert torch.equal(first.loss, again.loss) and torch.equal(first.pixel_logits, again.pixel_logits)
    assert first.pixel_loss > 0 and first.audio_loss > 0


@pytest.mark.parametrize("loss_type", ["classification", "regression"])
def test_classifier_matches_reference(loss_type):
    torch.manual_seed(0)
    config = TvltConfig(**{**CONFIGS["small"], "loss_type": loss_type, "num_labels": 3})
    ours = TvltForAudioVisualClassification(config).train()
    ref = reference_of(ours, transformers.TvltForAudioVisualClassification)
    inputs = make_inputs(config, 3, True, seed=9)
    labels = torch.tensor([0, 2, 1]) if loss_type == "classification" else torch.randn(3, 3)
    args = {k: inputs[k] for k in ("pixel_values", "audio_values", "pixel_mask", "audio_mask")}
    out, expected = ours(**args, labels=labels), ref(**args, labels=labels)
    assert rel_err(out.logits, expected.logits) < REL_TOL
    assert rel_err(out.loss, expected.loss) < REL_TOL
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(ours, ref)


# ------------------------------------------------------------------------------------------ model behaviour


def test_padding_mask_makes_padded_sample_equal_to_unpadded():
    torch.manual_seed(0)
    model = TvltModel(TvltConfig(**CONFIGS["small"])).eval()
    inputs = make_inputs(model.config, 3, True, seed=10)
    args = {k: inputs[k] for k in ("pixel_values", "audio_values", "pixel_mask", "audio_mask")}
    real_frames = int(inputs["pixel_mask"][1].sum()) // model.config.patches_per_frame
    with torch.no_grad():
        batched = model(**args)
        alone = model(
            inputs["pixel_values"][1:2, :real_frames], inputs["audio_values"][1:2],
            inputs["pixel_mask"][1:2, : real_frames * model.config.patches_per_frame], inputs["audio_mask"][1:2],
        )  # fmt: skip
    n_real = alone.last_pixel_hidden_state.shape[1]
    assert rel_err(batched.last_hidden_state[1, 0], alone.last_hidden_state[0, 0]) < REL_TOL
    assert rel_err(batched.last_pixel_hidden_state[1, :n_real], alone.last_pixel_hidden_state[0]) < REL_TOL
    assert rel_err(batched.last_audio_hidden_state[1], alone.last_audio_hidden_state[0]) < REL_TOL


def test_cls_token_stays_visible_under_masking(monkeypatch):
    # Kept tokens are a set to attention: the same kept set in another order gives the same result. The reference
    # takes the cls token's key mask from the first kept pixel patch, so it hides cls when that one is padding.
    torch.manual_seed(0)
    model = TvltModel(TvltConfig(**CONFIGS["small"])).eval()
    inputs = make_inputs(model.config, 3, True, seed=11)
    args = {k: inputs[k] for k in ("pixel_values", "audio_values", "pixel_mask", "audio_mask")}
    pixel_noise, audio_noise = make_noise(model.config, inputs, seed=12)  # patch 0 (real) is kept first
    padded_patch = int((inputs["pixel_mask"][1] == 0).nonzero()[0, 0])
    padded_first = pixel_noise.clone()
    pixel_noise[1, padded_patch], padded_first[1, padded_patch] = -0.5, -2.0  # kept in both, first in one
    with torch.no_grad():
        a = model(**args, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
        b = model(**args, pixel_mask_noise=padded_first, audio_mask_noise=audio_noise)
        assert rel_err(b.last_hidden_state[1, 0], a.last_hidden_state[1, 0]) < REL_TOL
        assert rel_err(b.last_audio_hidden_state[1], a.last_audio_hidden_state[1]) < REL_TOL
        use_noise(monkeypatch, padded_first, audio_noise)
        ref = reference_of(model, transformers.TvltModel)
        expected = ref(**args, mask_pixel=True, mask_audio=True)
    assert rel_err(expected.last_hidden_state[0], b.last_hidden_state[0]) < REL_TOL  # sample 0 has no padding
    assert rel_err(expected.last_hidden_state[1, 0], b.last_hidden_state[1, 0]) > 1e-3  # cls hidden there


def test_frame_level_noise_masks_whole_time_steps():
    noise = make_audio_mask_noise(2, 40, 8, "frame-level", generator=torch.Generator().manual_seed(0))
    steps = noise.view(2, 5, 8)
    assert torch.equal(steps, steps[:, :, :1].expand(-1, -1, 8))
    patch = make_audio_mask_noise(2, 40, 8, "patch-level", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(patch.view(2, 5, 8), patch.view(2, 5, 8)[:, :, :1].expand(-1, -1, 8))


def test_mae_loss_with_nothing_removed_is_zero_not_nan():
    torch.manual_seed(0)
    config = TvltConfig(**{**CONFIGS["small"], "audio_mask_ratio": 0.0, "task_matching": False})
    model = TvltForPreTraining(config).train()
    inputs = make_inputs(config, 1, False, seed=13)
    out = model(inputs["pixel_values"], inputs["audio_values"], inputs["pixel_mask"], inputs["audio_mask"])
    assert out.audio_loss == 0 and torch.isfinite(out.loss)


def test_bf16_forward_backward_tracks_fp32():
    torch.manual_seed(0)
    model = TvltForPreTraining(TvltConfig(**CONFIGS["small"])).train()
    inputs = make_inputs(model.config, 2, True, seed=14)
    pixel_noise, audio_noise = make_noise(model.config, inputs, seed=15)
    fp32 = model(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
    model.to(torch.bfloat16)
    half = {k: v.to(torch.bfloat16) if k.endswith("values") or k.endswith("mixed") else v for k, v in inputs.items()}
    out = model(**half, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise)
    assert out.pixel_logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # bf16 keeps 8 bits of mantissa: a few percent on the loss, not the fp32 bound
    assert abs(out.loss.item() - fp32.loss.item()) < 0.05 * fp32.loss.item()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="audio_mask_type"):
        TvltConfig(audio_mask_type="block")
    with pytest.raises(ValueError, match="num_attention_heads"):
        TvltConfig(hidden_size=100)
    with pytest.raises(ValueError, match="task_matching and task_mae"):
        TvltForPreTraining(TvltConfig(**{**CONFIGS["small"], "task_matching": False, "task_mae": False}))
    assert TvltConfig(audio_mask_type="patch_level").audio_mask_type == "patch-level"
    model = TvltForPreTraining(TvltConfig(**CONFIGS["small"])).train()
    inputs = make_inputs(model.config, 1, False, seed=16)
    with pytest.raises(ValueError, match="labels and pixel_values_mixed"):
        model(inputs["pixel_values"], inputs["audio_values"])
    with pytest.raises(ValueError, match="up to 4 frames of 32 x 32"):
        model.tvlt(inputs["pixel_values"][..., :16], inputs["audio_values"])
    too_long = torch.zeros(1, 1, model.config.spectrogram_length + 16, 128)
    with pytest.raises(ValueError, match="spectrogram_length"):
        model.tvlt(inputs["pixel_values"], too_long)


def test_tiny_preset_trains_a_step():
    model = TvltForPreTraining(TVLT_PRESETS["tiny"]()).train()
    inputs = make_inputs(model.config, 2, True, seed=17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        pixel_noise, audio_noise = make_noise(model.config, inputs, seed=18)
        loss = model(**inputs, pixel_mask_noise=pixel_noise, audio_mask_noise=audio_noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ checkpoints


def test_base_config_has_the_reference_parameter_names_and_shapes():
    # What decides whether a downloaded ZinengTang/tvlt-base loads: every name and shape of the reference's
    # TvltForPreTraining at the base config. Built on the meta device, so no memory or time is spent on weights.
    with torch.device("meta"):
        ours = TvltForPreTraining(TVLT_PRESETS["base"]())
        ref = transformers.TvltForPreTraining(transformers.TvltConfig())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    written = ours.config.to_hf_dict("TvltForPreTraining")
    for key, value in written.items():
        if hasattr(ref.config, key) and key not in ("id2label", "label2id", "architectures"):
            assert getattr(ref.config, key) == value, key


def test_our_checkpoint_loads_in_the_reference(tmp_path):
    torch.manual_seed(0)
    ours = TvltForPreTraining(TvltConfig(**CONFIGS["wide"])).eval()
    ours.save_pretrained(str(tmp_path / "ckpt"))
    ref, info = transformers.TvltForPreTraining.from_pretrained(str(tmp_path / "ckpt"), output_loading_info=True)
    assert not any(info.values()), info
    inputs = make_inputs(ours.config, 2, True, seed=19)
    with torch.no_grad():
        assert rel_err(ours(**inputs).matching_logits, ref.eval()(**inputs).matching_logits) < REL_TOL


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_reference_checkpoint_loads_in_ours(tmp_path, safe_serialization):
    torch.manual_seed(0)
    config = transformers.TvltConfig(**{**CONFIGS["small"], "audio_mask_type": "frame-level"})
    ref = transformers.TvltForPreTraining(config).eval()
    ref.save_pretrained(str(tmp_path), safe_serialization=safe_serialization)
    assert (tmp_path / ("model.safetensors" if safe_serialization else "pytorch_model.bin")).exists()
    ours = TvltForPreTraining.from_pretrained(str(tmp_path)).eval()  # strict: no missing or unexpected keys
    assert ours.config.initializer_range == CONFIGS["small"]["initializer_range"]
    inputs = make_inputs(ours.config, 2, True, seed=20)
    with torch.no_grad():
        assert rel_err(ours(**inputs).matching_logits, ref(**inputs).matching_logits) < REL_TOL
        # the encoder alone and a fresh classifier load from the same pretraining checkpoint
        encoder = TvltModel.from_pretrained(str(tmp_path)).eval()
        args = {k: inputs[k] for k in ("pixel_values", "audio_values", "pixel_mask", "audio_mask")}
        ref_hidden = ref.tvlt(**args).last_hidden_state
        assert rel_err(encoder(**args).last_hidden_state, ref_hidden) < REL_TOL
    with pytest.raises(KeyError, match="missing"):
        TvltForAudioVisualClassification.from_pretrained(str(tmp_path))
    classifier = TvltForAudioVisualClassification.from_pretrained(str(tmp_path), strict=False, num_labels=5)
    assert classifier.classifier[-1].out_features == 5
    torch.testing.assert_close(classifier.tvlt.cls_embedding, ref.tvlt.cls_embedding, rtol=0, atol=0)


def test_checkpoint_round_trip_through_fsspec_url():
    torch.manual_seed(0)
    model = TvltForAudioVisualClassification(TvltConfig(**{**CONFIGS["pooling"], "num_labels": 4}))
    url = "memory://tvlt-test/classifier"
    model.save_pretrained(url)
    loaded = TvltForAudioVisualClassification.from_pretrained(url)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # the encoder saved alone loads under a head model (prefix added)
    model.tvlt.save_pretrained(url + "-encoder")
    head = TvltForAudioVisualClassification.from_pretrained(url + "-encoder", strict=False)
    assert torch.equal(head.tvlt.cls_embedding, model.tvlt.cls_embedding)
