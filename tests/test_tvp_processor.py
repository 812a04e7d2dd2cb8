"""TVP frame processing and post-processing against transformers' TvpImageProcessor / TvpProcessor (test-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tvlt_core.video import tvp_logits_to_seconds, tvp_preprocess, tvp_resize_pad  # noqa: E402


def frames(height: int, width: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: resampling differences would show, unlike on flat colours."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([ys * 255 / max(height - 1, 1), xs * 255 / max(width - 1, 1), (ys + xs) % 256], axis=-1)
    noise = rng.integers(-30, 30, size=(count, height, width, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def reference(video: np.ndarray, size: int) -> torch.Tensor:
    processor = transformers.TvpImageProcessor(
        size={"longest_edge": size}, crop_size={"height": size, "width": size}, pad_size={"height": size, "width": size}
    )
    return processor(list(video), return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(360, 640, 448), (101, 67, 448), (480, 480, 96), (70, 45, 96), (33, 200, 96)],  # landscape, portrait, odd
)
def test_frames_match_reference_processor(height, width, size):
    video = frames(height, width)
    got = tvp_preprocess(video, size)
    want = reference(video, size)
    assert got.shape == want.shape == (2, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # The zero padding becomes -1 after normalising, in every channel.
    padded = tvp_resize_pad(video, size).sum(axis=-1) == 0
    assert padded.any() or height == width
    assert torch.all(got.permute(0, 2, 3, 1)[torch.from_numpy(padded)] == -1)


def test_channels_are_bgr():
    video = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    video[..., 0] = 255  # pure red
    out = tvp_preprocess(video, 8)
    assert torch.all(out[0, 2] == 1) and torch.all(out[0, :2] == -1)


def test_logits_to_seconds_matches_reference_post_processing(tmp_path):
    logits = torch.tensor([[0.1234, 0.5678], [0.2, 0.9]])
    durations = torch.tensor([30.0, 12.5])
    seconds = tvp_logits_to_seconds(logits, durations)
    torch.testing.assert_close(seconds, torch.tensor([[3.702, 17.034], [2.5, 11.25]]))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    tokenizer = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    processor = transformers.TvpProcessor(transformers.TvpImageProcessor(), tokenizer)
    for i in range(2):
        start, end = processor.post_process_video_grounding(logits[i : i + 1], float(durations[i]))
        assert (round(float(seconds[i, 0]), 1), round(float(seconds[i, 1]), 1)) == (start, end)
    with pytest.raises(ValueError, match="durations"):
        tvp_logits_to_seconds(logits, [1.0, 2.0, 3.0])
