"""The inputs of TVLT and TVP as plain numbers, without torch: what the shards, the preprocessing, the loaders,
serving and the models agree on.

``tvlt_core.audio``, ``tvlt_core.video`` and ``tvlt_core.text`` implement the transforms and re-export these names; code that only
plans, validates or probes (the preprocessing config, its probe actors) imports them from here and so does not pay
torch's import (seconds per process on a small machine, paid by every Ray worker that imports it).
"""

from __future__ import annotations

# Audio: mono 44.1 kHz -> log-mel spectrogram (time, NUM_MEL_BINS), one frame per HOP_LENGTH samples.
SAMPLE_RATE = 44100
N_FFT = 2048
HOP_LENGTH = 512  # 44100 // 86 in the reference feature extractor
NUM_MEL_BINS = 128
MAX_FRAMES = 2048  # spectrogram_length of the public checkpoints (about 23.8 s)

# Video: TVLT_NUM_FRAMES frames per clip, resized and centre-cropped to TVLT_IMAGE_SIZE square.
TVLT_IMAGE_SIZE = 224
TVLT_NUM_FRAMES = 8

# TVP (``Intel/tvp-base``'s processor): TVP_NUM_FRAMES frames per video, longest edge to TVP_IMAGE_SIZE and padded
# square; sentences padded to TVP_MAX_TEXT_LENGTH tokens (the length the reference's examples pad to).
TVP_IMAGE_SIZE = 448
TVP_NUM_FRAMES = 48
TVP_MAX_TEXT_LENGTH = 100

# Preprocessing defaults (``pipelines.config``): pretrain clips of CLIP_LENGTH_S every CLIP_STRIDE_S (a trailing
# one kept from CLIP_MIN_LENGTH_S); grounding: GROUNDING_FRAMES frames per video, longest edge GROUNDING_SIZE.
# Serving falls back to them for a checkpoint that does not say which recipe its shards had.
CLIP_LENGTH_S = 10.0
CLIP_STRIDE_S = 10.0
CLIP_MIN_LENGTH_S = 1.0
GROUNDING_FRAMES = TVP_NUM_FRAMES
GROUNDING_SIZE = TVP_IMAGE_SIZE
